"""``avuie``: Crab's AV-UIE instruction data (Du et al., CVPR 2025; Crab+'s AV-UIE v2) for the
``instruct`` task.

AV-UIE is a set of JSON files of instruction samples over the media of other datasets (AVE,
AVVP, MUSIC-AVQA, AVSBench, Ref-AVS, VALOR, ...), whose answers carry explicit reasoning that ends
in tagged results ("... So the answer is <answer> saxophone </answer>."). Layout under ``--src``:
every ``*.json`` file below it (sorted, recursively), each a list of sample objects, for example
Crab+'s ``AVUIE_2/{task}/{train,test}.json`` next to the media folders ``AVUIE_2/{task}/video/``,
``AVUIE_2/{task}/audio/`` (GeWu-Lab/Crab_Plus, ``dataset/qwen2_5_omni/omni_dataset.py``).

A sample object is read as follows (the keys Crab and Crab+ use):

* **task**: ``task`` / ``task_name`` (or ``metadata.task_name``); else the JSON file's folder name
  (``AVUIE_2/ave/train.json`` -> ``ave``; ``ave_data/...`` -> ``ave``).
* **media**: ``video_path`` / ``video``, ``audio_path`` / ``audio``, ``image_path`` / ``image``:
  at most one of each kind, and not a video and an image together (a converted clip has one frame
  source and one audio track; Crab+'s ``a2v`` / ``v2a`` samples with two videos or two audio
  clips are skipped, named). A path is looked up under ``--src``: a relative one in the JSON
  file's own ``video/`` or ``audio/`` folder (Crab+), next to the JSON file, or from ``--src``;
  an absolute one (Crab's JSON holds paths such as ``/group/.../data/ave/AVE_Dataset/AVE/x.mp4``)
  by dropping leading folders until the rest exists under ``--src`` (so the data root's prefix
  is stripped whatever it is). A sample whose media file is found nowhere is skipped, naming it.
* **instruction**: a conversation (``conversations`` / ``conv`` / ``messages``: the first user
  turn; its content a string, or Crab+'s list of ``{"type": "text" | "video" | "audio" |
  "image", ...}`` items whose media items also give the media paths), else ``instruction`` /
  ``prompt``, else the instruction Crab+ builds for the task (its own phrasing, filled from
  ``question``, ``question_text`` and ``multi_choice``, or ``description``). Crab's media tokens
  (``<video_start><video><video_end>``, ``<|vision_bos|><|VIDEO|><|vision_eos|>``, ...) become
  avmt's placeholders ``<video>``, ``<audio>``, ``<image>``; an instruction without placeholders
  gets those of its media in front (``<video> <audio> ...``); whitespace is collapsed.
* **answer** (the explicit-reasoning text, kept as it is): the first string of ``output``,
  ``label_content``, ``new_label``, ``label``, ``answer``, else the conversation's first
  assistant turn. Tags that collide with avmt's placeholders are renamed as Crab itself does
  (``<audio> dog </audio>`` -> ``<audio_event> dog </audio_event>``; likewise ``<video>``,
  ``<image>``).
* **split**: ``split`` when the sample has it, else from the JSON file name (``train`` /
  ``valid_train_samples`` -> train, ``test`` -> test, ``val`` / ``valid`` / ``dev`` -> val,
  anything else -> train).

One sample is one clip (key ``{json path}-{index}``), with the answer ``answers["instruct"] =
{"instruction": str with placeholders, "answer": str, "task": Crab's task name}``. An image
sample's clip shows the image on every frame. The clip covers ``num_segments ·
segment_seconds`` from the start of the media (default 10 s: AVE, AVVP, Ref-AVS); set
``--segment_seconds`` for longer sources (MUSIC-AVQA videos run 60 s). A JSON file that does not
parse is a user error (:class:`~avmt.data.converters.base.ConvertError`); a JSON file that is not
a list of samples, and a sample without an answer or instruction, are skipped, named.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Iterator

from avmt.data.converters import register_converter
from avmt.data.converters.base import ConvertError, Converter, Skip, SourceClip, read_json, safe_key
from avmt.data.media import MediaConfig

#: Answer keys, in the order they are tried (Crab+: ``output`` ref_avs, ``label_content`` ave /
#: avvp / unav / avcap / s4 / ms3 / arig, ``new_label`` ucf, ``label`` the rest; ``answer`` last:
#: in MUSIC-AVQA samples it is the short answer next to the reasoning ``label``).
ANSWER_KEYS = ("output", "label_content", "new_label", "label", "answer")
INSTRUCTION_KEYS = ("instruction", "prompt")
CONVERSATION_KEYS = ("conversations", "conv", "messages")
#: Media keys by placeholder kind; numbered keys (``video1_path``) mean several of a kind.
MEDIA_KEYS = {"video": ("video_path", "video"), "audio": ("audio_path", "audio"),
              "image": ("image_path", "image")}
_NUMBERED_MEDIA_RE = re.compile(r"^(video|audio|image)\d+(_path)?$")
#: Crab's and Qwen-Omni's media tokens -> avmt's placeholders.
MEDIA_TOKENS = (
    (re.compile(r"<video_start>\s*<video>\s*<video_end>"), "<video>"),
    (re.compile(r"<audio_start>\s*<audio>\s*<audio_end>"), "<audio>"),
    (re.compile(r"<image_start>\s*<image>\s*<image_end>"), "<image>"),
    (re.compile(r"<\|vision_bos\|>\s*<\|VIDEO\|>\s*<\|vision_eos\|>"), "<video>"),
    (re.compile(r"<\|vision_bos\|>\s*<\|IMAGE\|>\s*<\|vision_eos\|>"), "<image>"),
    (re.compile(r"<\|audio_bos\|>\s*<\|AUDIO\|>\s*<\|audio_eos\|>"), "<audio>"),
)
_PLACEHOLDER_RE = re.compile(r"<(video|audio|image)>")
#: Answer tags that collide with avmt's placeholders (Crab renames them the same way).
_ANSWER_TAG_RE = re.compile(r"<(/?)(video|audio|image)>")
_BOX_AND_POINTS = ("Please identify the category of the object producing the sound in the video frame. "
                   "Then, provide the bounding box and three pixel points of the object that is making the "
                   "sound within the frame.")
#: The instruction Crab+ gives each task when the sample has none (avmt's phrasing of it). Slots:
#: ``question`` (avqa), ``question_text`` and ``multi_choice`` (avqa_thu), ``description`` (ref_avs).
TASK_INSTRUCTIONS = {
    "ave": "Please describe the events and time range that occurred in the video.",
    "unav": "Please describe the events and time range that occurred in the video.",
    "avvp": ("Please determine the events that occur based on the visual and audio information in the video, "
             "as well as the start and end times of these events."),
    "avqa": "Please answer this question: {question}",
    "avqa_thu": "Please answer the question based on the options: {question_text}, options: {multi_choice}",
    "avcap": "Please describe this video and audio.",
    "ks": "Please identify the action taking place in the video.",
    "ucf": "Please identify the action taking place in the video.",
    "meld": "Please judge the person's emotion at the moment.",
    "mer24": "Please judge the person's emotion at the moment.",
    "cremad": "Please judge the person's emotion at the moment.",
    "mafw": "Please judge the person's emotion at the moment.",
    "dfew": "Please judge the person's emotion at the moment.",
    "arig": "Please recognize the category of object that makes the sound and then output its bounding box.",
    "s4": _BOX_AND_POINTS,
    "ms3": _BOX_AND_POINTS,
    "ref_avs": ("Please analyze the video frame and audio to find the object described as "
                "<des> {description} </des>. Answer with \"true\" or \"false\" whether the object exists. "
                "If it exists, respond with a sentence identifying the object's name, its bounding box, and "
                "three pixel points; if not, state that the object is absent."),
}
_INTRO = {("video", "audio"): "This is a video and an audio:", ("video",): "This is a video:",
          ("image", "audio"): "This is an image and an audio:", ("image",): "This is an image:"}
_SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test", "val": "val",
                "valid": "val", "validation": "val", "dev": "val"}
_SKIP_FILES = {"manifest.json", ".convert-state.json"}
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class SampleProblem(ValueError):
    """One sample cannot become a clip: ``file`` is at fault (the JSON file or a media file)."""

    def __init__(self, reason: str, file: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.file = reason, file


def media_placeholders(text: str) -> str:
    """Crab's media tokens in ``text`` replaced by avmt's placeholders, whitespace collapsed."""
    for pattern, placeholder in MEDIA_TOKENS:
        text = pattern.sub(f" {placeholder} ", text)
    return " ".join(text.split())


def answer_text(text: str) -> str:
    """The answer as it is, its placeholder-like tags renamed (``<audio>`` -> ``<audio_event>``)."""
    return _ANSWER_TAG_RE.sub(lambda m: f"<{m.group(1)}{m.group(2)}_event>", text).strip()


def split_of(json_path: Path) -> str:
    """The split a JSON file's name says (``valid_train_samples.json`` -> train: Crab's "valid"
    training samples), ``train`` when it says none."""
    words = [w for w in re.split(r"[^a-z]+", json_path.stem.lower()) if w]
    found = [_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS]
    for split in ("train", "test", "val"):
        if split in found:
            return split
    return "train"


def _first_text(sample: dict, keys: tuple[str, ...]) -> str | None:
    """The first non-blank string among ``sample[key]`` for ``keys``, or None."""
    return next((sample[k] for k in keys if isinstance(sample.get(k), str) and sample[k].strip()), None)


def task_of(sample: dict, json_path: Path) -> str:
    """Crab's task name of a sample: its own field, else the JSON file's folder name."""
    metadata = sample.get("metadata") if isinstance(sample.get("metadata"), dict) else {}
    named = _first_text(sample, ("task", "task_name")) or _first_text(metadata, ("task_name",))
    if named is not None:
        return named.strip()
    folder = json_path.parent.name
    return folder[: -len("_data")] if folder.endswith("_data") else folder


@register_converter
class AVUIEConverter(Converter):
    """AV-UIE instruction JSON files + the media they name -> one clip per instruction sample with an
    ``instruct`` answer ``{"instruction", "answer", "task"}``."""

    name = "avuie"
    version = 1
    description = ("*.json instruction lists (Crab / Crab+ AV-UIE: video_path / audio_path / image_path, "
                   "the answer in output / label_content / label, the instruction in conversations / "
                   "instruction or per task)")
    media_defaults = {"num_segments": 10, "segment_seconds": 1.0}

    def items(self, src: Path, media: MediaConfig) -> Iterator[SourceClip | Skip]:
        files = sorted(p for p in src.rglob("*.json") if p.is_file() and p.name not in _SKIP_FILES
                       and not any(part.startswith(".") for part in p.relative_to(src).parts))
        if not files:
            raise ConvertError(f"'{src}' holds no *.json instruction file: not the AV-UIE layout "
                               f"({self.description})")
        resolver = _MediaResolver(src)
        for path in files:
            rel = path.relative_to(src)
            data = read_json(path, "AV-UIE instruction file")
            if isinstance(data, dict):  # a wrapper object holding the list
                lists = [data[k] for k in ("data", "samples", "annotations") if isinstance(data.get(k), list)]
                data = lists[0] if lists else data
            if not isinstance(data, list):
                yield Skip(str(rel), str(path), "not a list of instruction samples (a JSON array of objects)")
                continue
            for index, sample in enumerate(data):
                key = safe_key(rel.with_suffix("").as_posix(), f"{index:06d}")
                own = sample.get("split") if isinstance(sample, dict) else None
                own = own.strip() if isinstance(own, str) else ""
                split = own if _SPLIT_RE.match(own) else split_of(path)
                try:
                    if not isinstance(sample, dict):
                        raise SampleProblem(f"sample {index} is a {type(sample).__name__}, not an object")
                    yield self._clip(sample, key, split, path, f"{rel.as_posix()}#{index}", resolver, media)
                except SampleProblem as problem:
                    yield Skip(key, problem.file or str(path), f"sample {index}: {problem.reason}", split)

    def _clip(self, sample: dict, key: str, split: str, path: Path, source_id: str,
              resolver: "_MediaResolver", media: MediaConfig) -> SourceClip:
        """One sample's clip (see the module docstring). Raises SampleProblem naming what is wrong."""
        task = task_of(sample, path)
        numbered = sorted(k for k in sample if _NUMBERED_MEDIA_RE.match(k))
        if numbered:
            raise SampleProblem(f"task {task!r} names several media of a kind ({', '.join(numbered)}); a "
                                f"converted clip holds one video (or image) and one audio track")
        instruction, answer, media_values = self._conversation(sample)
        for kind, keys in MEDIA_KEYS.items():
            value = _first_text(sample, keys)
            if value is not None and kind not in media_values:
                media_values[kind] = value
        if "video" in media_values and "image" in media_values:
            raise SampleProblem("names both a video and an image; a converted clip has one frame source")
        if "video" not in media_values and "image" not in media_values:
            raise SampleProblem("names no video and no image (video_path / image_path); a converted clip "
                                "needs frames")
        if answer is None:
            answer = _first_text(sample, ANSWER_KEYS)
        if answer is None:
            raise SampleProblem(f"no answer text ({' / '.join(ANSWER_KEYS)}, or a conversation's assistant "
                                f"turn)")
        if instruction is None:
            instruction = _first_text(sample, INSTRUCTION_KEYS)
        if instruction is None:
            instruction = self._task_instruction(task, sample, media_values)
        instruction = media_placeholders(instruction)
        named = _PLACEHOLDER_RE.findall(instruction)
        if not named:
            kinds = [k for k in ("video", "image", "audio") if k in media_values]
            instruction = " ".join(f"<{k}>" for k in kinds) + " " + instruction
            named = kinds
        repeated = sorted({k for k in named if named.count(k) > 1})
        absent = sorted({k for k in named if k not in media_values})
        if repeated or absent:
            raise SampleProblem(f"the instruction names <{'>, <'.join(repeated or absent)}> "
                                + ("more than once" if repeated else "and the sample has no such media file"))
        files = {kind: resolver.find(value, kind, path.parent) for kind, value in media_values.items()}
        return SourceClip(
            key=key,
            split=split,
            source_id=source_id,
            answers={"instruct": {"instruction": instruction, "answer": answer_text(answer), "task": task}},
            video=files.get("video"),
            audio=files.get("audio"),
            frames=[files["image"]] * media.num_frames if "image" in files else None,
        )

    @staticmethod
    def _conversation(sample: dict) -> tuple[str | None, str | None, dict[str, str]]:
        """(instruction, answer, media paths) from a conversation list, when the sample has one."""
        turns = next((sample[k] for k in CONVERSATION_KEYS if isinstance(sample.get(k), list)), None)
        if not turns:
            return None, None, {}
        instruction = answer = None
        media: dict[str, str] = {}
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            role = str(turn.get("role", turn.get("from", ""))).lower()
            content = turn.get("content", turn.get("value"))
            if role in ("user", "human") and instruction is None:
                if isinstance(content, list):
                    parts = []
                    for item in content:
                        kind = item.get("type") if isinstance(item, dict) else None
                        if kind == "text" and isinstance(item.get("text"), str):
                            parts.append(item["text"])
                        elif kind in MEDIA_KEYS and isinstance(item.get(kind), str):
                            if kind in media:
                                raise SampleProblem(f"the conversation names several {kind} files; a "
                                                    f"converted clip holds one of a kind")
                            media[kind] = item[kind]
                            parts.append(f"<{kind}>")
                    instruction = " ".join(parts)
                elif isinstance(content, str):
                    instruction = content
            elif role in ("assistant", "gpt") and answer is None and isinstance(content, str):
                answer = content if content.strip() else None
        return instruction, answer, media

    @staticmethod
    def _task_instruction(task: str, sample: dict, media_values: dict[str, str]) -> str:
        """Crab+'s instruction for ``task`` (its media introduced the way Crab+ does)."""
        template = TASK_INSTRUCTIONS.get(task.lower().replace("-", "_"))
        if template is None:
            known = ", ".join(sorted(TASK_INSTRUCTIONS))
            raise SampleProblem(f"no instruction (conversations / instruction / prompt) and task {task!r} is "
                                f"not one whose instruction Crab+ builds ({known})")
        fields = {}
        for slot in re.findall(r"\{(\w+)\}", template):
            value = sample.get(slot)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise SampleProblem(f"task {task!r}: the instruction needs the field {slot!r}")
            fields[slot] = " ".join(str(value).split()).lower() if slot == "description" else value
        kinds = tuple(k for k in ("video", "image", "audio") if k in media_values)
        intro = _INTRO.get(kinds, "")
        placeholders = " ".join(f"<{k}>" for k in kinds)
        return f"{intro} {placeholders} {template.format(**fields)}"


