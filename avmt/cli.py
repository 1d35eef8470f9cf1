"""``python -m avmt``: LightningCLI (fit/validate/test/predict) plus the ``data`` and ``plugins`` commands.

* ``python -m avmt fit -c experiments/ilora.yaml`` — train; several ``-c`` merge in order.
* ``python -m avmt data synth --out DIR --clips N --seed S`` — write AVSynth shards.
* ``python -m avmt data convert FORMAT --src DIR --out DIR`` — convert a real dataset into shards.
* ``python -m avmt plugins`` — list the plugins of every kind and the tasks.
* ``python -m avmt inspect -c CONFIG`` — build the model on the meta device and count its parameters per part.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from avmt.errors import UserError
from avmt.plugins import MODULE_ARGUMENTS, PLUGIN_KINDS, check_class_path, list_plugins

# what a mistake the user can fix raises: one line on stderr and exit 2 (AVMT_DEBUG=1: traceback).
# Lightning says so with MisconfigurationException (e.g. enable_checkpointing=false with a ModelCheckpoint),
# and a FileNotFoundError names a path the user gave. Every other exception is a bug and keeps its traceback.
USER_ERRORS = (UserError, MisconfigurationException, FileNotFoundError)

#: ``ckpt_path`` values that Lightning resolves itself (not a file name).
_CHECKPOINT_KEYWORDS = ("last", "best", "hpc", "registry")


def read_checkpoint(path: str | Path, key: str, require: tuple[str, ...] = (), lazy: bool = False) -> Any:
    """The content of the torch checkpoint ``path``, loaded with ``torch.load(weights_only=True)``.

    Every way the file can be unusable is a :class:`UserError` naming ``key`` (the option that gave
    the file: ``ckpt_path``, ``--weights``, ...) and ``path``: missing, not a torch file,
    truncated (a torch checkpoint is a zip archive whose directory sits at its end), pickled
    globals outside torch's weights-only allow-list (code that loading would run; the pickle's
    opcodes are read, nothing runs), or not a dict holding the ``require`` keys. An avmt
    checkpoint is required with ``require`` holding ``"avmt"`` (its metadata format is checked).

    Args:
        lazy: memory-map the tensors of a zip checkpoint instead of reading them (a check).
    """
    import pickle
    import re
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: no such checkpoint file: {path}")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    else:
        with path.open("rb") as handle:
            head = handle.read(2)
        if head == b"PK":
            raise UserError(f"{key}: {path} is truncated or damaged (an incomplete torch checkpoint)")
        if head[:1] != b"\x80":  # torch's legacy (pre-zip) format is a pickle stream
            raise UserError(f"{key}: {path} is not a torch checkpoint (.ckpt/.pt/.bin) file")
        unsafe = []
    try:
        if not unsafe:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy and is_zip)
    except pickle.UnpicklingError as error:  # a legacy file's unsafe globals are found while loading
        unsafe = re.findall(r"Unsupported global: GLOBAL (\S+)", str(error)) or ["unknown"]
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as error:
        raise UserError(f"{key}: {path} could not be read as a torch checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else 'damaged'})") from error
    if unsafe:
        raise UserError(
            f"{key}: {path} holds pickled objects that are not plain weights ({', '.join(unsafe[:5])}); avmt "
            "loads checkpoints with torch.load(weights_only=True) and never unpickles them"
        )
    missing = [name for name in require if not isinstance(content, dict) or name not in content]
    if missing:
        what = "an avmt checkpoint" if "avmt" in require else "a Lightning checkpoint"
        raise UserError(f"{key}: {path} is not {what} (it lacks {', '.join(repr(m) for m in missing)})")
    if "avmt" in require:
        from avmt.module import CHECKPOINT_FORMAT

        meta = content["avmt"]
        found = meta.get("format") if isinstance(meta, dict) else None
        if found != CHECKPOINT_FORMAT:
            raise UserError(f"{key}: {path} holds avmt metadata of format {found!r}; this avmt reads {CHECKPOINT_FORMAT!r}")
    return content


#: what ``--ckpt_path`` must hold: Lightning reads the first two, :class:`~avmt.module.AVModule` the last.
CHECKPOINT_KEYS = ("state_dict", "pytorch-lightning_version", "avmt")


def check_checkpoint_file(ckpt_path: str | None) -> None:
    """Raise :class:`UserError` naming ``ckpt_path`` when it is not an avmt checkpoint Lightning can
    load (:func:`read_checkpoint`, tensors memory-mapped, not read).

    Lightning's keywords (``last``, ``best``, ...) and remote URLs are left to Lightning.
    """
    if not ckpt_path or ckpt_path.split(":")[0] in _CHECKPOINT_KEYWORDS or "://" in ckpt_path:
        return
    read_checkpoint(ckpt_path, "ckpt_path", require=CHECKPOINT_KEYS, lazy=True)


class AVCLI(LightningCLI):
    """Lightning's CLI, parsing the expanded arguments of :func:`main` and checking ``ckpt_path`` before use.

    ``sys.argv`` keeps what the user typed: Lightning's DDP launcher starts the other ranks with it,
    and each rank expands the ``config:`` bases again (see :func:`expand_config_bases`).
    """

    def init_parser(self, **kwargs: Any) -> Any:
        """Lightning's parser (and each subcommand's), raising on a bad argument instead of printing its usage."""
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse ``args`` into ``self.config``; an unknown key, a value of the wrong type or a bad
        ``ckpt_path`` is a :class:`UserError` of one line."""
        try:
            self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        except ArgumentError as error:
            command = next((arg for arg in args if arg in self.subcommands()), None) if isinstance(args, list) else None
            raise UserError(
                f"{' '.join(str(error).split())} (every option: python -m avmt {command or 'fit'} --help)"
            ) from error
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))


