"""``python -m avmt inspect``: build a configuration's model without its weights and count its parameters.

``python -m avmt inspect -c CONFIG [-c MORE] [--model.x=y ...] [--json FILE]`` builds the
``model`` section on the meta device (:func:`without_weights`): no weight is read or downloaded,
no data is touched, no stage-1 pretraining runs and no Trainer is made. A plugin that names a
checkpoint is built from the architecture written in its ``config`` init arg (``model_type`` plus
the sizes that differ from that transformers config class's defaults); the LLM's tokenizer is the
offline word tokenizer standing in for the checkpoint's (the embedding rows come from the
config's ``vocab_size``; only the number of added special tokens matters to the count).

It prints the parameters per part of the model -- total and trainable -- the adapter's trainable
parameters per scope, and the grand totals. Every count is exact: the numel of the meta tensors,
each parameter counted once (tied or shared parameters belong to the first part that holds them).

The module is import-light: the loaders of the backbone plugins (:mod:`avmt.llm`,
:mod:`avmt.encoders.base`, :mod:`avmt.omni`) import :func:`building_without_weights`,
:func:`config_from_dict` and :func:`check_written_config` from here.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from avmt.errors import UserError

_WITHOUT_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar("avmt_without_weights", default=False)


# --------------------------------------------------------------------------- the build mode
@contextlib.contextmanager
def without_weights() -> Iterator[None]:
    """Build modules on the meta device, plugins naming a checkpoint from their written ``config``."""
    import torch

    token = _WITHOUT_WEIGHTS.set(True)
    try:
        with torch.device("meta"):
            yield
    finally:
        _WITHOUT_WEIGHTS.reset(token)


def building_without_weights() -> bool:
    """Whether the current build is an inspect build (:func:`without_weights`)."""
    return _WITHOUT_WEIGHTS.get()


def config_from_dict(config: Mapping[str, Any], key: str, model: str | None = None):
    """The transformers config an architecture dict describes: ``AutoConfig.for_model(**config)``.

    Args:
        config: ``model_type`` plus the sizes that differ from that config class's defaults (nested
            sub-configs as dicts, e.g. Qwen2.5-Omni's ``text_config``).
        key: the YAML key that holds it (named in errors).
        model: the checkpoint it stands for (named in the error when ``config`` is missing).
    Raises:
        UserError: ``config`` is missing (inspect needs it), has no ``model_type``, or names an
            unknown model type or a key its class rejects.
    """
    from transformers import AutoConfig

    if config is None:
        raise UserError(
            f"{key}: python -m avmt inspect builds {model!r} without downloading it and needs its architecture: "
            f"write {key}: {{model_type: <the checkpoint's model_type>, <the sizes that differ from that "
            "transformers config class's defaults>} (see experiments/seeds/crab_plus.yaml)"
        )
    if not isinstance(config, Mapping) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{key}: an architecture needs a model_type (e.g. llama, clip, qwen2_5_omni_thinker), "
                        f"got {config!r}")
    settings = dict(config)
    model_type = settings.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **settings)
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(f"{key}: transformers cannot build a {model_type!r} config from {settings}: "
                        f"{' '.join(str(error).split())}") from error


def _value(config: Any, name: str) -> tuple[bool, Any]:
    """``(found, value)`` of key ``name`` of a transformers config (aliases resolved) or a dict."""
    if isinstance(config, Mapping):
        return (name in config, config.get(name))
    if hasattr(config, name):
        return True, getattr(config, name)
    return False, None


def _same(written: Any, found: Any) -> bool:
    if isinstance(written, (list, tuple)) and isinstance(found, (list, tuple)):
        return len(written) == len(found) and all(_same(w, f) for w, f in zip(written, found))
    if isinstance(written, bool) or isinstance(found, bool):
        return written is found or written == found and type(written) is type(found)
    return written == found


def _sub_configs(config: Any) -> Iterator[Any]:
    """The sub-configs nested in a transformers config (Qwen2.5-Omni's thinker_config, CLIP's vision_config, ...)."""
    from transformers import PretrainedConfig

    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if isinstance(sub, PretrainedConfig):
            yield sub
            yield from _sub_configs(sub)


def check_written_config(written: Mapping[str, Any] | None, checkpoint: Any, key: str, model: str) -> None:
    """Compare the architecture written in the YAML with the checkpoint's config.

    ``written`` may describe the whole checkpoint or one of its sub-configs (the one whose
    ``model_type`` it names: e.g. ``clip_vision_model`` inside a CLIP checkpoint); every key it
    writes, nested ones included, must hold the same value in the checkpoint.

    Args:
        written: the ``config`` init arg (``None``: nothing to check).
        checkpoint: the checkpoint's ``transformers.PretrainedConfig``.
        key: the YAML key of ``written``.
        model: the checkpoint's name (for the message).
    Raises:
        UserError: naming the key that differs and both values.
    """
    if written is None:
        return
    model_type = written.get("model_type")
    target = checkpoint
    if model_type is not None and model_type != getattr(checkpoint, "model_type", None):
        target = next((sub for sub in _sub_configs(checkpoint) if sub.model_type == model_type), None)
        if target is None:
            inner = [sub.model_type for sub in _sub_configs(checkpoint)]
            raise UserError(
                f"{key}.model_type: the YAML says {model_type!r} but {model!r} holds a {checkpoint.model_type!r} "
                f"model{f' (sub-configs {inner})' if inner else ''}; the YAML's config must describe the checkpoint"
            )
    _compare(written, target, key, model)


def _compare(written: Mapping[str, Any], found_config: Any, key: str, model: str) -> None:
    for name, value in written.items():
        found, actual = _value(found_config, name)
        path = f"{key}.{name}"
        if not found:
            raise UserError(f"{path}: the YAML writes {value!r} but the config of {model!r} has no such key")
        if isinstance(value, Mapping) and not isinstance(actual, (list, tuple, str, int, float)) and actual is not None:
            _compare(value, actual, path, model)
        elif not _same(value, actual):
            raise UserError(f"{path}: the YAML says {value!r} but the checkpoint {model!r} has {actual!r}; "
                            "correct the YAML's config (it must describe the checkpoint)")


# --------------------------------------------------------------------------- counting
def _parts(model) -> list[tuple[str, Any]]:
    """``(part name, module or parameter list)`` in table order."""
    parts: list[tuple[str, Any]] = [
        ("llm base", model.llm.model),
        ("llm new token rows", list(model.llm.new_parameters)),
        ("vision encoder", model.vision_encoder),
        ("audio encoder", model.audio_encoder),
        (f"vision connector ({type(model.vision_connector).__name__})", model.vision_connector),
        (f"audio connector ({type(model.audio_connector).__name__})", model.audio_connector),
    ]
    if model.image_connector is not None:
        parts.append((f"image connector ({type(model.image_connector).__name__})", model.image_connector))
    for head in model.heads:
        parts.append((f"head {head.output} ({type(head).__name__})", head))
    if model.segment_embedding is not None:
        parts.append(("segment embedding", model.segment_embedding))
    return parts


def count_model(model) -> dict[str, Any]:
    """Exact parameter counts of an :class:`~avmt.model.AVModel` (meta or real tensors).

    Returns:
        ``{"parts": [{"part", "total", "trainable"}], "adapter": {"total", "trainable", "scopes":
        {scope: trainable}}, "total", "trainable"}``; each parameter is counted once, in the first
        part holding it (the adapter's parameters only in ``adapter``), and anything else the model
        holds in a last ``other`` part, so the parts add up to the totals.
    """
    unique = {id(p): p for p in model.parameters()}
    adapter_params: dict[int, Any] = {}
    scopes: dict[str, int] = {}
    if model.adapter is not None:
        for scope in model.adapter.scopes:
            params = model.adapter._scope_adapter_parameters(scope)
            scopes[scope] = sum(p.numel() for p in params.values() if p.requires_grad)
            adapter_params.update({id(p): p for p in params.values()})
    seen = set(adapter_params)
    counted: dict[str, dict[str, Any]] = {}

    def add(name: str, params: Sequence) -> None:
        own = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in own)
        counted[name] = {"part": name, "total": sum(p.numel() for p in own),
                         "trainable": sum(p.numel() for p in own if p.requires_grad)}

    parts = _parts(model)
    # the new token rows live inside the LLM: they are taken before the part that holds them
    for name, holder in sorted(parts, key=lambda part: not isinstance(part[1], list)):
        add(name, holder if isinstance(holder, list) else list(holder.parameters()))
    rows = [counted[name] for name, _ in parts]
    other = [p for i, p in unique.items() if i not in seen]
    if other:
        add("other", other)
        rows.append(counted["other"])
    adapter_list = list(adapter_params.values())
    adapter = {
        "class": type(model.adapter).__name__ if model.adapter is not None else None,
        "total": sum(p.numel() for p in adapter_list),
        "trainable": sum(p.numel() for p in adapter_list if p.requires_grad),
        "scopes": scopes,
    }
    total = sum(row["total"] for row in rows) + adapter["total"]
    trainable = sum(row["trainable"] for row in rows) + adapter["trainable"]
    return {"parts": rows, "adapter": adapter, "total": total, "trainable": trainable}


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f} M"


def format_counts(counts: Mapping[str, Any]) -> str:
    """The table :func:`main` prints."""
    width = max(len(row["part"]) for row in counts["parts"]) + 2
    lines = [f"{'part':{width}s}{'total':>18s}{'':12s}{'trainable':>18s}"]

    def line(name: str, total: int, trainable: int) -> str:
        return f"{name:{width}s}{total:>18,d}{_millions(total):>12s}{trainable:>18,d}{_millions(trainable):>12s}"

    for row in counts["parts"]:
        lines.append(line(row["part"], row["total"], row["trainable"]))
    adapter = counts["adapter"]
    if adapter["class"] is not None:
        lines.append(line(f"adapter ({adapter['class']})", adapter["total"], adapter["trainable"]))
        for scope, trainable in adapter["scopes"].items():
            lines.append(f"  adapter trainable in scope {scope}: {trainable:,d} ({_millions(trainable)})")
    lines.append(line("TOTAL", counts["total"], counts["trainable"]))
    lines.extend(f"note: {note}" for note in counts.get("notes", []))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command
def build_without_weights(argv: Sequence[str]):
    """The :class:`~avmt.model.AVModel` of the command line's ``model`` section, built on the meta device.

    Args:
        argv: ``-c CONFIG`` files and ``--model.x=y`` flags, as for ``python -m avmt fit``.
    """
    from jsonargparse import ArgumentParser

    from avmt.cli import AVCLI, check_plugins, expand_config_bases, instantiate_cli
    from avmt.module import AVModule

    class ModelOnlyCLI(AVCLI):
        """Parses the whole configuration but instantiates only its ``model`` (no data, no Trainer)."""

        def instantiate_classes(self) -> None:
            parser = ArgumentParser(exit_on_error=False)
            parser.add_class_arguments(AVModule, "model", fail_untyped=False, sub_configs=True)
            with without_weights():
                self.model = parser.instantiate_classes(parser.parse_object({"model": self.config["model"]})).model
            self.datamodule = self.trainer = None

    args = expand_config_bases(list(argv))
    check_plugins(args)
    return instantiate_cli(ModelOnlyCLI, args).model.model


def _notes(model) -> list[str]:
    llm = model.llm
    notes = []
    if getattr(llm, "stand_in_tokenizer", False):
        notes.append(
            f"the LLM's tokenizer is avmt's offline word tokenizer ({llm.base_vocab_size} tokens), standing in "
            f"for the tokenizer of {llm.model_name}: the embedding rows come from the config's vocab_size, and the "
            f"{len(llm.new_token_ids)} added special tokens {llm.special_tokens} give the new rows"
        )
    notes.append("built on the meta device: no weight was read or downloaded; counts are exact")
    return notes


def main(argv: list[str]) -> None:
    """``python -m avmt inspect -c CONFIG [-c MORE] [--model.x=y ...] [--json FILE]``."""
    argv = list(argv)
    json_path = None
    for index, arg in enumerate(argv):
        if arg == "--json" or arg.startswith("--json="):
            if "=" in arg:
                json_path, remove = arg.split("=", 1)[1], 1
            elif index + 1 < len(argv):
                json_path, remove = argv[index + 1], 2
            else:
                raise UserError("--json needs a file name")
            del argv[index : index + remove]
            break
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print(__doc__.strip().split("\n\n")[0])
        print("usage: python -m avmt inspect -c CONFIG [-c MORE] [--model.KEY=VALUE ...] [--json FILE]")
        return
    model = build_without_weights(argv)
    counts = count_model(model)
    counts["notes"] = _notes(model)
    print(format_counts(counts))
    if json_path is not None:
        path = Path(json_path)
        if path.is_dir():
            raise UserError(f"--json '{path}' is a folder; give a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(counts, indent=2) + "\n")
        print(f"wrote {path}")
