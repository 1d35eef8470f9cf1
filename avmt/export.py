"""``python -m avmt export peft``: a plain-LoRA avmt checkpoint as a peft adapter folder.

    python -m avmt export peft --ckpt runs/lora/version_0/checkpoints/last.ckpt --out exported/
                               [-c CONFIG.yaml ...] [--no-check]

The run's LLM becomes what ``peft.PeftModel.from_pretrained(base_llm, OUT)`` rebuilds:

- ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's own format, written by peft's
  ``save_pretrained``): the LoRA weights of every adapted LLM projection (``avmt.adapters.LoRA``
  in scope ``llm``); the LLM modules the run trained in full (``llm.train_modules``, e.g.
  ``model.embed_tokens``, ``lm_head``, ``model.norm``) as peft ``modules_to_save``, holding their
  trained weights over the whole vocabulary (new token rows included); and, for an embedding /
  output head the run did NOT train in full, only the new token rows (``<video>``, ``<audio>``,
  ``<image>``, ``<seg>``, ...) as peft ``trainable_token_indices`` (``TrainableTokensWrapper``;
  a tied output head follows the embedding).
- the tokenizer with the new tokens at the ids the run used (so ``len(tokenizer)`` is the size the
  base's embeddings are resized to before loading, ``resize_token_embeddings(len(tokenizer))``).
- ``base_model/``: the base LLM itself when it exists nowhere else (the tiny random LLM of the
  default config: its weights only live in the checkpoint); for a pretrained LLM,
  ``base_model_name_or_path`` names its hub id / path (and ``avmt_export.json`` its GGUF file).
- ``avmt_export.json`` (what was written, the base, the sizes, the check) and ``README.md`` (how
  to load it).

What peft's format cannot hold is either refused or written beside it and said so: an I-LoRA or
MoE-LoRA adapter (routed heads / experts, no peft equivalent) is refused with exit code 2; the
connectors, heads, encoders and time codes (not part of the LLM) go to
``avmt_extras.safetensors`` with their checkpoint keys.

Before writing, the peft model is checked against the avmt model: the logits of both on a probe
sequence (ordinary tokens and every new token) must agree (max abs difference < 1e-4 in float32).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avmt.errors import UserError

__all__ = ["EXPORT_FORMAT", "SIDE_FILE", "build_module", "export_peft", "load_exported", "main"]

EXPORT_FORMAT = "avmt-peft-export-1"
SIDE_FILE = "avmt_extras.safetensors"
INFO_FILE = "avmt_export.json"
CHECK_TOLERANCE = 1e-4  # float32 logits; a larger difference means the export is wrong
# keys a run's saved config.yaml holds for its subcommand (fit/validate...), not for the model
_RUN_ONLY_KEYS = ("ckpt_path", "weights_only")


# ---------------------------------------------------------------------------- the run
def find_run_config(ckpt: Path) -> Path:
    """The ``config.yaml`` LightningCLI saved for the run of ``ckpt`` (``<run>/checkpoints/x.ckpt`` ->
    ``<run>/config.yaml``); FileNotFoundError naming the places looked at."""
    candidates = [ckpt.parent.parent / "config.yaml", ckpt.parent / "config.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no config.yaml next to the checkpoint (looked at {', '.join(str(p) for p in candidates)}); "
        "pass the run's config with -c CONFIG.yaml"
    )


def build_module(configs: Sequence[str | Path]):
    """The :class:`~avmt.module.AVModule` the config files describe (merged in order), untrained.

    A run's saved ``config.yaml`` and experiment YAMLs (with ``config: base.yaml``) both work.
    """
    import yaml
    from lightning.pytorch.cli import LightningCLI

    from avmt.cli import expand_config_bases, instantiate_cli, load_config_file

    args: list[str] = []
    for config in configs:
        path = Path(config)
        loaded = load_config_file(path) or {}
        if isinstance(loaded, dict) and any(key in loaded for key in _RUN_ONLY_KEYS):
            for key in _RUN_ONLY_KEYS:
                loaded.pop(key, None)
            args += ["--config", yaml.safe_dump(loaded, sort_keys=False)]
        else:
            args += expand_config_bases(["--config", str(path)])
    return instantiate_cli(LightningCLI, args).model


def load_trained_module(ckpt: Path, configs: Sequence[str | Path], adapter_check: Callable[[Any], None] | None = None):
    """Build the module from ``configs`` and load the checkpoint into it (strictly, as ``--ckpt_path`` does).

    The checkpoint is read first (:func:`avmt.cli.read_checkpoint`: a bad file is a
    :class:`UserError` naming it); ``adapter_check(module)`` runs before its weights are loaded.
    """
    from avmt.cli import read_checkpoint

    checkpoint = read_checkpoint(ckpt, "--ckpt", require=("state_dict", "avmt"))
    module = build_module(configs)
    if adapter_check is not None:
        adapter_check(module)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    return module, checkpoint


def _class_path(obj: Any) -> str:
    import avmt.adapters

    name = type(obj).__name__
    return f"avmt.adapters.{name}" if getattr(avmt.adapters, name, None) is type(obj) else f"{type(obj).__module__}.{name}"


def check_exportable(module) -> None:
    """ValueError unless the module's adapter is plain LoRA (``avmt.adapters.LoRA``) on the LLM."""
    from avmt.adapters import LoRA

    adapter = module.model.adapter
    if adapter is None:
        raise UserError(
            "export peft: the run has no adapter (model.adapter: null); a peft adapter folder needs "
            "avmt.adapters.LoRA on the llm scope"
        )
    if not isinstance(adapter, LoRA):
        kind = {"ILoRA": "shared A with K token-routed B heads", "MoELoRA": "K LoRA experts behind a router"}.get(
            type(adapter).__name__, "not peft's LoRA"
        )
        raise UserError(
            f"export peft: the run's adapter is {_class_path(adapter)} ({kind}), which peft's LoRA format cannot "
            "hold; only avmt.adapters.LoRA exports to peft (the avmt checkpoint itself keeps the adapter)"
        )
    if "llm" not in adapter.scopes:
        raise UserError(f"export peft: the LoRA adapter has no 'llm' scope (scopes: {adapter.scopes}); nothing of the LLM to export")


