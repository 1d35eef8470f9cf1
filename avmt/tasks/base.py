"""The task base class: one declarative unit per task.

A task declares

- its **inputs**: the media placeholders its prompt starts with (``<video>``, ``<audio>``,
  ``<image>`` = one segment's frame), the annotation text fields it reads, how many clips a
  sample looks at;
- its **text answer**: prompt phrasings, reasoning sentences and the tagged answer
  (``_compose``), and the parser that reads the tags back (``parse``, never raises);
- its **dense targets** (:class:`~avmt.data.sample.DenseSpec`: name, shape, dtype, collate rule)
  and the model **outputs** it reads (head output names such as ``"mask_logits"``);
- the **dense losses** it adds given those outputs (``dense_losses``), and how outputs become the
  prediction its metrics score (``predict``; default: ``parse`` the generated text);
- its **metrics** (a torchmetrics ``MetricCollection`` with a failure rate) and the trivial
  baseline computed through the same metric code (``majority_baseline``);
- how it reads **real data**: a converted clip (:mod:`avmt.data.annotation`) carries each task's
  structured answer under ``answers[task name]``, and ``compose_annotated`` turns it into the
  same prompt / target / dense targets the AVSynth scene graph gives (no reasoning sentences:
  real datasets have none).

The LightningModule, the model and the data module only loop over what tasks declare; none of
them names a task. ``task_id`` is the task's stable identity: it is saved in checkpoints and
used by task-gated adapters and the router telemetry, so a new task takes a new id and never
shifts the others.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torchmetrics import MetricCollection

from avmt.data.annotation import is_annotation
from avmt.data.sample import PLACEHOLDERS, Clip, Dense, DenseSpec, MediaRef, SampleError, TaskSample
from avmt.data.vocab import CLASSES, COLORS, MOODS, MOTIONS, NUMBER_WORDS, POSITIONS, ROWS, SHAPES
from avmt.errors import UserError
from avmt.tasks.formats import AnswerFormat, TaggedText
from avmt.tasks.reasoning import SHARED_PHRASES
from avmt.tasks.text import template_words, text_words

__all__ = ["Task", "TaskParts"]


@dataclass
class TaskParts:
    """What a task's ``_compose`` returns; :meth:`Task.build` assembles the sample from it.

    Attributes:
        question: the instruction without the placeholder prefix (with ``inline_media``: the whole
            prompt, its placeholders where their media belong, e.g. ``"<audio> Which video ...?
            Video 1: <video> Video 2: <video>"``).
        sentences: reasoning sentences (dropped when ``reasoning=False``).
        conclusion: concluding sentence embedding the tagged answer (used with reasoning).
        bare: the tagged answer alone (the target when ``reasoning=False``).
        answer: structured ground truth.
        media: what the prompt's placeholders stand for; ``None`` = the task's ``inputs``, each
            about the anchor clip (an ``<image>`` input needs its segment, so such a task sets it).
        dense: dense targets by name (checked against the task's ``dense_targets``).
        inline_media: the question already holds the placeholders of ``media`` (in the same order);
            :meth:`Task.build` does not prefix them. Either way the prompt's placeholders must match
            ``media`` one to one, in order.
    """

    question: str
    sentences: list[str]
    conclusion: str
    bare: str
    answer: Any
    media: tuple[MediaRef, ...] | None = None
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    inline_media: bool = False


_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))


class Task:
    """Base class of a task (see the module docstring for what a task declares).

    Subclasses set ``name``, a unique ``task_id``, ``prompts`` (question phrasings, chosen with
    the rng) and ``phrases`` (every other fixed text fragment they can emit, ``{slot}`` fields
    allowed), and implement ``_compose`` (or ``_compose_clip`` when they read more than the
    scene graph, ``_compose_clips`` when they look at other clips too), ``parse`` and ``metrics``.
    A multi-clip task (``num_clips > 1``) also chooses its other clips (``select_others``).
    """

    name: ClassVar[str] = ""
    #: Stable identity (>= 0, unique, never reused): checkpoints store it, task gates index by it.
    task_id: ClassVar[int] = -1
    #: Placeholders the prompt starts with, in order, each about the anchor clip (a task whose
    #: prompt places its placeholders inline, ``TaskParts.inline_media``: the kinds it uses).
    inputs: ClassVar[tuple[str, ...]] = ("<video>", "<audio>")
    #: Annotation fields (of the scene graph) the prompt needs, e.g. a referring expression.
    text_fields: ClassVar[tuple[str, ...]] = ()
    #: Clips a sample looks at (the anchor clip and ``num_clips - 1`` others).
    num_clips: ClassVar[int] = 1
    #: Dense targets the samples carry.
    dense_targets: ClassVar[tuple[DenseSpec, ...]] = ()
    #: Model outputs (head output names) that ``predict`` and ``dense_losses`` read.
    outputs: ClassVar[tuple[str, ...]] = ()
    #: The sample needs the scene's single audio-visual event (not there in multi-source scenes).
    needs_av_event: ClassVar[bool] = True
    prompts: ClassVar[tuple[str, ...]] = ()
    phrases: ClassVar[tuple[str, ...]] = ()
    #: Metric keys where lower is better (the majority baseline minimizes them).
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"parse_failure_rate"})
    #: At most this many distinct answers are tried as constants by the default baseline.
    max_baseline_candidates: ClassVar[int] = 64
    #: What :meth:`trivial_baseline` computes, in words (shown next to the scores).
    baseline_name: ClassVar[str] = "best constant"
    #: The trivial baseline is fitted on the training answers (``train_answers``), as a model that
    #: ignores the media would be: the module records this task's training answers (and keeps
    #: them in its checkpoints) and passes them to :meth:`trivial_baseline`.
    baseline_fits_training: ClassVar[bool] = False

    def __init__(self, reasoning: bool = True) -> None:
        """Args: reasoning: include the reasoning sentences in targets (False: tagged answer only).

        ``format`` (how ranges, boxes and masks are written and read, :mod:`avmt.tasks.formats`)
        starts as :class:`~avmt.tasks.formats.TaggedText`; ``get_task(name, answer_format=...)``
        sets another.
        """
        self.reasoning = bool(reasoning)
        self.format: AnswerFormat = TaggedText()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reasoning={self.reasoning}, answer_format={self.format!r})"

    # ---- building -------------------------------------------------------------------------

    def applies(self, clip: Clip) -> bool:
        """Whether a sample of this task can be built from ``clip`` (e.g. an MS3 sample needs a
        multi-source scene; a converted clip needs this task's answer and a task that reads real
        data). The data stream builds only the tasks that apply to a clip."""
        scene = clip.scene if isinstance(clip.scene, dict) else {}
        if is_annotation(scene):
            return self.name in scene["answers"] and self.reads_annotations
        return not self.needs_av_event or scene.get("av_event") is not None

    @property
    def reads_annotations(self) -> bool:
        """Whether the task builds samples from converted clips (it implements ``compose_annotated``)."""
        return type(self).compose_annotated is not Task.compose_annotated

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """The sample's parts from a converted clip whose annotation gives this task's ``answer``.

        Args:
            clip: the converted clip (``clip.scene`` is its :mod:`avmt.data.annotation`; its
                ``masks`` / ``objects`` hold the dense annotation, when the source has one).
            answer: ``clip.scene["answers"][self.name]``, as the converter wrote it.
            rng: the random source (prompt phrasing, which of several questions, ...).
        Raises:
            SampleError: the answer is malformed (names the clip and what is wrong).
        """
        raise SampleError(f"clip {clip.key!r}: task {self.name!r} does not read converted datasets")

    def select_others(self, clip: Clip, recent: Sequence[Clip], rng: random.Random) -> list[Clip] | None:
        """The ``num_clips - 1`` other clips a sample of ``clip`` looks at, chosen from ``recent``.

        The data stream calls it with the clips it read last (most recent first) and passes the
        result to :meth:`build` as ``others``. Default: the first ``num_clips - 1`` distinct
        recent clips other than ``clip`` (``[]`` for a single-clip task; the rng is not used).

        Args:
            clip: the anchor clip.
            recent: candidate clips (may hold ``clip`` itself and repeated keys).
            rng: the random source of the choice (the same rng :meth:`build` then gets).
        Returns:
            the other clips, or None when too few fit: then this clip gets no sample of this task
            (not a corrupt sample, nothing is counted).
        """
        need = self.num_clips - 1
        if need <= 0:
            return []
        out: list[Clip] = []
        seen = {clip.key}
        for other in recent:
            if other.key not in seen:
                seen.add(other.key)
                out.append(other)
                if len(out) == need:
                    return out
        return None

    def build(self, clip: Clip, rng: random.Random, others: Sequence[Clip] = ()) -> TaskSample:
        """Build one sample from ``clip`` (and ``others`` for multi-clip tasks), deterministic given ``rng``.

        Args:
            clip: the anchor clip (``clip.scene`` is its annotation).
            rng: the random source of every choice (phrasing, question, key frame, ...).
            others: ``num_clips - 1`` further clips (:meth:`select_others`; unused by single-clip
                tasks); ``MediaRef.clip`` ``j`` of the sample indexes ``[clip, *others]``.
        Returns:
            TaskSample whose prompt's placeholders match its ``media`` one to one, in order: the
            placeholders prefixed to the question, or where the question holds them
            (``TaskParts.inline_media``).
        Raises:
            SampleError: the clip's annotation lacks what the task needs (names the clip and task).
            ValueError: a task bug: the prompt's placeholders do not match the media references, or
                a reference names a clip that is not there.
        """
        if isinstance(clip, Clip) and is_annotation(clip.scene):
            if self.name not in clip.scene["answers"]:
                raise SampleError(f"clip {clip.key!r}: its annotation has no answer for task {self.name!r}")
            parts = self.compose_annotated(clip, clip.scene["answers"][self.name], rng)
        else:
            self._scene(clip)
            for name in self.text_fields:
                value = clip.scene.get(name)
                if not isinstance(value, (str, list)) or not value:
                    raise SampleError(f"clip {clip.key!r}: task {self.name!r} needs the annotation field {name!r}")
            parts = self._compose_clips(clip, list(others), rng)
        media = parts.media if parts.media is not None else tuple(MediaRef(p) for p in self.inputs)
        if parts.inline_media:
            prompt = parts.question
        else:
            prompt = " ".join(ref.placeholder for ref in media) + " " + parts.question
        found = _PLACEHOLDER_RE.findall(prompt)
        if found != [ref.placeholder for ref in media]:
            raise UserError(
                f"task {self.name!r}: the prompt's placeholders {found} do not match its media references "
                f"{[ref.placeholder for ref in media]} one to one, in order (prompt: {prompt!r})"
            )
        bad = [ref for ref in media if not 0 <= ref.clip <= len(others)]
        if bad:
            raise UserError(f"task {self.name!r}: media references {bad} name clips beyond the anchor and "
                             f"the {len(others)} other clip(s) given")
        target = " ".join([*parts.sentences, parts.conclusion]) if self.reasoning else parts.bare
        specs = {spec.name: spec for spec in self.dense_targets}
        for name, value in parts.dense.items():
            if name not in specs:
                raise SampleError(f"clip {clip.key!r}: task {self.name!r} made an undeclared dense target {name!r}")
            specs[name].check(value, f"clip {clip.key!r}, task {self.name!r}")
        missing = sorted(set(specs) - set(parts.dense))
        if missing:
            raise SampleError(f"clip {clip.key!r}: task {self.name!r} made no dense target {missing}")
        return TaskSample(self.name, prompt, target, parts.answer, tuple(media), dict(parts.dense))

    def _scene(self, clip: Clip) -> dict:
        if not isinstance(clip, Clip) or not isinstance(clip.scene, dict):
            raise ValueError(f"task {self.name!r}: expected a Clip with a scene graph dict, got {type(clip).__name__}")
        scene = clip.scene
        if "objects" not in scene:
            raise SampleError(f"clip {clip.key!r}: task {self.name!r}: the scene graph has no 'objects'")
        if self.needs_av_event and scene.get("av_event") is None:
            raise SampleError(
                f"clip {clip.key!r}: task {self.name!r} needs a single audio-visual event and the scene has none"
            )
        return scene

    def _compose_clips(self, clip: Clip, others: list[Clip], rng: random.Random) -> TaskParts:
        """The sample's parts from the anchor clip and ``others``; the default ignores ``others``."""
        return self._compose_clip(clip, rng)

    def _compose_clip(self, clip: Clip, rng: random.Random) -> TaskParts:
        """The sample's parts from the whole clip; the default reads only its scene graph."""
        return self._compose(clip.scene, rng)

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        raise NotImplementedError

    def _question(self, rng: random.Random, **slots: Any) -> str:
        return rng.choice(self.prompts).format(**slots)

    # ---- outputs -> losses and predictions --------------------------------------------------

    def dense_losses(self, outputs: dict[str, Dense], targets: dict[str, Dense]) -> dict[str, torch.Tensor]:
        """Losses this task adds to the LM loss, by loss name (weighted by ``model.dense_loss_weights``).

        Args:
            outputs: the model outputs named in ``outputs``, restricted to this task's samples
                (rows renumbered ``0..n-1``; a sample may own 0, 1 or several entries).
            targets: this task's dense targets, same rows.
        Returns:
            name -> scalar loss (mean over the task's samples); ``{}`` for text-only tasks.
        """
        return {}

    def predict(self, text: str, outputs: dict[str, torch.Tensor]) -> Any:
        """The prediction the metrics score for one generated sample.

        Args:
            text: the generated answer text.
            outputs: the sample's entries of each model output in ``outputs`` (``[k, ...]``, k >= 0:
                one per special token it emitted).
        Returns:
            the parsed prediction, or None on failure (counted by the failure rate). Default:
            ``parse(text)``.
        """
        return self.parse(text)

    def render(self, frames: torch.Tensor, media: Sequence[MediaRef], answer: Any, prediction: Any) -> Any:
        """An image of one generated example for TensorBoard, or None (text-only tasks).

        Args:
            frames: ``uint8 [T, 3, H, W]`` the segment frames of the sample's clip.
            media: the sample's media references; answer / prediction: as the metrics see them.
        Returns:
            ``uint8 [H', W', 3]`` numpy image, or None.
        """
        return None

    # ---- parsing and scoring ----------------------------------------------------------------

    def parse(self, text: Any) -> Any:
        """Structured prediction read from the tags of generated ``text``; None on failure."""
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        """A fresh MetricCollection; ``.update(preds: list[pred | None], targets: list[answer])``."""
        raise NotImplementedError

    def _collection(self, metrics: dict) -> MetricCollection:
        # compute_groups=False: torchmetrics would otherwise merge metrics whose states happen to
        # be equal after the first update (e.g. two empty per-type accuracies) and share state.
        return MetricCollection(metrics, compute_groups=False)

    def answer_to_pred(self, answer: Any) -> Any:
        """The prediction that is exactly right for ``answer`` (parse(target) == this)."""
        return answer

    def constant_candidates(self, answers: Sequence[Any]) -> list[Any]:
        """Constant predictions the majority baseline tries: the most frequent distinct answers."""
        counts = Counter(json.dumps(a, sort_keys=True) for a in answers)
        ordered = sorted(counts, key=lambda k: (-counts[k], k))[: self.max_baseline_candidates]
        return [self.answer_to_pred(json.loads(k)) for k in ordered]

    def trivial_baseline(
        self, answers: Sequence[Any], train_answers: Sequence[Any] | None = None
    ) -> dict[str, float]:
        """The score a predictor that ignores the media gets on ``answers``, through the task's own
        metrics (``baseline_name`` says which predictor). Default: :meth:`majority_baseline`
        (``train_answers`` is used only by tasks with ``baseline_fits_training``)."""
        return self.majority_baseline(answers)

    def extra_baselines(self, answers: Sequence[Any]) -> dict[str, dict[str, float]]:
        """Baselines reported beside :meth:`trivial_baseline` on ``answers``, by name (each through
        the task's own metrics, as it); default none. A task whose trivial baseline is stronger than
        a constant answer (the AVQA question-type prior) adds its best constant here."""
        return {}

    def majority_baseline(self, answers: Sequence[Any]) -> dict[str, float]:
        """Score of the best constant predictor on ``answers``, through the task's own metrics.

        Every candidate constant (``constant_candidates``) is scored with a fresh
        ``metrics()``; each key reports the best candidate for it (max, or min for keys in
        ``lower_is_better``).
        """
        answers = list(answers)
        if not answers:
            raise UserError(f"task {self.name!r}: majority_baseline needs at least one answer")
        best: dict[str, float] = {}
        for cand in self.constant_candidates(answers):
            collection = self.metrics()
            collection.update([cand] * len(answers), answers)
            for key, value in collection.compute().items():
                v = float(value)
                if key not in best:
                    best[key] = v
                elif key in self.lower_is_better:
                    best[key] = min(best[key], v)
                else:
                    best[key] = max(best[key], v)
        return best

    # ---- vocabulary -------------------------------------------------------------------------

    def slot_values(self) -> Iterable[str]:
        """Every value a ``{slot}`` can take (default: the whole scene vocabulary)."""
        return (*CLASSES, *COLORS, *SHAPES, *POSITIONS, *ROWS, *MOTIONS, *MOODS, *NUMBER_WORDS)

    def words(self) -> set[str]:
        """Every word and ``<tag>`` token the task's prompts and targets can contain.

        Includes the placeholders of ``inputs`` and the answer tags; digits and punctuation are
        excluded (the tokenizer has them as single characters).
        """
        out = template_words((" ".join(self.inputs), *SHARED_PHRASES, *self.prompts, *self.phrases))
        for value in self.slot_values():
            out |= text_words(value)
        return out