class ConfigToTensorBoard(SaveConfigCallback):
    """Saves ``config.yaml`` in the log dir (Lightning's default) and the resolved config as TensorBoard text."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            text = self.parser.dump(self.config, skip_none=False)
            trainer.logger.experiment.add_text("config", f"```yaml\n{text}\n```", 0)


def load_config_file(path: Path) -> Any:
    """The parsed YAML of the config file ``path``; a :class:`UserError` naming the file when it is not valid YAML."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from error


def _argv_settings(argv: list[str]) -> Iterator[tuple[str | None, Any]]:
    """What a command line sets, in order: ``(None, loaded dict)`` for each ``-c``/``--config``
    file (or inline YAML), ``(key, value)`` for each ``--key=value`` or ``--key value`` flag
    (``key`` without its dashes; the value is the next argument when there is no ``=``)."""
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("-c", "--config") and index + 1 < len(argv) or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else argv[index + 1]
            index += 0 if "=" in arg else 1
            loaded = (yaml.safe_load(value) if "\n" in value else load_config_file(Path(value))) or {}
            yield None, loaded if isinstance(loaded, dict) else {}
        elif arg.startswith("--"):
            key, equals, value = arg[2:].partition("=")
            yield key, value if equals else (argv[index + 1] if index + 1 < len(argv) else "")
        index += 1


def _config_class_paths(argv: list[str]) -> list[tuple[str, str]]:
    """``(model argument, class_path)`` pairs named by the ``-c`` files and ``--model.X.class_path`` flags."""
    found: list[tuple[str, str]] = []

    def from_model_section(section: Any) -> None:
        if not isinstance(section, dict):
            return
        section = section.get("init_args", section)
        for argument in MODULE_ARGUMENTS:
            value = section.get(argument) if isinstance(section, dict) else None
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict) and isinstance(item.get("class_path"), str):
                    found.append((argument, item["class_path"]))
                elif isinstance(item, str) and "." in item:
                    found.append((argument, item))

    for key, value in _argv_settings(argv):
        if key is None:
            from_model_section(value.get("model"))
        elif key.startswith("model."):
            parts = key.split(".")
            if len(parts) >= 2 and parts[1] in MODULE_ARGUMENTS and (len(parts) == 2 or parts[2] == "class_path"):
                if "." in value:
                    found.append((parts[1], value))
    return found