# ---------------------------------------------------------------------------- the LLM pieces
def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _plain_base(lm: nn.Module) -> nn.Module:
    """A copy of the avmt LLM as transformers built it: adapter layers unwrapped, split embedding and
    head replaced by their base modules, ``config.vocab_size`` back to the base's rows."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from avmt.llm import SplitEmbedding, SplitLMHead

    base = copy.deepcopy(lm)
    for name, sub in list(base.named_modules()):
        if isinstance(sub, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name) if parent_name else base, child, sub.get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
    embedding = base.get_input_embeddings()
    if isinstance(embedding, SplitEmbedding):
        base.set_input_embeddings(embedding.base)
    head = base.get_output_embeddings()
    if isinstance(head, SplitLMHead):
        base.set_output_embeddings(head.base)
    rows = int(base.get_input_embeddings().weight.shape[0])
    config = base.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_config.vocab_size = rows
    config.vocab_size = rows
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return base


def _trained_modules(lm: nn.Module, adapter) -> list[str]:
    """Qualified names (in the plain transformers model) of the base modules the run trained in full
    (``llm.train_modules``); the new token rows and the adapter's own parameters are not counted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from avmt.llm import SplitEmbedding, SplitLMHead

    wrappers = (SplitEmbedding, SplitLMHead, BaseTunerLayer)
    skipped = {id(p) for p in adapter.trainable_parameters()}
    skipped |= {id(p) for m in lm.modules() if isinstance(m, (SplitEmbedding, SplitLMHead)) for p in m.parameters(recurse=False)}
    lora_targets = {name[len("llm.") :] for name in adapter.injected() if name.startswith("llm.")}
    trained: list[str] = []
    for name, parameter in lm.named_parameters():
        if not parameter.requires_grad or id(parameter) in skipped:
            continue
        module_name = name.rpartition(".")[0]
        parent_name, _, child = module_name.rpartition(".")
        if child in ("base", "base_layer") and isinstance(lm.get_submodule(parent_name), wrappers):
            module_name = parent_name  # the wrapped module keeps its transformers name in the plain model
        if module_name in lora_targets:
            raise UserError(
                f"export peft: {module_name} is trained both in full (llm.train_modules) and with LoRA; "
                "peft's format cannot hold both"
            )
        trained.append(module_name)
    return list(dict.fromkeys(trained))


