"""``python -m avmt``: LightningCLI (fit/validate/test/predict) plus the ``data`` and ``plugins`` commands.

* ``python -m avmt fit -c experiments/ilora.yaml`` — train; several ``-c`` merge in order.
* ``python -m avmt data synth --out DIR --clips N --seed S`` — write AVSynth shards.
* ``python -m avmt data convert FORMAT --src DIR --out DIR`` — convert a real dataset into shards.
* ``python -m avmt plugins`` — list the plugins of every kind and the tasks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from avmt.plugins import MODULE_ARGUMENTS, PLUGIN_KINDS, check_class_path, list_plugins

# what a wrong config or a missing file raises: one line on stderr and exit 2 (AVMT_DEBUG=1: traceback);
# Lightning says so with MisconfigurationException (e.g. enable_checkpointing=false with a ModelCheckpoint)
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, MisconfigurationException)


class ConfigToTensorBoard(SaveConfigCallback):
    """Saves ``config.yaml`` in the log dir (Lightning's default) and the resolved config as TensorBoard text."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            text = self.parser.dump(self.config, skip_none=False)
            trainer.logger.experiment.add_text("config", f"```yaml\n{text}\n```", 0)


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

    index = 0
    while index < len(argv):
        arg = argv[index]
        value = None
        if arg in ("-c", "--config") and index + 1 < len(argv):
            value, index = argv[index + 1], index + 1
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None:
            path = Path(value)
            loaded = yaml.safe_load(value if "\n" in value else path.read_text()) or {}
            if isinstance(loaded, dict):
                from_model_section(loaded.get("model"))
        elif arg.startswith("--model."):
            key, _, flag_value = arg[2:].partition("=")
            if not flag_value and index + 1 < len(argv):
                flag_value = argv[index + 1]
            parts = key.split(".")
            if len(parts) >= 2 and parts[1] in MODULE_ARGUMENTS and (len(parts) == 2 or parts[2] == "class_path"):
                if "." in flag_value:
                    found.append((parts[1], flag_value))
        index += 1
    return found


def expand_config_bases(argv: list[str]) -> list[str]:
    """Replace ``-c exp.yaml`` whose file starts from ``config: base.yaml`` by ``-c base.yaml -c <exp without that key>``.

    An experiment YAML names its shared base with a top-level ``config`` key (a path relative to
    the file, or a list of them); bases may have bases. Later files override earlier ones, as
    with several ``-c`` on the command line.
    """

    def expand(path: Path, seen: tuple[Path, ...]) -> list[str]:
        path = path.resolve()
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        if path in seen:
            raise ValueError(f"config files include each other: {' -> '.join(str(p) for p in (*seen, path))}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict) or "config" not in loaded:
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


def load_tensors(path: Path) -> dict:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (``weights_only``; a nested ``state_dict`` is unwrapped)."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def convert_main(argv: list[str]) -> None:
    """``python -m avmt convert crab-lora``: Crab's released I-LoRA weights → an avmt checkpoint."""
    import lightning
    import torch

    from avmt.adapters import ILoRA, convert_crab_state_dict
    from avmt.data.datamodule import AVDataModule
    from avmt.module import AVModule

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
    config_args = [item for path in args.config for item in ("-c", path)]
    cli = LightningCLI(
        AVModule, AVDataModule, run=False, save_config_callback=None, args=expand_config_bases(config_args)
    )
    module = cli.model
    adapter = module.model.adapter
    if not isinstance(adapter, ILoRA):
        raise ValueError(
            f"convert crab-lora needs model.adapter to be avmt.adapters.ILoRA, the config has {type(adapter).__name__}"
        )
    state = convert_crab_state_dict(load_tensors(Path(args.weights)), adapter, ignore_other_keys=args.ignore_other_keys)
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
    "bench": "avmt.bench:main",
    "grid": "avmt.grid:main",
    "report": "avmt.report:main",
    "export": "avmt.export:main",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m avmt``."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if argv and argv[0] in COMMANDS:
            _resolve(COMMANDS[argv[0]])(argv[1:])
        else:
            from avmt.data.datamodule import AVDataModule
            from avmt.module import AVModule

            argv = expand_config_bases(argv)
            check_plugins(argv)
            if from_command_line:
                sys.argv[1:] = argv
            LightningCLI(
                AVModule,
                AVDataModule,
                save_config_callback=ConfigToTensorBoard,
                save_config_kwargs={"overwrite": True},
                args=None if from_command_line else argv,
            )
    except USER_ERRORS as error:
        if os.environ.get("AVMT_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"avmt: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