def instantiate_cli(cli_class: type[LightningCLI], args: list[str]) -> LightningCLI:
    """``cli_class(AVModule, AVDataModule, run=False, save_config_callback=None, args=args)``, built in-process.

    LightningCLI reads ``args`` only, and warns when ``sys.argv`` holds other arguments (those of the command
    that called this), so ``sys.argv`` is cut to the program name while it is built.
    """
    from avmt.data.datamodule import AVDataModule
    from avmt.module import AVModule

    command_line = sys.argv
    sys.argv = command_line[:1]
    try:
        return cli_class(AVModule, AVDataModule, run=False, save_config_callback=None, args=args)
    finally:
        sys.argv = command_line


def expand_config_bases(argv: list[str]) -> list[str]:
    """Replace ``-c exp.yaml`` whose file starts from ``config: base.yaml`` by ``-c base.yaml -c <exp without that key>``.

    An experiment YAML names its shared base with a top-level ``config`` key (a path relative to
    the file, or a list of them); bases may have bases. Later files override earlier ones, as
    with several ``-c`` on the command line.
    """

    def expand(path: Path, seen: tuple[Path, ...]) -> list[str]:
        path = path.resolve()
        if path in seen:
            raise UserError(f"config files include each other: {' -> '.join(str(p) for p in (*seen, path))}")
        loaded = load_config_file(path) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path} holds a YAML {type(loaded).__name__}, not a mapping of sections "
                            "(trainer:, model:, data:)")
        if "config" not in loaded:
            return [str(path)]
        bases = loaded.pop("config")
        expanded: list[str] = []
        for base in [bases] if isinstance(bases, str) else list(bases):
            expanded += expand(path.parent / base, (*seen, path))
        return [*expanded, yaml.safe_dump(loaded, sort_keys=False)] if loaded else expanded

    out: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("-c", "--config") and index + 1 < len(argv):
            out += [item for config in expand(Path(argv[index + 1]), ()) for item in (arg, config)]
            index += 2
            continue
        if arg.startswith("--config="):
            out += [item for config in expand(Path(arg.split("=", 1)[1]), ()) for item in ("--config", config)]
        else:
            out.append(arg)
        index += 1
    return out


#: trainer.strategy (class path, or registry name prefix) -> the package it needs beyond avmt's own
STRATEGY_PACKAGES = {
    "lightning.pytorch.strategies.DeepSpeedStrategy": "deepspeed",
    "deepspeed": "deepspeed",
}


def _config_strategies(argv: list[str]) -> list[str]:
    """Every ``trainer.strategy`` the command line sets (a name or a class path), in ``-c`` files
    (already expanded by :func:`expand_config_bases`) and ``--trainer.strategy[.class_path]`` flags."""
    found: list[str] = []

    def add(value: Any) -> None:
        value = value.get("class_path") if isinstance(value, dict) else value
        if isinstance(value, str):
            found.append(value)

    for key, value in _argv_settings(argv):
        if key is None and isinstance(value.get("trainer"), dict):
            add(value["trainer"].get("strategy"))
        elif key in ("trainer.strategy", "trainer.strategy.class_path"):
            add(value)
    return found


def check_strategy_packages(argv: list[str]) -> None:
    """Fail early, naming the package to install, when ``trainer.strategy`` needs one that is missing
    (Lightning's own error reaches the user only as a nested ValueError after the config is parsed).
    ``--print_config`` only parses, so it is let through."""
    import importlib.util

    if any(arg.split("=", 1)[0] == "--print_config" for arg in argv):
        return
    for strategy in _config_strategies(argv):
        for prefix, package in STRATEGY_PACKAGES.items():
            if strategy.startswith(prefix) and importlib.util.find_spec(package) is None:
                raise UserError(f"trainer.strategy {strategy} needs the {package} package, which is not installed: "
                                f"pip install {package}")


def check_plugins(argv: list[str]) -> None:
    """Fail early, with the valid choices, when a config names an unknown plugin class."""
    for argument, class_path in _config_class_paths(argv):
        check_class_path(MODULE_ARGUMENTS[argument], class_path, f"model.{argument}.class_path")


