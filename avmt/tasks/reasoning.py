"""Reasoning sentences: what is seen and heard, and when (the explicit-reasoning answer style)."""

from __future__ import annotations

from typing import Iterable, Sequence

from avmt.data.vocab import NUMBER_WORDS, POSITION_PHRASES
from avmt.intervals import merge_ranges
from avmt.tasks.scene import is_visible

__all__ = ["SHARED_PHRASES", "span_phrase", "number_word", "object_noun", "object_sentence"]

#: Fixed fragments the shared sentence helpers can emit (their words go into every task's words()).
SHARED_PHRASES: tuple[str, ...] = (
    "from second {s} to second {e}",
    ", ",
    " and ",
    "on the left",
    "in the center",
    "on the right",
    "A {noun} is seen and heard {span}.",
    "A {noun} is seen {span} and heard {span}.",
    "A {noun} is heard {span} but not seen.",
    "A {noun} is seen {span} but not heard.",
    "A {noun} is neither seen nor heard.",
    "So the answer is {answer}.",
)


def span_phrase(ranges: Iterable[Sequence[int]]) -> str:
    """``[[2, 7]]`` -> "from second 2 to second 7"; several ranges joined with ", " and " and "."""
    parts = [f"from second {s} to second {e}" for s, e in merge_ranges(ranges)]
    if not parts:
        return ""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def number_word(n: int) -> str:
    """``3`` -> "three" (vocab NUMBER_WORDS); numbers beyond the vocabulary fall back to digits."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def object_noun(obj: dict, visual: bool | None = None) -> str:
    """Noun phrase for an object: "red violin on the left" when seen, "violin" when only heard.

    ``visual`` forces (True) or suppresses (False) colour and position; None uses whether the
    object is ever visible.
    """
    if visual is None:
        visual = is_visible(obj)
    if not visual:
        return obj["class"]
    where = POSITION_PHRASES.get(obj.get("position", ""), "")
    return " ".join(p for p in (obj.get("color", ""), obj["class"], where) if p)


def object_sentence(obj: dict) -> str:
    """One sentence saying when the object is seen and when it is heard.

    Example: "A red violin on the left is seen and heard from second 2 to second 7."
    """
    vis = merge_ranges(obj.get("visible", []))
    snd = merge_ranges(obj.get("sounding", []))
    noun = object_noun(obj, visual=bool(vis))
    if vis and snd:
        if vis == snd:
            return f"A {noun} is seen and heard {span_phrase(vis)}."
        return f"A {noun} is seen {span_phrase(vis)} and heard {span_phrase(snd)}."
    if snd:
        return f"A {noun} is heard {span_phrase(snd)} but not seen."
    if vis:
        return f"A {noun} is seen {span_phrase(vis)} but not heard."
    return f"A {noun} is neither seen nor heard."
