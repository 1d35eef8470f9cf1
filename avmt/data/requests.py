"""``predict`` on files: a request file names media and a task (or a free instruction).

A request file is a JSON list or JSON Lines, one request per entry::

    {"id": "bunny", "task": "ave", "video": "clips/bigbuckbunny.mp4"}
    {"instruction": "What is making the sound?", "video": "a.mp4", "start": 30}
    {"task": "ref_avs", "video": "b.mp4", "expression": "the dog on the left"}

Keys: ``task`` (a registered task: its first prompt phrasing is asked, ``{slot}`` fields filled
from the request's keys) or ``instruction`` (free text, placeholders prepended); ``video`` (its
frames, and its audio unless ``audio`` is given), ``audio``; ``start``/``end`` seconds; ``id``
(default: the entry's position). Media is decoded with :mod:`avmt.data.media` into the clip
layout of the data module (T segments, its frame size and sample rate).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from avmt.data.media import MediaConfig, MediaError, decode_clip
from avmt.data.sample import Clip, ClipGroup, MediaRef, TaskSample
from avmt.errors import UserError
from avmt.tasks import TASKS, get_task

__all__ = ["Request", "RequestDataset", "load_requests", "INSTRUCTION"]

#: The task name of a free-instruction request (not a registered task: its answer is the text).
INSTRUCTION = "instruction"
_KEYS = {"id", "task", "instruction", "video", "audio", "start", "end"}


@dataclass
class Request:
    """One request: what to ask about which media (see the module docstring)."""

    id: str
    task: str
    question: str
    video: Path | None
    audio: Path | None
    start: float | None = None
    end: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def _entries(path: Path) -> list[Any]:
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not valid JSON ({error})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error})") from None
    return entries


def _question(task_name: str, entry: dict, where: str) -> str:
    task = get_task(task_name)
    if task.num_clips != 1:
        raise UserError(f"{where}: task {task_name!r} compares {task.num_clips} clips; a request names one clip")
    prompt = task.prompts[0]
    slots = [name for _, name, _, _ in string.Formatter().parse(prompt) if name]
    missing = [name for name in slots if name not in entry]
    if missing:
        raise UserError(f"{where}: task {task_name!r} asks about {missing}: add the key(s) to the request")
    return prompt.format(**{name: entry[name] for name in slots})


def _seconds(entry: dict, key: str, where: str) -> float | None:
    """The request's ``start``/``end`` in seconds (``None`` when absent); a :class:`UserError` naming
    the request and the key unless it is a number >= 0."""
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise UserError(f"{where}: '{key}' must be a number of seconds >= 0, got {value!r}")
    return float(value)


def load_requests(path: str | Path) -> list[Request]:
    """Read and check a request file; relative media paths are relative to the file.

    Raises:
        UserError: a malformed entry (names the file, the entry and the key).
        FileNotFoundError: the file or a media file it names does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"request file {path} does not exist")
    requests = []
    for index, entry in enumerate(_entries(path)):
        where = f"{path}, request {index}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object with 'task' or 'instruction' and media paths")
        if ("task" in entry) == ("instruction" in entry):
            raise UserError(f"{where}: give exactly one of 'task' and 'instruction'")
        media = {}
        for key in ("video", "audio"):
            if entry.get(key) is not None:
                if not isinstance(entry[key], str):
                    raise UserError(f"{where}: {key} must be a file path (a string), got {entry[key]!r}")
                file = Path(entry[key]) if Path(entry[key]).is_absolute() else path.parent / entry[key]
                if not file.is_file():
                    raise FileNotFoundError(f"{where}: {key} file {file} does not exist")
                media[key] = file
        if not media:
            raise UserError(f"{where}: name a 'video' and/or an 'audio' file")
        if "task" in entry:
            name = str(entry["task"])
            if name not in TASKS:
                raise UserError(f"{where}: unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}")
            question = _question(name, entry, where)
        else:
            name, question = INSTRUCTION, str(entry["instruction"])
        start, end = _seconds(entry, "start", where), _seconds(entry, "end", where)
        if end is not None and end <= (start or 0.0):
            raise UserError(f"{where}: 'end' ({end:g} s) must be after 'start' ({start or 0.0:g} s)")
        requests.append(Request(
            id=str(entry.get("id", index)), task=name, question=question, video=media.get("video"),
            audio=media.get("audio"), start=start, end=end,
            fields={k: v for k, v in entry.items() if k not in _KEYS},
        ))
    if not requests:
        raise UserError(f"{path}: the request file holds no request")
    return requests


class RequestDataset(IterableDataset):
    """The requests as clip groups (one clip, one sample each), media decoded on the fly.

    Args:
        requests: from :func:`load_requests`.
        config: how media is cut (T, frame size, sample rate); the data module's.
    """

    def __init__(self, requests: list[Request], config: MediaConfig) -> None:
        self.requests = list(requests)
        self.config = config

    def __len__(self) -> int:
        return len(self.requests)

    def _clip(self, request: Request) -> tuple[Clip, list[str]]:
        config = self.config
        frames = audio = None
        if request.video is not None:
            decoded = decode_clip(request.video, config, request.start, request.end)
            frames, audio = decoded.frames, decoded.audio
        if request.audio is not None:
            audio = decode_clip(request.audio, config, request.start, request.end).audio
        placeholders = (["<video>"] if request.video is not None else []) + (["<audio>"] if audio is not None else [])
        if frames is None:
            frames = torch.zeros(config.num_frames, 3, config.image_size, config.image_size, dtype=torch.uint8)
        if audio is None:
            audio = torch.zeros(config.num_samples)
        clip = Clip(key=request.id, frames=torch.as_tensor(frames), audio=torch.as_tensor(audio, dtype=torch.float32),
                    scene={"request": request.id})
        return clip, placeholders

    def __iter__(self) -> Iterator[ClipGroup]:
        for request in self.requests:
            try:
                clip, available = self._clip(request)
            except MediaError as error:
                raise UserError(f"request {request.id!r}: {error}") from error
            if request.task == INSTRUCTION:
                inputs = available
            else:
                inputs = list(get_task(request.task).inputs)
                lacking = [p for p in inputs if p != "<image>" and p not in available]
                if lacking:
                    raise UserError(f"request {request.id!r}: task {request.task!r} needs {lacking}; "
                                     "name the media file(s)")
            media = tuple(MediaRef(p, 0, int(request.fields.get("segment", 0)) if p == "<image>" else None)
                          for p in inputs)
            prompt = " ".join(inputs) + " " + request.question
            yield ClipGroup([clip], [TaskSample(request.task, prompt, "", None, media, {})])
