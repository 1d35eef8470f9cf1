"""The bad-input matrix: user mistakes and faults, each with the outcome it must have.

Outcomes:

* ``exit2``: ``python -m avmt`` (run in this process) exits with status 2 and prints one line,
  ``avmt: error: ...``, naming the key, file or sample (every expected fragment), no traceback.
  Cases that are not a command line run their code as a command of the CLI (:func:`as_command`),
  so the CLI's own error handling decides the exit status.
* ``counted_skip``: the run goes on; the bad sample is skipped, warned about by name and counted
  under its reason.
* ``error``: a run that diverged or saw no data stops with an exception naming why (not a user
  mistake: it keeps its traceback) and leaves no checkpoint.
* ``traceback``: an internal bug keeps its traceback (the exception reaches the caller unchanged).

Each case is one row of :data:`CASES` and one test id (``test_bad_input[<area>-<name>]``);
:func:`test_the_matrix_counts` prints the number of cases per outcome and per area
(``pytest tests/test_bad_inputs.py -q -rA``).
"""

from __future__ import annotations

import collections
import json
import math
import shutil
import tarfile
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import avmt.cli
from avmt.cli import main
from avmt.data.datamodule import AVDataModule
from avmt.data.requests import RequestDataset, load_requests
from avmt.data.shards import CorruptSampleWarning, encode_clip, ensure_shards, iter_clips, write_tar
from avmt.data.synth import SynthConfig, generate_scene, render_clip, render_masks
from avmt.errors import UserError
from avmt.module import AVModule, TrainingDiverged
from tests.data.test_media import write_audio, write_video
from tests.data.test_shard_sources import read_tar
from tests.test_module import T
from tests.test_module import tiny_module as module_of

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
BASE, ILORA, LORA = (str(EXPERIMENTS / name) for name in ("base.yaml", "ilora.yaml", "lora.yaml"))
TASKS = ["emotion", "action"]  # single-clip tasks: every clip is the anchor of its own group
OUTCOMES = ("exit2", "counted_skip", "error", "traceback")
AREAS = ("config", "data", "media", "checkpoint", "conversion", "fault", "bug")
#: the CLI command a non-command-line case runs as (see :func:`as_command`)
CASE_COMMAND = "bad-input-case"


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        name: the test id (with ``area``).
        area: what the mistake is in (:data:`AREAS`).
        outcome: what must happen (:data:`OUTCOMES`).
        setup: ``setup(env) -> argv | callable``: the command line to run (``exit2``), or the code
            to run (every outcome; for ``counted_skip`` it returns the :class:`Counted` it saw).
        expect: fragments the message must hold, formatted with ``env.paths`` (``{tmp}``, ...).
        counted: for ``counted_skip``: the counter's reasons (a subset must match exactly).
        kept: for ``counted_skip``: how many samples went through (``None``: not checked).
        xfail: the reason, when the case fails today because of a bug in a file owned elsewhere.
    """

    name: str
    area: str
    outcome: str
    setup: Callable[[Env], Any]
    expect: tuple[str, ...] = ()
    counted: dict[str, int] = field(default_factory=dict)
    xfail: str | None = None
    kept: int | None = None


@dataclass
class Counted:
    """What a run that skipped samples reports: the counter's reasons and keys, the warnings'
    text, and the samples that went through."""

    reasons: dict[str, int]
    keys: list[str]
    messages: str
    kept: list[str] = field(default_factory=list)


class Env:
    """A case's files: ``tmp`` (its own folder) and the module's tiny shards (copied on demand);
    ``monkeypatch`` for settings undone after the case."""

    def __init__(self, tmp: Path, shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.monkeypatch = monkeypatch
        self.clean_shards = shards
        self.paths = {"tmp": str(tmp), "shards": str(shards)}

    def shards(self) -> Path:
        """A private copy of the tiny shards (to damage)."""
        root = self.tmp / "shards"
        if not root.exists():
            shutil.copytree(self.clean_shards, root)
        self.paths["root"] = str(root)
        return root

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


CASES: list[Case] = []


def case(name: str, area: str, outcome: str, expect: tuple[str, ...] = (), counted: dict[str, int] | None = None,
         xfail: str | None = None, kept: int | None = None) -> Callable[[Callable[[Env], Any]], Callable[[Env], Any]]:
    """Decorator: add the decorated ``setup(env)`` to :data:`CASES`."""

    def add(setup: Callable[[Env], Any]) -> Callable[[Env], Any]:
        CASES.append(Case(name, area, outcome, setup, expect, dict(counted or {}), xfail, kept))
        return setup

    return add


def argv_case(name: str, area: str, expect: tuple[str, ...], argv: Callable[[Env], list[str]], xfail: str | None = None):
    """A command line that must exit 2 naming ``expect``."""
    CASES.append(Case(name, area, "exit2", argv, expect, {}, xfail))


# tiny runs of the default model on the tiny shards (validate/fit fail before any step)
def on_shards(env: Env, *extra: str, command: str = "fit", root: Path | None = None) -> list[str]:
    return [
        command, "-c", BASE, "--model.media_pretraining=null", "--trainer.logger=false",
        f"--data.root={root or env.clean_shards}", f"--model.num_segments={T}", f"--data.tasks={json.dumps(TASKS)}",
        "--trainer.max_steps=1", "--trainer.enable_progress_bar=false", "--model.max_generation_samples=1",
        f"--trainer.default_root_dir={env.tmp / 'run'}", *extra,
    ]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

argv_case("malformed_yaml", "config", ("{tmp}/broken.yaml", "not valid YAML"),
          lambda env: ["fit", "-c", str(env.write("broken.yaml", "model:\n  adapter: [unclosed\n"))])


@case("malformed_yaml_in_a_base", "config", "exit2", ("{tmp}/base.yaml",))
def _(env):
    env.write("base.yaml", "trainer: {max_steps: 1\n")
    return ["fit", "-c", str(env.write("experiment.yaml", "config: base.yaml\n"))]


argv_case("missing_config_file", "config", ("config file not found", "{tmp}/none.yaml"),
          lambda env: ["fit", "-c", str(env.tmp / "none.yaml")])


@case("config_bases_include_each_other", "config", "exit2", ("include each other", "{tmp}/a.yaml", "{tmp}/b.yaml"))
def _(env):
    env.write("b.yaml", "config: a.yaml\n")
    return ["fit", "-c", str(env.write("a.yaml", "config: b.yaml\n"))]


argv_case("config_file_is_a_list", "config", ("{tmp}/list.yaml", "not a mapping"),
          lambda env: ["fit", "-c", str(env.write("list.yaml", "- trainer\n- model\n"))])
argv_case("unknown_key_in_a_config_file", "config", ("model.no_such_key", "fit --help"),
          lambda env: on_shards(env, "-c", str(env.write("typo.yaml", "model:\n  no_such_key: 1\n"))))
argv_case("unknown_section_in_a_config_file", "config", ("no_such_section",),
          lambda env: on_shards(env, "-c", str(env.write("typo.yaml", "no_such_section: 1\n"))))
argv_case("unknown_flag", "config", ("--model.no_such_flag",), lambda env: on_shards(env, "--model.no_such_flag=3"))
argv_case("wrong_type_trainer", "config", ("trainer.max_epochs", "abc"),
          lambda env: on_shards(env, "--trainer.max_epochs=abc"))
argv_case("wrong_type_model", "config", ("model.learning_rate", "fast"),
          lambda env: on_shards(env, "--model.learning_rate=fast"))
argv_case("unknown_plugin_class", "config",
          ("model.vision_connector.class_path", "avmt.connectors.NoSuchConnector", "avmt.connectors.QFormerConnector"),
          lambda env: on_shards(env, "--model.vision_connector.class_path=avmt.connectors.NoSuchConnector"))
argv_case("plugin_argument_out_of_range", "config", ("r must be a positive integer",),
          lambda env: ["fit", "-c", ILORA, "--model.adapter.init_args.r=0", "--model.media_pretraining=null",
                       "--trainer.logger=false"])
argv_case("missing_llm_model_path", "config", ("model.llm.init_args.model", "{tmp}/nonexistent/path"),
          lambda env: ["fit", "-c", ILORA, f"--model.llm.init_args.model={env.tmp / 'nonexistent' / 'path'}",
                       "--model.media_pretraining=null", "--trainer.logger=false"])
argv_case("tasks_per_clip_0", "config", ("data.tasks_per_clip must be a whole number >= 1 or null",),
          lambda env: on_shards(env, "--data.tasks_per_clip=0"))
argv_case("unknown_task", "config", ("nosuchtask", "avqa"),
          lambda env: on_shards(env, "--data.tasks=[emotion,nosuchtask]"))
argv_case("generation_tasks_not_in_data_tasks", "config",
          ("model.generation_tasks ['emotion', 'avqa']", "['avqa']", "data.tasks ['emotion', 'action']"),
          lambda env: on_shards(env, "--model.generation_tasks=[emotion,avqa]"))
argv_case("num_segments_unlike_the_data", "config",
          ("model.num_segments is 10", f"the data has {T} segments", "{shards}/manifest.json"),
          lambda env: on_shards(env, "--model.num_segments=10"))
argv_case("unknown_nonfinite_policy", "config", ("model.nonfinite", "ignore"),
          lambda env: on_shards(env, "--model.nonfinite=ignore"))
argv_case("lightning_misconfiguration", "config", ("enable_checkpointing=False",),
          lambda env: on_shards(env, "--trainer.enable_checkpointing=false"))


def _data_config(**kwargs):
    return lambda env: (lambda: AVDataModule(root="unused", tasks=TASKS, **kwargs))


for _name, _kwargs, _match in [
    ("tasks_per_clip_negative", {"tasks_per_clip": -1}, "data.tasks_per_clip must be a whole number >= 1 or null"),
    ("samples_per_clip_0", {"samples_per_clip": {"action": 0}}, "data.samples_per_clip.action must be a whole number >= 1"),
    ("clips_per_batch_0", {"clips_per_batch": 0}, "data.clips_per_batch must be a whole number >= 1"),
    ("num_workers_negative", {"num_workers": -1}, "data.num_workers must be a whole number >= 0"),
]:
    CASES.append(Case(_name, "config", "exit2", _data_config(**_kwargs), (_match,)))


def _schedule_of_unknown_length(estimate: float):
    def run() -> None:
        module = module_of(None)
        module._trainer = types.SimpleNamespace(estimated_stepping_batches=estimate, max_steps=-1)
        module.configure_optimizers()

    return lambda env: run


CASES.append(Case("schedule_length_unknown", "config", "exit2", _schedule_of_unknown_length(-1), ("trainer.max_steps",)))
CASES.append(Case("schedule_length_infinite", "config", "exit2", _schedule_of_unknown_length(math.inf),
                  ("trainer.max_steps",)))

CASES += [
    Case("learning_rate_negative", "config", "exit2", lambda env: lambda: module_of(None, learning_rate=-1.0),
         ("model.learning_rate", "-1")),
    Case("warmup_ratio_above_1", "config", "exit2", lambda env: lambda: module_of(None, warmup_ratio=2.0),
         ("model.warmup_ratio", "2")),
    Case("num_segments_0", "config", "exit2", lambda env: lambda: module_of(None, num_segments=0),
         ("model.num_segments", "0")),
]
argv_case("max_steps_0", "config", ("trainer.max_steps", "is 0"), lambda env: on_shards(env, "--trainer.max_steps=0"))


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def train_shard(env: Env) -> Path:
    return sorted((env.shards() / "train").glob("*.tar"))[0]


def damage(env: Env, change: Callable[[list[tuple[str, dict[str, bytes]]]], Any]) -> Path:
    """Rewrite the (private copy's) training shard after ``change(samples)``; the shards' root."""
    shard = train_shard(env)
    samples = read_tar(shard)
    change(samples)
    write_tar(shard, samples)
    return env.shards()


def epoch(root: Path, **kwargs) -> Counted:
    """One training epoch of the data module on ``root``, with what it skipped."""
    data = AVDataModule(root=str(root), **{"tasks": TASKS, "reasoning": False, "clips_per_batch": 2, **kwargs})
    data.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorruptSampleWarning)
        # the distinct clips trained (an epoch short of batches repeats its last one up to its length)
        kept = list(dict.fromkeys(key for batch in data.train_dataloader() for key in batch.clip_keys))
    counter = data.datasets["train"].counter
    messages = "\n".join(str(w.message) for w in caught if issubclass(w.category, CorruptSampleWarning))
    return Counted(dict(counter.reasons), list(counter.keys), messages, kept)


argv_case("data_root_is_a_file", "data", ("{tmp}/file.txt/train", "python -m avmt data synth"),
          lambda env: on_shards(env, root=env.write("file.txt", "not a folder")))


@case("data_root_empty", "data", "exit2", ("{tmp}/empty/train", "does not exist"))
def _(env):
    (env.tmp / "empty").mkdir()
    return on_shards(env, root=env.tmp / "empty")



@case("train_split_without_shards", "data", "exit2", ("{root}/train",))
def _(env):
    root = env.shards()
    for shard in (root / "train").glob("*.tar"):
        shard.unlink()
    return on_shards(env, root=root)


@case("avsynth_v1_shards", "data", "exit2", ("{root}", "AVSynth v1", "python -m avmt data synth"))
def _(env):
    root = env.shards()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["schema_version"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    return on_shards(env, root=root)


@case("every_sample_corrupt", "data", "exit2", ("train split", "{root}/train", "4 sample(s) skipped"))
def _(env):
    def corrupt_all(samples):
        for _, members in samples:
            members["frames.png"] = b"\x89PNG not really"

    root = damage(env, corrupt_all)
    return lambda: epoch(root)


@case("shard_shorter_than_its_manifest", "data", "counted_skip",
      ("{root}/train/train-000000.tar", "holds 2 clip(s) but its manifest says 4"), counted={"missing from shard": 2},
      kept=2)
def _(env):
    root = damage(env, lambda samples: samples.__delitem__(slice(2, None)))
    return lambda: epoch(root)


@case("clip_of_another_segment_count", "data", "counted_skip", ("skipping clip 'train-00000002'", "3 segments"),
      counted={"other layout": 1}, kept=3)
def _(env):
    def odd(samples):
        key = samples[2][0]
        other = SynthConfig(num_segments=T - 1)
        scene = generate_scene(2, "train", 4, other)
        scene["clip_id"] = key
        frames, audio = render_clip(scene, other)
        samples[2] = (key, encode_clip(scene, frames, audio, render_masks(scene, other)))

    root = damage(env, odd)
    return lambda: epoch(root)


@case("corrupt_frames_member", "data", "counted_skip", ("train-00000001", "bad frames.png"),
      counted={"bad frames.png": 1}, kept=3)
def _(env):
    root = damage(env, lambda samples: samples[1][1].__setitem__("frames.png", b"\x89PNG cut short"))
    return lambda: epoch(root)


@case("corrupt_scene_json_member", "data", "counted_skip", ("train-00000003", "scene.json"),
      counted={"bad scene.json": 1}, kept=3)
def _(env):
    root = damage(env, lambda samples: samples[3][1].__setitem__("scene.json", b"{not json"))
    return lambda: epoch(root)


@case("missing_audio_member", "data", "counted_skip", ("train-00000000", "no audio.flac member"),
      counted={"missing audio.flac": 1}, kept=3)
def _(env):
    root = damage(env, lambda samples: samples[0][1].pop("audio.flac"))
    return lambda: epoch(root)


# ---------------------------------------------------------------------------------------------
# media: predict on request files
# ---------------------------------------------------------------------------------------------


def requests_of(env: Env, lines: list[Any], name: str = "requests.jsonl") -> Callable[[], Any]:
    """Load the request file of ``lines`` and decode every request, as ``predict --data.requests`` does."""
    from avmt.data.media import MediaConfig

    path = env.write(name, "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")

    def run() -> None:
        config = MediaConfig(num_segments=T, segment_seconds=0.5, image_size=32, sample_rate=16000)
        list(RequestDataset(load_requests(path), config))

    return run


def video(env: Env, seconds: float = 2.0) -> str:
    path = env.tmp / "clip.mp4"
    if not path.exists():
        write_video(path, seconds=seconds)
    return path.name


argv_case("request_file_missing", "media", ("request file", "{tmp}/none.jsonl"),
          lambda env: on_shards(env, f"--data.requests={env.tmp / 'none.jsonl'}", command="predict"))
CASES.append(Case("request_line_not_json", "media", "exit2",
                  lambda env: requests_of(env, ['{"task": "ave", "video": "clip.mp4"']),
                  ("{tmp}/requests.jsonl, line 1", "not valid JSON")))
CASES.append(Case("request_file_empty", "media", "exit2", lambda env: requests_of(env, []),
                  ("{tmp}/requests.jsonl", "holds no request")))
CASES.append(Case("request_unknown_task", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "nosuch", "video": video(env)}]),
                  ("request 0", "unknown task 'nosuch'", "avqa")))
CASES.append(Case("request_task_and_instruction", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "ave", "instruction": "Say", "video": video(env)}]),
                  ("request 0", "exactly one of 'task' and 'instruction'")))
CASES.append(Case("request_without_media", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "ave"}]), ("request 0", "'video'")))
CASES.append(Case("request_video_missing", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "ave", "video": "gone.mp4"}]),
                  ("request 0", "{tmp}/gone.mp4", "does not exist")))
CASES.append(Case("request_multi_clip_task", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "a2v", "video": video(env)}]), ("request 0", "a2v", "4 clips")))
CASES.append(Case("request_missing_task_field", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "ref_avs", "video": video(env)}]),
                  ("request 0", "ref_avs", "expression")))

CASES.append(Case("request_start_not_a_number", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "ave", "video": video(env), "start": "30s"}]),
                  ("{tmp}/requests.jsonl, request 0", "'start'", "'30s'")))
CASES.append(Case("request_end_before_start", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "ave", "video": video(env), "start": 1, "end": 0.5}]),
                  ("{tmp}/requests.jsonl, request 0", "'end' (0.5 s) must be after 'start' (1 s)")))
CASES.append(Case("request_video_not_a_path", "media", "exit2",
                  lambda env: requests_of(env, [{"task": "ave", "video": 5}]), ("request 0", "video must be a file path")))


@case("request_video_corrupt", "media", "exit2", ("request 'bad'", "{tmp}/broken.mp4", "corrupt"))
def _(env):
    (env.tmp / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    return requests_of(env, [{"id": "bad", "task": "ave", "video": "broken.mp4"}])


@case("predict_on_a_corrupt_video", "media", "exit2", ("request 'bad'", "{tmp}/broken.mp4", "corrupt"))
def _(env):
    """The whole ``predict`` command: the error comes out of Lightning's predict loop as one line."""
    (env.tmp / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    requests = env.write("requests.jsonl", json.dumps({"id": "bad", "task": "emotion", "video": "broken.mp4"}) + "\n")
    return on_shards(env, f"--data.requests={requests}", command="predict")


@case("request_audio_is_text", "media", "exit2", ("request 'a'", "{tmp}/notes.wav", "cannot open"))
def _(env):
    env.write("notes.wav", "these are notes, not audio\n")
    return requests_of(env, [{"id": "a", "instruction": "What sounds?", "audio": "notes.wav"}])


@case("request_start_past_the_end", "media", "exit2", ("request 'late'", "{tmp}/clip.mp4", "past the end"))
def _(env):
    return requests_of(env, [{"id": "late", "task": "ave", "video": video(env), "start": 30}])


@case("request_needs_video_given_audio", "media", "exit2", ("request 'sound'", "'<video>'"))
def _(env):
    write_audio(env.tmp / "tone.wav", "pcm_s16le")
    return requests_of(env, [{"id": "sound", "task": "ave", "audio": "tone.wav"}])


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def lightning_checkpoint(path: Path, **extra: Any) -> Path:
    """A small torch checkpoint in Lightning's layout (no avmt metadata unless ``extra`` adds it)."""
    torch.save({"state_dict": {"weight": torch.zeros(64, 64)}, "pytorch-lightning_version": "2.6.0", **extra}, path)
    return path


def truncated(env: Env) -> Path:
    data = lightning_checkpoint(env.tmp / "good.ckpt").read_bytes()
    (env.tmp / "cut.ckpt").write_bytes(data[: len(data) // 2])  # a copy killed mid-write
    return env.tmp / "cut.ckpt"


class RunsCode:
    """A pickle gadget: unpickling it would call ``Path.touch`` on ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def gadget(env: Env, legacy: bool = False) -> Path:
    path = env.tmp / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(env.tmp / "pwned")}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def validate(env: Env, ckpt: Path | str) -> list[str]:
    return on_shards(env, f"--ckpt_path={ckpt}", command="validate")


argv_case("ckpt_text_file", "checkpoint", ("ckpt_path", "{tmp}/text.ckpt", "not a torch checkpoint"),
          lambda env: validate(env, env.write("text.ckpt", "epoch: 3\n")))
argv_case("ckpt_truncated", "checkpoint", ("ckpt_path", "{tmp}/cut.ckpt", "truncated"),
          lambda env: validate(env, truncated(env)))
argv_case("ckpt_missing", "checkpoint", ("ckpt_path", "{tmp}/none.ckpt"), lambda env: validate(env, env.tmp / "none.ckpt"))
argv_case("ckpt_unsafe_globals", "checkpoint", ("ckpt_path", "{tmp}/evil.ckpt", "weights_only", "pathlib"),
          lambda env: validate(env, gadget(env)))
argv_case("ckpt_unsafe_globals_legacy_format", "checkpoint", ("ckpt_path", "{tmp}/evil.ckpt", "weights_only"),
          lambda env: validate(env, gadget(env, legacy=True)))


@case("ckpt_plain_tensors", "checkpoint", "exit2", ("ckpt_path", "{tmp}/weights.pt", "'state_dict'"))
def _(env):
    torch.save({"weight": torch.zeros(2)}, env.tmp / "weights.pt")
    return validate(env, env.tmp / "weights.pt")


argv_case("ckpt_without_avmt_metadata", "checkpoint", ("ckpt_path", "{tmp}/other.ckpt", "not an avmt checkpoint"),
          lambda env: validate(env, lightning_checkpoint(env.tmp / "other.ckpt")))
argv_case("ckpt_of_an_unknown_avmt_format", "checkpoint", ("ckpt_path", "{tmp}/future.ckpt", "avmt-checkpoint-99"),
          lambda env: validate(env, lightning_checkpoint(env.tmp / "future.ckpt", avmt={"format": "avmt-checkpoint-99"})))


def saved(module: AVModule, path: Path) -> Path:
    """``module``'s checkpoint as Lightning and avmt write it."""
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


argv_case("ckpt_of_a_smaller_model", "checkpoint", ("checkpoint does not match the model", "missing", "model.audio_connector."),
          lambda env: validate(env, saved(module_of(None), env.tmp / "small.ckpt")))


@case("ckpt_of_other_widths", "checkpoint", "exit2", ("checkpoint shapes do not match the model", "model.vision_connector.queries", "(1, 3, 64)"))
def _(env):
    from avmt.export import build_module

    wider = env.write("wider.yaml", f"model:\n  num_segments: {T}\n  vision_connector:\n    init_args:\n      num_queries: 3\n")
    return validate(env, saved(build_module([BASE, wider]), env.tmp / "wide.ckpt"))


def export(env: Env, ckpt: Path, *configs: str) -> list[str]:
    return ["export", "peft", "--ckpt", str(ckpt), "--out", str(env.tmp / "exported"),
            *[arg for config in configs for arg in ("-c", config)]]


argv_case("export_ckpt_text_file", "checkpoint", ("--ckpt", "{tmp}/text.ckpt", "not a torch checkpoint"),
          lambda env: export(env, env.write("text.ckpt", "epoch: 3\n"), LORA))
argv_case("export_ckpt_missing", "checkpoint", ("--ckpt", "{tmp}/none.ckpt"), lambda env: export(env, env.tmp / "none.ckpt"))
argv_case("export_ckpt_unsafe_globals_legacy_format", "checkpoint", ("--ckpt", "{tmp}/evil.ckpt", "weights_only"),
          lambda env: export(env, gadget(env, legacy=True), LORA))
argv_case("export_ckpt_without_avmt_metadata", "checkpoint", ("--ckpt", "{tmp}/other.ckpt", "not an avmt checkpoint"),
          lambda env: export(env, lightning_checkpoint(env.tmp / "other.ckpt"), LORA))


@case("export_without_run_config", "checkpoint", "exit2", ("{tmp}/config.yaml", "-c CONFIG.yaml"))
def _(env):
    (env.tmp / "checkpoints").mkdir()
    return export(env, lightning_checkpoint(env.tmp / "checkpoints" / "last.ckpt"))


# ---------------------------------------------------------------------------------------------
# conversion: data convert (datasets) and convert crab-lora (weights)
# ---------------------------------------------------------------------------------------------

MEDIA_ARGS = ["--num_segments", "4", "--segment_seconds", "0.5", "--image_size", "32", "--sample_rate", "16000"]
AVE_HEADER = "Category&VideoID&Quality&StartTime&EndTime\n"


def data_convert(env: Env, src: Path, *extra: str, fmt: str = "ave") -> list[str]:
    return ["data", "convert", fmt, "--src", str(src), "--out", str(env.tmp / "out"), *MEDIA_ARGS, *extra]


def ave_tree(env: Env, lines: str) -> Path:
    src = env.tmp / "AVE_Dataset"
    (src / "AVE").mkdir(parents=True, exist_ok=True)
    (src / "Annotations.txt").write_text(AVE_HEADER + lines)
    return src


def converted(env: Env, src: Path, fmt: str = "ave") -> Callable[[], Counted]:
    """Convert ``src``; the manifest's skipped entries as a :class:`Counted` (reason -> count by file)."""

    def run() -> Counted:
        main(data_convert(env, src, fmt=fmt))
        manifest = json.loads((env.tmp / "out" / "manifest.json").read_text())
        reasons = collections.Counter(skip["reason"].split(":")[0].split(" (")[0] for skip in manifest["skipped"])
        messages = "\n".join(f"{s['key']}: {s['file']}: {s['reason']}" for s in manifest["skipped"])
        kept = [clip.key for clip in iter_clips(env.tmp / "out" / "train")]
        return Counted(dict(reasons), [s["key"] for s in manifest["skipped"]], messages, kept)

    return run


argv_case("convert_unknown_format", "conversion", ("nosuch", "ave", "avsbench"),
          lambda env: data_convert(env, env.tmp, fmt="nosuch"))
argv_case("convert_src_missing", "conversion", ("--src", "{tmp}/nowhere"), lambda env: data_convert(env, env.tmp / "nowhere"))
argv_case("convert_not_the_layout", "conversion", ("{tmp}", "Annotations.txt", "not the AVE layout"),
          lambda env: data_convert(env, env.tmp))
argv_case("convert_clips_per_shard_0", "conversion", ("clips_per_shard", "0"),
          lambda env: data_convert(env, ave_tree(env, ""), "--clips_per_shard", "0"))
argv_case("convert_num_segments_0", "conversion", ("num_segments", "0"),
          lambda env: data_convert(env, ave_tree(env, ""), "--num_segments", "0"))

argv_case("convert_frames_format_unknown", "conversion", ("--frames_format", "'gif'", "jpg"),
          lambda env: data_convert(env, ave_tree(env, ""), "--frames_format", "gif"))
argv_case("convert_workers_negative", "conversion", ("--workers", "-1"),
          lambda env: data_convert(env, ave_tree(env, ""), "--workers", "-1"))
argv_case("convert_limit_0", "conversion", ("--limit", "got 0"), lambda env: data_convert(env, ave_tree(env, ""), "--limit", "0"))
argv_case("synth_out_is_a_file", "conversion", ("--out", "{tmp}/out", "is a file"),
          lambda env: ["data", "synth", "--out", str(env.write("out", "a file")), "--clips", "1"])


@case("convert_out_is_a_file", "conversion", "exit2", ("--out", "{tmp}/out", "is a file"))
def _(env):
    env.write("out", "a file")
    return data_convert(env, ave_tree(env, ""))


@case("convert_annotation_not_utf8", "conversion", "exit2", ("AVE annotation file", "{tmp}/AVE_Dataset/Annotations.txt"))
def _(env):
    src = ave_tree(env, "")
    (src / "Annotations.txt").write_bytes(b"Category&VideoID\n\xff\xfe\xfa broken\n")
    return data_convert(env, src)


@case("convert_table_header_lacks_columns", "conversion", "exit2", ("{tmp}/Ref-AVS/metadata.csv", "lacks the columns"))
def _(env):
    src = env.tmp / "Ref-AVS"
    src.mkdir()
    (src / "metadata.csv").write_text("vid,name\nx,y\n")
    return data_convert(env, src, fmt="ref-avs")


@case("convert_out_holds_another_conversion", "conversion", "exit2", ("--out", "{tmp}/out", "already holds"))
def _(env):
    write_video(ave_tree(env, "Church bell&vidA&good&0&1\n") / "AVE" / "vidA.mp4", seconds=2.0)
    main(data_convert(env, env.tmp / "AVE_Dataset"))
    return data_convert(env, env.tmp / "AVE_Dataset", "--frames_format", "png")


@case("convert_bad_lines_and_media", "conversion", "counted_skip",
      ("trainSet", "broken", "AVE/broken.mp4", "missing", "cannot open: no such file", "expected 5"),
      counted={"cannot open": 2, "line 4 has 1 '&' fields, expected 5": 1}, kept=1)
def _(env):
    src = ave_tree(env, "")
    write_video(src / "AVE" / "vidA.mp4", seconds=2.0)
    (src / "AVE" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    (src / "trainSet.txt").write_text(
        AVE_HEADER + "Church bell&vidA&good&0&1\nDog&broken&good&0&2\nnot an annotation line\nDog&missing&good&0&1\n")
    return converted(env, src)


def converted_ave(env: Env) -> Path:
    """Two AVE clips converted into ``{tmp}/out`` (a train split only: AVE without its split files)."""
    src = ave_tree(env, "Church bell&vidA&good&0&1\nDog&vidB&good&1&2\n")
    for name in ("vidA", "vidB"):
        write_video(src / "AVE" / f"{name}.mp4", seconds=2.0)
    main(data_convert(env, src))
    return env.tmp / "out"


@case("converted_data_without_a_val_split", "data", "exit2", ("{tmp}/out/val", "data.splits", "train"))
def _(env):
    out = converted_ave(env)
    return lambda: AVDataModule(root=str(out), tasks=["ave"], reasoning=False).setup("fit")


@case("converted_annotation_of_a_newer_version", "data", "counted_skip", ("vidA", "annotation version 2", "upgrade avmt"),
      kept=1)
def _(env):
    out = converted_ave(env)
    shard = sorted((out / "train").glob("*.tar"))[0]
    samples = read_tar(shard)
    scene = json.loads(samples[0][1]["scene.json"])
    samples[0][1]["scene.json"] = json.dumps({**scene, "version": 2}).encode()
    write_tar(shard, samples)
    return lambda: epoch(out, splits={"val": "train", "test": "train"}, tasks=["ave"])


def crab(env: Env, weights: Path, config: str = ILORA) -> list[str]:
    return ["convert", "crab-lora", "--weights", str(weights), "-c", config, "--out", str(env.tmp / "crab.ckpt")]


argv_case("crab_weights_missing", "conversion", ("--weights", "{tmp}/none.bin"), lambda env: crab(env, env.tmp / "none.bin"))
argv_case("crab_weights_text_file", "conversion", ("--weights", "{tmp}/crab.bin", "not a torch checkpoint"),
          lambda env: crab(env, env.write("crab.bin", "lora_A: 1\n")))
argv_case("crab_weights_unsafe_legacy_pickle", "conversion", ("--weights", "{tmp}/evil.ckpt", "weights_only"),
          lambda env: crab(env, gadget(env, legacy=True)))
argv_case("crab_weights_bad_safetensors", "conversion", ("--weights", "{tmp}/crab.safetensors", "safetensors"),
          lambda env: crab(env, env.write("crab.safetensors", "not a safetensors header")))
argv_case("crab_weights_without_lora_keys", "conversion", ("no Crab weights for adapted layer",),
          lambda env: crab(env, lightning_checkpoint(env.tmp / "other.bin")))
argv_case("crab_config_without_ilora", "conversion", ("model.adapter", "avmt.adapters.ILoRA", "LoRA"),
          lambda env: crab(env, lightning_checkpoint(env.tmp / "other.bin"), LORA))


# ---------------------------------------------------------------------------------------------
# faults: tiny in-process fits
# ---------------------------------------------------------------------------------------------


def tiny_module(**kwargs) -> AVModule:
    """test_module's tiny module without an adapter, with short generation and no bootstrap."""
    return module_of(None, **{"max_new_tokens": 4, "max_generation_samples": 2, "bootstrap_resamples": 0, **kwargs})


def fit(module: AVModule, root: Path, checkpoints: Path, **trainer_options) -> L.Trainer:
    """Fit ``module`` on ``root`` with a ModelCheckpoint that keeps only ``last.ckpt`` (as base.yaml)."""
    options = {"max_epochs": 1, "num_sanity_val_steps": 0, "gradient_clip_val": 1.0, **trainer_options}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(checkpoints),
                        callbacks=[ModelCheckpoint(dirpath=str(checkpoints), save_last=True, save_top_k=0)], **options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny matrices gain nothing from threads, and lose much on a busy machine
    try:
        trainer.fit(module, AVDataModule(root=str(root), tasks=TASKS, reasoning=False, clips_per_batch=2))
    finally:
        torch.set_num_threads(threads)
    return trainer


def poison_gradients(module: AVModule, steps: set[int] | None = None) -> None:
    """Make one trainable parameter's gradient NaN (at the backward passes numbered in ``steps``,
    counted from 0; every one when ``None``), the loss staying finite."""
    parameter = next(p for p in module.model.vision_connector.parameters() if p.requires_grad)
    calls = {"count": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        call, calls["count"] = calls["count"], calls["count"] + 1
        return grad * float("nan") if steps is None or call in steps else grad

    parameter.register_hook(hook)


def failed_fit(build: Callable[[], AVModule], unchanged: bool = False, **options) -> Callable[[Env], Callable[[], None]]:
    """A fit of ``build()`` that must stop with an error and leave no checkpoint (and, with
    ``unchanged``, every parameter as it was: the bad step never reached the optimizer)."""

    def setup(env: Env) -> Callable[[], None]:
        def run() -> None:
            module = build()
            before = {name: p.detach().clone() for name, p in module.named_parameters()}
            try:
                fit(module, env.clean_shards, env.tmp / "run", **options)
            finally:
                assert not (env.tmp / "run" / "last.ckpt").exists()
                assert not unchanged or all(torch.equal(before[n], p.detach()) for n, p in module.named_parameters())

        return run

    return setup


def _nan_weights() -> AVModule:
    module = tiny_module()
    with torch.no_grad():
        for parameter in module.model.vision_connector.parameters():
            parameter.fill_(float("nan"))
    return module


def _poisoned(steps: set[int] | None = None, **options) -> Callable[[], AVModule]:
    def build() -> AVModule:
        module = tiny_module(**options)
        poison_gradients(module, steps)
        return module

    return build


CASES += [
    Case("nan_loss", "fault", "error", failed_fit(_nan_weights),
         ("global step 0", "non-finite", "emotion", "action")),
    Case("nonfinite_gradients", "fault", "error", failed_fit(_poisoned(), unchanged=True),
         ("non-finite gradients in 1 parameter", "global step 0", "emotion")),
    Case("skipped_steps_above_the_allowed_fraction", "fault", "error",
         failed_fit(_poisoned({0}, nonfinite="skip", max_nonfinite_fraction=0.1)), ("1 of 2 optimizer step(s) were skipped",)),
    Case("every_step_skipped", "fault", "error",
         failed_fit(_poisoned(None, nonfinite="skip", max_nonfinite_fraction=1.0)), ("2 of 2 optimizer step(s) were skipped",)),
]


@case("skipped_step_within_the_allowed_fraction", "fault", "counted_skip", ("skipped the optimizer step at global step 0",),
      counted={"nonfinite_skipped": 1})
def _(env):
    def run() -> Counted:
        module = _poisoned({0}, nonfinite="skip", max_nonfinite_fraction=0.5)()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = fit(module, env.clean_shards, env.tmp / "run", max_epochs=2)  # 4 steps, 1 skipped
        assert (module.optimizer_steps, module.nonfinite_skipped) == (4, 1)
        assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
        assert all(torch.isfinite(p).all() for p in module.parameters())
        assert (env.tmp / "run" / "last.ckpt").exists() and module.final_metrics
        return Counted({"nonfinite_skipped": module.nonfinite_skipped}, [], "\n".join(str(w.message) for w in caught))

    return run


@case("fit_on_only_corrupt_samples", "fault", "exit2", ("train", "no usable sample", "4 sample(s)", "corrupt"))
def _(env):
    root = env.shards()
    for path in (root / "train").glob("*.tar"):
        write_tar(path, [(key, {**members, "scene.json": b"not json"}) for key, members in read_tar(path)])

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptSampleWarning)
            try:
                fit(tiny_module(), root, env.tmp / "run")
            finally:
                assert not (env.tmp / "run" / "last.ckpt").exists()

    return run


@case("shard_cut_by_a_killed_write", "fault", "counted_skip",
      ("skipping the unreadable rest of shard {root}/train/train-000000.tar", "holds 2 clip(s) but its manifest says 4"),
      counted={"unreadable tar": 1, "missing from shard": 2}, kept=2)
def _(env):
    shard = train_shard(env)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a copy killed mid-way
    return lambda: epoch(env.shards())


# ---------------------------------------------------------------------------------------------
# internal bugs keep their traceback
# ---------------------------------------------------------------------------------------------


def raise_internal_key_error(argv: list[str]) -> None:
    """A command with a bug (run through ``COMMANDS``)."""
    raise KeyError("internal key")


def _bug(error: Exception) -> Callable[[Env], list[str]]:
    """A fit whose config check has a bug raising ``error``."""

    def setup(env: Env) -> list[str]:
        def broken(argv: list[str]) -> None:
            raise error

        env.monkeypatch.setattr(avmt.cli, "check_plugins", broken)
        return ["fit", "-c", ILORA]

    return setup


CASES += [
    Case("internal_key_error", "bug", "traceback", _bug(KeyError("internal key")), ("internal key",)),
    Case("internal_value_error", "bug", "traceback", _bug(ValueError("internal invariant")), ("internal invariant",)),
    Case("internal_zero_division", "bug", "traceback", _bug(ZeroDivisionError("division by zero")), ("division",)),
    Case("internal_bug_in_a_command", "bug", "traceback", lambda env: lambda: raise_internal_key_error([]),
         ("internal key",)),
]


@case("user_error_with_avmt_debug", "bug", "traceback", ("{tmp}/broken.yaml",))
def _(env):
    env.monkeypatch.setenv("AVMT_DEBUG", "1")
    return ["fit", "-c", str(env.write("broken.yaml", "model: [\n"))]


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------

_PENDING: list[Callable[[], Any]] = []


def run_pending(argv: list[str]) -> None:
    """The :data:`CASE_COMMAND` command: run the case's code (so :func:`avmt.cli.main` handles its error)."""
    _PENDING.pop()()


def as_command(run: Callable[[], Any], monkeypatch) -> None:
    """Run ``run`` as ``python -m avmt bad-input-case``, through the CLI's error handling."""
    monkeypatch.setitem(avmt.cli.COMMANDS, CASE_COMMAND, f"{__name__}:run_pending")
    _PENDING.append(run)
    main([CASE_COMMAND])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 training clips in one shard (2 batches of 2), 2 validation clips, T = 4 segments."""
    root = tmp_path_factory.mktemp("avsynth")
    ensure_shards(root, {"train": 4, "val": 2, "test": 2}, 0, SynthConfig(num_segments=T), progress=False)
    return root


def _params():
    return [pytest.param(c, id=f"{c.area}-{c.name}",
                         marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
            for c in CASES]


@pytest.mark.parametrize("bad", _params())
def test_bad_input(bad: Case, shards, tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # nothing a case writes lands in the repository
    env = Env(tmp_path, shards, monkeypatch)
    action = bad.setup(env)
    capsys.readouterr()

    def expected(text: str) -> None:
        for fragment in bad.expect:
            fragment = fragment.format(**env.paths)
            assert fragment in text, f"{fragment!r} not in {text!r}"

    if bad.outcome == "exit2":
        with pytest.raises(SystemExit) as exit_info:
            as_command(action, monkeypatch) if callable(action) else main(action)
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.startswith("avmt: error: ") or "Traceback" in line]
        assert exit_info.value.code == 2, err
        assert len(lines) == 1 and "Traceback" not in err, err
        expected(lines[0])
        assert not (tmp_path / "pwned").exists()  # a refused pickle ran nothing
    elif bad.outcome == "counted_skip":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptSampleWarning)
            counted = action()
        assert counted.reasons, "nothing was counted"
        for reason, count in bad.counted.items():
            assert counted.reasons.get(reason) == count, counted.reasons
        assert bad.kept is None or len(counted.kept) == bad.kept, counted.kept
        expected(counted.messages + "\n" + " ".join(counted.keys))
    elif bad.outcome == "error":
        with pytest.raises(Exception) as error_info:
            as_command(action, monkeypatch)
        assert not isinstance(error_info.value, (UserError, SystemExit)), error_info.value
        expected(str(error_info.value))
        assert isinstance(error_info.value, TrainingDiverged) or bad.area != "fault"
    else:  # traceback: the exception reaches the caller unchanged
        with pytest.raises(Exception) as error_info:
            as_command(action, monkeypatch) if callable(action) else main(action)
        expected(str(error_info.value))
        assert "avmt: error" not in capsys.readouterr().err


def test_the_matrix_counts():
    """At least 40 cases, every outcome and area represented; prints the counts for the record."""
    by_outcome = collections.Counter(c.outcome for c in CASES)
    by_area = collections.Counter(c.area for c in CASES)
    names = [(c.area, c.name) for c in CASES]
    assert len(names) == len(set(names)), "two cases share a name"
    assert set(by_outcome) <= set(OUTCOMES) and set(by_area) <= set(AREAS)
    assert len(CASES) >= 40 and all(by_outcome[o] for o in OUTCOMES) and all(by_area[a] for a in AREAS)
    xfailed = sum(1 for c in CASES if c.xfail)
    print(f"\nbad-input matrix: {len(CASES)} cases ({xfailed} xfail: bugs in files owned elsewhere)")
    print("  by outcome: " + ", ".join(f"{o} {by_outcome[o]}" for o in OUTCOMES))
    print("  by area:    " + ", ".join(f"{a} {by_area[a]}" for a in AREAS))