def synth_parser() -> ArgumentParser:
    """Arguments of ``python -m avmt data synth``."""
    from avmt.data.synth import SynthConfig

    synth = ArgumentParser(description="Write AVSynth shards (train/val/test) and a manifest into --out.")
    synth.add_argument("--out", type=str, required=True, help="output folder")
    synth.add_argument("--clips", type=int, default=2000, help="training clips")
    synth.add_argument("--val_clips", type=int | None, default=None, help="validation clips (default: clips/10)")
    synth.add_argument("--test_clips", type=int | None, default=None, help="test clips (default: clips/10)")
    synth.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same bytes)")
    synth.add_class_arguments(SynthConfig, "synth", help="generator knobs")
    return synth


def synth_run(args: Any) -> None:
    """Run ``python -m avmt data synth`` with its parsed arguments."""
    from avmt.data.shards import synthesize
    from avmt.data.synth import SynthConfig

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out '{args.out}' is a file; the shards go into a folder")
    held_out = max(1, args.clips // 10)
    clips = {
        "train": args.clips,
        "val": args.val_clips if args.val_clips is not None else held_out,
        "test": args.test_clips if args.test_clips is not None else held_out,
    }
    config = SynthConfig(**dict(args.synth))
    shards = synthesize(Path(args.out), clips, args.seed, config, progress=True)
    for split, paths in shards.items():
        print(f"{split}: {clips[split]} clips in {len(paths)} shard(s) under {Path(args.out) / split}")


#: ``python -m avmt data NAME``: NAME -> ("module:parser_function", "module:run_function", help).
#: A parser function returns a jsonargparse ``ArgumentParser``; the run function gets its parsed namespace.
DATA_COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("avmt.cli:synth_parser", "avmt.cli:synth_run", "generate AVSynth shards"),
    "convert": ("avmt.data.converters.command:convert_parser", "avmt.data.converters.command:convert_run",
                "convert a dataset (AVE, MUSIC-AVQA, LLP, AVSBench, Ref-AVS, AV-UIE) into shards"),
    "features": ("avmt.data.features:features_parser", "avmt.data.features:features_run",
                 "cache the frozen encoders' features of the clip shards (for data.features)"),
}


def _resolve(reference: str) -> Any:
    import importlib

    module_name, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def data_main(argv: list[str]) -> None:
    """``python -m avmt data COMMAND ...``: the commands of :data:`DATA_COMMANDS`."""
    parser = ArgumentParser(prog="python -m avmt data", description="Data utilities.")
    commands = parser.add_subcommands(dest="command")
    for name, (build, _, help_text) in DATA_COMMANDS.items():
        commands.add_subcommand(name, _resolve(build)(), help=help_text)
    cfg = parser.parse_args(argv)
    if cfg.command not in DATA_COMMANDS:
        parser.error(f"choose a data command: {', '.join(DATA_COMMANDS)}")
    _resolve(DATA_COMMANDS[cfg.command][1])(cfg[cfg.command])