class _MediaResolver:
    """Finds a sample's media file under ``--src`` (see the module docstring); caches, per JSON
    folder and path folder, where the last file was found, so a long list costs one lookup per file."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self._folders: dict[tuple[str, str, str], Path] = {}

    def find(self, value: str, kind: str, json_folder: Path) -> Path:
        """The file ``value`` names. Raises SampleProblem (naming where it looked first) when it
        is nowhere under ``--src`` or climbs out of it (``..``)."""
        path = PurePosixPath(value.strip().replace("\\", "/"))
        parts = [p for p in path.parts if p not in ("/", "")]
        absolute = path.is_absolute()
        if parts and ":" in parts[0]:  # a Windows drive letter: a data-root prefix like any other
            parts, absolute = parts[1:], True
        if not parts or ".." in parts:
            raise SampleProblem(f"{kind} path {value!r} is empty or climbs out of --src")
        name, folder = parts[-1], parts[:-1]
        cache_key = (str(json_folder), kind, "/".join(folder))
        cached = self._folders.get(cache_key)
        if cached is not None and (cached / name).is_file():
            return cached / name
        candidates: list[Path] = []
        if not absolute:
            relative = Path(*parts)
            candidates += [json_folder / kind / relative, json_folder / relative, self.src / relative]
        candidates += [self.src / Path(*parts[i:]) for i in range(0 if absolute else 1, len(parts))]
        for candidate in candidates:
            if candidate.is_file():
                self._folders[cache_key] = candidate.parent
                return candidate
        first = candidates[0].relative_to(self.src)
        raise SampleProblem(f"{kind} file {value!r} not found under --src (looked for {first} and "
                            f"{len(candidates) - 1} other places)", str(candidates[0]))
