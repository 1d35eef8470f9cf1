"""Answer budgets for generation, learned from the training targets.

A task's answers have a shape that the training data shows: how many tokens they take, how
many reasoning sentences come before the sentence that holds the tagged answer, how long a
sentence is, and which token starts the tagged sentence ("So" in every reasoning conclusion,
``<event>`` when the target is the tags alone). :class:`AnswerShapes` records that shape per
task while training (and travels in the checkpoint); generation then uses it

- to stop early: a task's ``max_new_tokens`` is its longest training target plus a margin
  (short answers no longer wait for the longest task's budget), and
- to keep a reasoning answer answering (:class:`ReasoningBudget`): a small model trained on
  explicit reasoning tends to loop on a description sentence and never reach the tags. When a
  row has written as many sentences as any training target had before its tagged sentence, or
  repeats a sentence it already wrote, or runs a sentence past the longest training sentence,
  the next token is forced to be the sentence end and then the token that starts the tagged
  sentence; the model writes the rest itself.

Nothing here names a task: the shapes come from the targets.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from transformers import LogitsProcessor

from avmt.errors import UserError

__all__ = ["AnswerShape", "AnswerShapes", "ReasoningBudget", "sentence_end_ids"]

_SENTENCE_SPLIT = re.compile(r"(?<=\.)\s+")


def sentence_end_ids(tokenizer: Any) -> list[int]:
    """Ids of the vocabulary tokens that end a sentence (their text ends with ``.``)."""
    vocab = tokenizer.get_vocab()
    ids = []
    for token, index in vocab.items():
        text = tokenizer.convert_tokens_to_string([token]).strip()
        if text.endswith(".") and not text.endswith(".."):
            ids.append(int(index))
    return sorted(ids)


def tagged_sentence_index(target: str) -> int | None:
    """How many sentences of ``target`` come before the first one holding a tag (``<...>``);
    None if the target has no tag (free text such as a caption)."""
    for index, sentence in enumerate(_SENTENCE_SPLIT.split(target.strip())):
        if "<" in sentence:
            return index
    return None


@dataclass
class AnswerShape:
    """What the training targets of one task look like (token counts include the final eos).

    Attributes:
        max_tokens: longest target.
        max_sentences: most sentences before the tagged sentence (0 when the tags come first).
        max_sentence_tokens: longest of those sentences.
        lead_ids: the token ids that start the tagged sentence (one id = a constant lead).
        targets: how many targets were seen.
    """

    max_tokens: int = 0
    max_sentences: int = 0
    max_sentence_tokens: int = 0
    lead_ids: list[int] = field(default_factory=list)
    tagged: bool = True
    targets: int = 0

    @property
    def lead_id(self) -> int | None:
        """The token every tagged sentence starts with, or None (free text, or leads vary)."""
        return self.lead_ids[0] if self.tagged and len(self.lead_ids) == 1 else None


class AnswerShapes:
    """Per-task :class:`AnswerShape` from the training targets; saved in checkpoints as a dict.

    Args:
        end_ids: sentence-end token ids (:func:`sentence_end_ids`).
        margin: generation budget = ``ceil(max_tokens * (1 + margin)) + 2``.
    """

    def __init__(self, end_ids: Iterable[int], margin: float = 0.25) -> None:
        self.end_ids = frozenset(int(i) for i in end_ids)
        self.margin = float(margin)
        self.shapes: dict[str, AnswerShape] = {}
        # task -> targets counted at the last merge, the same on every rank (what a rank adds since is its own)
        self._merged_targets: dict[str, int] = {}

    def update(self, task: str, target: str, target_ids: Sequence[int]) -> None:
        """Record one training target.

        Args:
            task: its task name; target: its text; target_ids: its token ids (eos included).
        """
        shape = self.shapes.setdefault(task, AnswerShape())
        ids = [int(i) for i in target_ids]
        shape.targets += 1
        shape.max_tokens = max(shape.max_tokens, len(ids))
        before = tagged_sentence_index(target)
        if before is None:
            shape.tagged = False
            return
        ends = [i for i, token in enumerate(ids) if token in self.end_ids]
        if len(ends) < before:
            shape.tagged = False  # the tokenizer does not split sentences where the text does
            return
        starts = [0, *(e + 1 for e in ends[:before])]  # starts[before]: the tagged sentence
        start = starts[before]
        for a, b in zip(starts, ends[:before]):
            shape.max_sentence_tokens = max(shape.max_sentence_tokens, b - a + 1)
        shape.max_sentences = max(shape.max_sentences, before)
        if start < len(ids) and ids[start] not in shape.lead_ids:
            shape.lead_ids.append(ids[start])

    def max_new_tokens(self, task: str, cap: int) -> int:
        """Generation length for ``task``: its longest target plus the margin, at most ``cap``."""
        shape = self.shapes.get(task)
        if shape is None or not shape.max_tokens:
            return cap
        return min(cap, math.ceil(shape.max_tokens * (1 + self.margin)) + 2)

    def processor(self, tasks: Sequence[str]) -> ReasoningBudget | None:
        """A :class:`ReasoningBudget` for rows of ``tasks``, or None when no row has a constant lead."""
        shapes = [self.shapes.get(task) for task in tasks]
        if not any(shape is not None and shape.lead_id is not None for shape in shapes):
            return None
        return ReasoningBudget(
            leads=[shape.lead_id if shape is not None else None for shape in shapes],
            max_sentences=[shape.max_sentences if shape is not None else 0 for shape in shapes],
            max_sentence_tokens=[
                math.ceil(shape.max_sentence_tokens * (1 + self.margin)) + 2 if shape is not None else 0
                for shape in shapes
            ],
            end_ids=sorted(self.end_ids),
        )

    def state_dict(self) -> dict[str, dict]:
        """JSON-able shapes, by task."""
        return {task: asdict(shape) for task, shape in self.shapes.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore :meth:`state_dict` (the same on every rank: a merged state)."""
        self.shapes = {task: AnswerShape(**values) for task, values in state.items()}
        self._merged_targets = {task: shape.targets for task, shape in self.shapes.items()}

    def rank_state(self) -> dict[str, dict]:
        """What :meth:`merge` needs of this process: :meth:`state_dict` plus, per task, ``new_targets``,
        the targets recorded here since the last merge."""
        return {task: {**asdict(shape), "new_targets": shape.targets - self._merged_targets.get(task, 0)}
                for task, shape in self.shapes.items()}

    def merge(self, states: Sequence[dict[str, dict]]) -> None:
        """Become the shapes of every process's targets: ``states`` holds each process's
        :meth:`rank_state`, in rank order, so that every process that merges the same list ends with
        the same shapes and the same generation budgets (under DDP/FSDP each rank records only its
        own batches' targets). Longest lengths and sentence counts are maxima, lead tokens the union
        in rank order, ``tagged`` holds when it holds everywhere, ``targets`` counts each target once
        however often merge runs.
        """
        merged: dict[str, AnswerShape] = {}
        for state in states:
            for task, values in state.items():
                shape = merged.setdefault(task, AnswerShape(targets=self._merged_targets.get(task, 0)))
                shape.max_tokens = max(shape.max_tokens, values["max_tokens"])
                shape.max_sentences = max(shape.max_sentences, values["max_sentences"])
                shape.max_sentence_tokens = max(shape.max_sentence_tokens, values["max_sentence_tokens"])
                shape.lead_ids += [i for i in values["lead_ids"] if i not in shape.lead_ids]
                shape.tagged = shape.tagged and values["tagged"]
                shape.targets += values["new_targets"]
        self.shapes = merged
        self._merged_targets = {task: shape.targets for task, shape in merged.items()}