def load_tensors(path: Path, key: str = "--weights") -> dict:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (:func:`read_checkpoint`; a nested
    ``state_dict`` is unwrapped); a :class:`UserError` naming ``key`` and the file when it is unusable."""
    if not path.is_file():
        raise UserError(f"{key}: weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise UserError(f"{key}: {path} is not a readable .safetensors file ({error})") from error
    state = read_checkpoint(path, key)
    for name in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(name), dict):
            state = state[name]
    if not isinstance(state, dict):
        raise UserError(f"{key}: {path} holds a {type(state).__name__}, not a dict of named tensors")
    return state


def convert_main(argv: list[str]) -> None:
    """``python -m avmt convert crab-lora``: Crab's released I-LoRA weights → an avmt checkpoint."""
    import lightning
    import torch

    from avmt.adapters import ILoRA, convert_crab_state_dict
    from avmt.export import build_module

    parser = ArgumentParser(prog="python -m avmt convert", description="Weight converters.")
    commands = parser.add_subcommands(dest="command")
    crab = ArgumentParser(description="Map Crab's lora_A / lora_B{i} / lora_route weights onto this config's I-LoRA layers.")
    crab.add_argument("--weights", type=str, required=True, help="Crab weights (.bin/.pt/.pth/.safetensors)")
    crab.add_argument("--config", "-c", type=str, action="append", required=True, help="experiment YAML(s) with an I-LoRA adapter")
    crab.add_argument("--out", type=str, required=True, help="output avmt checkpoint (.ckpt), usable with --ckpt_path")
    crab.add_argument("--ignore_other_keys", type=bool, default=True, help="skip non-LoRA keys (projectors, ...)")
    commands.add_subcommand("crab-lora", crab, help="convert Crab / Crab+ I-LoRA weights")
    cfg = parser.parse_args(argv)
    args = cfg["crab-lora"]
    weights = load_tensors(Path(args.weights))
    module = build_module(args.config)
    adapter = module.model.adapter
    if not isinstance(adapter, ILoRA):
        raise UserError(
            f"convert crab-lora needs model.adapter to be avmt.adapters.ILoRA, the config has {type(adapter).__name__}"
        )
    state = convert_crab_state_dict(weights, adapter, ignore_other_keys=args.ignore_other_keys)
    adapter.load_adapter_state_dict(state)
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)
    print(f"converted {len(state)} tensors of {len(adapter.injected())} I-LoRA layers into {args.out}")


def plugins_main(argv: list[str]) -> None:
    """``python -m avmt plugins``: list every plugin kind's implementations, the tasks and the
    dataset formats of ``data convert``."""
    from avmt.data.converters import get_converter, list_converters
    from avmt.tasks import list_tasks

    for kind in PLUGIN_KINDS:
        print(f"{kind}:")
        for class_path in list_plugins(kind):
            print(f"  {class_path}")
    print("task:")
    for name in list_tasks():
        print(f"  {name}")
    print("dataset format (python -m avmt data convert FORMAT):")
    for name in list_converters():
        print(f"  {name:12s} {get_converter(name).description}")


#: ``python -m avmt NAME ...`` besides Lightning's fit/validate/test/predict: NAME -> "module:function",
#: the function called with the remaining arguments (imported only when its command runs).
COMMANDS: dict[str, str] = {
    "data": "avmt.cli:data_main",
    "convert": "avmt.cli:convert_main",
    "plugins": "avmt.cli:plugins_main",
    "inspect": "avmt.inspect:main",
    "bench": "avmt.bench:main",
    "grid": "avmt.grid:main",
    "report": "avmt.report:main",
    "export": "avmt.export:main",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m avmt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if argv and argv[0] in COMMANDS:
            _resolve(COMMANDS[argv[0]])(argv[1:])
        else:
            from avmt.data.datamodule import AVDataModule
            from avmt.module import AVModule

            # sys.argv is left as typed: DDP's launcher re-runs it for the other ranks, which expand it alike
            argv = expand_config_bases(argv)
            check_plugins(argv)
            check_strategy_packages(argv)
            AVCLI(
                AVModule,
                AVDataModule,
                save_config_callback=ConfigToTensorBoard,
                save_config_kwargs={"overwrite": True},
                args=argv,
            )
    except Exception as error:
        user_error = user_error_of(error)
        if user_error is None or os.environ.get("AVMT_DEBUG"):
            raise
        print(f"avmt: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def user_error_of(error: BaseException) -> BaseException | None:
    """The user's mistake behind ``error``, or None when ``error`` is a bug (it then keeps its traceback).

    ``error`` itself when it is one of :data:`USER_ERRORS`; jsonargparse reports a plugin's
    :class:`UserError` under an ``Optional`` argument as a plain ``ValueError`` raised *from* it,
    so the chain of causes of a ``ValueError`` is searched too.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, USER_ERRORS):
            return error
        if not isinstance(error, ValueError):
            return None
        seen.add(id(error))
        error = error.__cause__
    return None