def _probe_ids(llm, length: int = 24) -> torch.Tensor:
    """``[1, length + n]`` ids: ordinary tokens spread over the base vocabulary, then every new token."""
    base = torch.linspace(0, llm.base_vocab_size - 1, steps=length).long()
    return torch.cat([base, torch.tensor(llm.new_token_ids, dtype=torch.long)]).unsqueeze(0)


# ---------------------------------------------------------------------------- export
def export_peft(module, out: Path, ckpt: Path | None = None, configs: Sequence[str] = (),
                side_tensors: dict[str, torch.Tensor] | None = None, check: bool = True) -> dict[str, Any]:
    """Write the LLM of a trained plain-LoRA module as a peft adapter folder (see the module docstring).

    Args:
        module: the trained :class:`~avmt.module.AVModule` (adapter ``avmt.adapters.LoRA`` on ``llm``).
        out: output folder (created).
        ckpt, configs: where the run came from (recorded in ``avmt_export.json``).
        side_tensors: checkpoint tensors outside the LLM (connectors, heads, encoders, time codes),
            written to ``avmt_extras.safetensors``; ``None`` = nothing written.
        check: compare the peft model's logits with the avmt LLM's on a probe ``[1, L]``.
    Returns:
        the ``avmt_export.json`` content.
    """
    from peft import get_peft_model
    from peft.utils import ModulesToSaveWrapper
    from safetensors.torch import save_file

    from avmt.llm import SplitLMHead

    check_exportable(module)
    llm = module.model.llm
    adapter = module.model.adapter
    lm = llm.model
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = llm.vocab_size
    new_ids = list(llm.new_token_ids)

    modules_to_save = _trained_modules(lm, adapter)
    names = _module_names(lm)
    embedding = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    embedding_name = names[id(embedding)]
    head_name = names[id(head)] if head is not None else None
    tied = isinstance(head, SplitLMHead) and head._tied is not None
    if embedding_name in modules_to_save and tied and head_name not in modules_to_save:
        modules_to_save.append(head_name)  # the tied head was trained with the embedding
    token_rows: dict[str, list[int]] = {}
    if new_ids and embedding_name not in modules_to_save:
        token_rows[embedding_name] = new_ids
    head_has_bias = head is not None and getattr(getattr(head, "base", head), "bias", None) is not None
    if new_ids and head is not None and head_name not in modules_to_save and not tied:
        if head_has_bias:  # peft's token rows of a Linear drop its bias: train the whole head instead
            modules_to_save.append(head_name)
        else:
            token_rows[head_name] = new_ids

    base = _plain_base(lm)
    base_rows = int(base.get_input_embeddings().weight.shape[0])
    if llm.pretrained:
        base_name = str(llm.model_name)
        written_base = False
    else:
        base.save_pretrained(out / "base_model")
        base_name = str((out / "base_model").resolve())
        written_base = True
    # the exported model: the base resized to the run's vocabulary, every row the run used in place
    base.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        base.get_input_embeddings().weight.copy_(embedding.weight.detach().to(base.get_input_embeddings().weight.dtype))
        if head is not None and not tied:
            base.get_output_embeddings().weight.copy_(head.weight.detach().to(base.get_output_embeddings().weight.dtype))
    lora_names = sorted(name[len("llm.") :] for name in adapter.injected() if name.startswith("llm."))
    config = adapter.peft_config(lora_names)
    config.task_type = "CAUSAL_LM"
    config.base_model_name_or_path = base_name
    config.modules_to_save = list(modules_to_save) or None
    config.trainable_token_indices = dict(token_rows) or None
    base.name_or_path = base_name  # get_peft_model records the model's own name as the base
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    wrapped = [name for name, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    if sorted(wrapped) != sorted(modules_to_save):  # peft matches modules_to_save by name suffix
        raise RuntimeError(f"export peft: peft wrapped {wrapped} for modules_to_save {modules_to_save}")
    targets = dict(inner.named_parameters())
    tag = f".{adapter.adapter_name}."
    copied = 0
    with torch.no_grad():
        for name, parameter in lm.named_parameters():
            if ".lora_" not in name:
                continue
            key = name.replace(tag, ".default.")
            if key not in targets:
                raise RuntimeError(f"export peft: the peft model has no parameter {key} for the run's {name}")
            targets[key].copy_(parameter.detach().to(targets[key].dtype))
            copied += 1
    peft_lora = sum(1 for name in targets if ".lora_" in name)
    if copied != peft_lora:
        raise RuntimeError(f"export peft: copied {copied} LoRA tensors but the peft model has {peft_lora}")
    peft_model.eval()

    difference = None
    if check:
        probe = _probe_ids(llm)
        mask = torch.ones_like(probe)
        with torch.no_grad():
            expected = llm(llm.embed(probe), mask).logits.float()
            found = peft_model(input_ids=probe, attention_mask=mask).logits.float()
        difference = float((expected - found[..., : expected.shape[-1]]).abs().max())
        if llm.base_dtype is None and next(base.parameters()).dtype == torch.float32 and difference > CHECK_TOLERANCE:
            raise RuntimeError(
                f"export peft: the peft model's logits differ from the avmt LLM's by {difference:.3g} "
                f"(tolerance {CHECK_TOLERANCE}); the export is wrong, please report it"
            )

    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    llm.tokenizer.save_pretrained(str(out))
    side: dict[str, Any] | None = None
    if side_tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in side_tensors.items()}, str(out / SIDE_FILE),
                  metadata={"format": "pt", "what": "avmt AVModule state_dict entries outside model.llm"})
        parts: dict[str, int] = {}
        for key in side_tensors:
            part = key.split(".")[1] if key.startswith("model.") and key.count(".") >= 2 else key.split(".")[0]
            parts[part] = parts.get(part, 0) + 1
        side = {"file": SIDE_FILE, "tensors_by_part": parts}
    info = {
        "format": EXPORT_FORMAT,
        "checkpoint": None if ckpt is None else str(Path(ckpt).resolve()),
        "configs": [str(Path(c).resolve()) for c in configs],
        "base_model": {
            "name_or_path": base_name,
            "gguf_file": llm.gguf_file if llm.pretrained else None,
            "written_here": written_base,
            "vocab_rows": base_rows,
        },
        "resize_token_embeddings": vocab_size,
        "tokenizer": ".",
        "new_tokens": {token: int(i) for token, i in zip(llm.tokenizer.convert_ids_to_tokens(new_ids), new_ids)},
        "end_of_turn_id": llm.end_of_turn_id,
        "stop_token_ids": list(llm.stop_token_ids),
        "system_prompt": llm.system_prompt,
        "lora": {"r": adapter.r, "alpha": adapter.alpha, "use_rslora": adapter.use_rslora, "layers": len(lora_names)},
        "modules_to_save": list(modules_to_save),
        "trainable_token_indices": token_rows,
        "not_in_peft": side,
        "other_adapter_scopes": [s for s in adapter.scopes if s != "llm"],
        "check": {"max_abs_logit_difference": difference, "probe_tokens": int(_probe_ids(llm).shape[1])} if check else None,
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    (out / "README.md").write_text(_readme(info))
    return info


def load_exported(folder: str | Path, **from_pretrained_kwargs: Any):
    """Load an export with peft and transformers only (what ``README.md`` of the export shows).

    Returns:
        ``(peft_model, tokenizer)``: a ``PeftModelForCausalLM`` in eval mode whose logits over
        ``input_ids [B, L]`` are ``[B, L, len(tokenizer)]``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: not a folder written by `python -m avmt export peft`")
    info = json.loads(info_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base_info = info["base_model"]
    kwargs = dict(from_pretrained_kwargs)
    if base_info.get("gguf_file"):
        kwargs.setdefault("gguf_file", base_info["gguf_file"])
    base = AutoModelForCausalLM.from_pretrained(base_info["name_or_path"], **kwargs)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return PeftModel.from_pretrained(base, str(folder)).eval(), tokenizer


def _readme(info: dict[str, Any]) -> str:
    base = info["base_model"]
    gguf = f', gguf_file="{base["gguf_file"]}"' if base.get("gguf_file") else ""
    where = "written to base_model/, as it exists only in the avmt checkpoint" if base["written_here"] else "the pretrained LLM"
    lines = [
        "# avmt LoRA run exported to peft",
        "",
        f"Base LLM: `{base['name_or_path']}` ({where}). The tokenizer here holds the new tokens "
        f"{', '.join(info['new_tokens']) or '(none)'} at the ids the run used; resize the base to "
        f"`len(tokenizer)` = {info['resize_token_embeddings']} before loading the adapter.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        f'base = AutoModelForCausalLM.from_pretrained("{base["name_or_path"]}"{gguf})',
        "base.resize_token_embeddings(len(tokenizer), mean_resizing=False)",
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER").eval()',
        "```",
        "",
        "(`avmt.export.load_exported(folder)` does the same.) Contents:",
        "",
        f"- LoRA (r={info['lora']['r']}, alpha={info['lora']['alpha']}) on {info['lora']['layers']} LLM projections;",
        f"- modules trained in full (peft `modules_to_save`): {', '.join(info['modules_to_save']) or 'none'};",
        "- new token rows only (peft `trainable_token_indices`): "
        + (", ".join(f"{k}: {v}" for k, v in info["trainable_token_indices"].items()) or "none") + ";",
        f"- chat: training targets end with token id {info['end_of_turn_id']}; stop generation at {info['stop_token_ids']}"
        + (f"; system prompt: {info['system_prompt']!r}" if info["system_prompt"] is not None else "") + ".",
    ]
    if info["not_in_peft"]:
        lines += [
            "",
            f"Not part of the LLM, so not in peft's format: {', '.join(info['not_in_peft']['tensors_by_part'])} — "
            f"their checkpoint tensors are in `{info['not_in_peft']['file']}` (keys as in the avmt checkpoint's "
            "state_dict); the avmt checkpoint and its config rebuild the whole model.",
        ]
    if info["check"]:
        lines += ["", f"Checked at export: max |logit difference| to the avmt LLM = {info['check']['max_abs_logit_difference']:.3g}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avmt export", description="Export a trained run to other formats.")
    sub = parser.add_subparsers(dest="format", required=True)
    p = sub.add_parser("peft", help="a plain-LoRA run's LLM as a peft adapter folder",
                       description="Write the LLM of a plain-LoRA (avmt.adapters.LoRA) run in peft's format.")
    p.add_argument("--ckpt", type=Path, required=True, help="the run's checkpoint (e.g. .../checkpoints/last.ckpt)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("-c", "--config", action="append", default=None,
                   help="the run's config (default: the config.yaml LightningCLI saved next to the checkpoint's run)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the logits comparison with the avmt model")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m avmt export peft --ckpt CKPT --out DIR``; returns the ``avmt_export.json`` content."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    ckpt: Path = args.ckpt
    if not ckpt.is_file():  # before looking for its run's config.yaml
        raise UserError(f"--ckpt: no such checkpoint file: {ckpt}")
    configs = args.config or [str(find_run_config(ckpt))]
    module, checkpoint = load_trained_module(ckpt, configs, adapter_check=check_exportable)
    side = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.llm.")}
    info = export_peft(module, args.out, ckpt=ckpt, configs=configs, side_tensors=side, check=args.check)
    print(f"wrote a peft adapter folder to {args.out}: adapter_config.json, adapter_model.safetensors, tokenizer, "
          f"{INFO_FILE}, README.md" + (", base_model/" if info["base_model"]["written_here"] else ""))
    print(f"  base LLM: {info['base_model']['name_or_path']}"
          + (f" (gguf_file {info['base_model']['gguf_file']})" if info["base_model"]["gguf_file"] else "")
          + f"; resize its embeddings to {info['resize_token_embeddings']} before PeftModel.from_pretrained")
    print(f"  LoRA layers: {info['lora']['layers']}; modules_to_save: {info['modules_to_save'] or 'none'}; "
          f"trainable_token_indices: {info['trainable_token_indices'] or 'none'}")
    if info["not_in_peft"]:
        parts = ", ".join(f"{k} ({n} tensors)" for k, n in info["not_in_peft"]["tensors_by_part"].items())
        print(f"  NOT in peft's format (not part of the LLM), written to {args.out / SIDE_FILE}: {parts}")
    if info["other_adapter_scopes"]:
        print(f"  the LoRA of scope(s) {info['other_adapter_scopes']} lives in those encoders' tensors in {SIDE_FILE}")
    if info["check"]:
        print(f"  check: max |logit difference| to the avmt LLM = {info['check']['max_abs_logit_difference']:.3g}")
    return info


if __name__ == "__main__":
    main()