@dataclass
class _RowState:
    """What :class:`ReasoningBudget` has read of one row so far (rows only grow between calls)."""

    seen: int = 0  # tokens read
    start: int = 0  # where the current sentence starts
    count: int = 0  # sentences completed
    sentences: set[tuple[int, ...]] = field(default_factory=set)
    last_repeated: bool = False  # the last completed sentence repeats an earlier one
    concluded: bool = False  # the lead began a sentence: leave the row alone


class ReasoningBudget(LogitsProcessor):
    """Force a row to conclude once its reasoning has used its budget (see the module docstring).

    Per row (the generated tokens only; transformers passes no prompt ids when generation starts
    from embeddings; each call reads only the tokens added since the previous one): once the token that starts the tagged sentence (``lead``) has been emitted
    at a sentence start, the row is left alone. Before that, at a sentence start, the lead is
    forced when the row has written ``max_sentences`` sentences or its last sentence repeats an
    earlier one; inside a sentence, a sentence end is forced after ``max_sentence_tokens`` tokens.

    Args:
        leads: ``[B]`` lead token id per row (None = leave the row alone).
        max_sentences: ``[B]`` reasoning sentences allowed before the tagged sentence.
        max_sentence_tokens: ``[B]`` tokens allowed per reasoning sentence (0 = no limit).
        end_ids: sentence-end token ids; the first one is the one forced.
    """

    def __init__(self, leads: Sequence[int | None], max_sentences: Sequence[int],
                 max_sentence_tokens: Sequence[int], end_ids: Sequence[int]) -> None:
        if not end_ids:
            raise UserError("ReasoningBudget needs at least one sentence-end token id")
        self.leads = list(leads)
        self.max_sentences = list(max_sentences)
        self.max_sentence_tokens = list(max_sentence_tokens)
        self.end_ids = frozenset(int(i) for i in end_ids)
        self.end_id = int(end_ids[0])
        #: Rows where a forced token was not the model's own first choice (the budget intervened).
        self.forced_rows: set[int] = set()
        self._rows = [_RowState() for _ in self.leads]

    def _forced_token(self, row: int, ids: list[int]) -> int | None:
        lead = self.leads[row]
        if lead is None:
            return None
        state = self._rows[row]
        if len(ids) < state.seen:  # a new generation with this processor: start over
            state = self._rows[row] = _RowState()
        for i in range(state.seen, len(ids)):  # only the tokens generated since the last call
            token = ids[i]
            if i == state.start and token == lead:
                state.concluded = True  # the tagged sentence has begun
                break
            if token in self.end_ids:
                sentence = tuple(ids[state.start:i + 1])
                state.last_repeated = sentence in state.sentences
                state.sentences.add(sentence)
                state.count += 1
                state.start = i + 1
        state.seen = len(ids)
        if state.concluded:
            return None
        if state.start == len(ids):  # at a sentence start
            if state.count >= self.max_sentences[row] or state.last_repeated:
                return lead
            return None
        limit = self.max_sentence_tokens[row]
        if limit and len(ids) - state.start >= limit:
            return self.end_id
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Args: input_ids ``[B, n]`` generated so far; scores ``[B, V]``. Returns scores with forced rows."""
        rows = input_ids.tolist()
        for row, ids in enumerate(rows):
            token = self._forced_token(row, ids)
            if token is not None:
                if int(scores[row].argmax()) != token:
                    self.forced_rows.add(row)
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, token] = 0.0
        return scores
