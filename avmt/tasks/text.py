"""Text helpers of the tasks: tag extraction, normalization and the offline tokenizer's word rule."""

from __future__ import annotations

import re
from typing import Any, Iterable

__all__ = ["normalize_text", "clean_text", "label_key", "wrap_tag", "extract_tag", "has_empty_tag", "tokenize", "text_words", "template_words"]

_TOKEN_RE = re.compile(r"</?[A-Za-z_]+>|[A-Za-z]+|\d|[^\sA-Za-z\d]")
_SLOT_RE = re.compile(r"\{[^{}]*\}")
_TAG_RES: dict[str, re.Pattern[str]] = {}


def normalize_text(text: str) -> str:
    """Lower-case ``text`` and collapse every run of whitespace to one space (stripped ends)."""
    return " ".join(str(text).split()).lower()


def clean_text(text: str) -> str:
    """Collapse every run of whitespace to one space (stripped ends); case and punctuation kept.

    What the parsers return for a class name or a label: the name as written in the answer
    (``"Frying_(food)"``, ``"Male speech, man speaking"``), only its surrounding whitespace tidied.
    """
    return " ".join(str(text).split())


def label_key(text: str) -> str:
    """The comparison key of a class name / label: case-folded, with all whitespace removed.

    The one normalization every metric that compares class names uses, so "Church bell",
    "church  bell" and "CHURCH BELL" are the same class (and "Frying_( food )" is "frying_(food)").
    Punctuation is kept: "Frying_(food)" and "Frying (food)" stay different.
    """
    return "".join(str(text).split()).casefold()


def wrap_tag(tag: str, content: Any) -> str:
    """``wrap_tag("answer", "yes")`` -> "<answer> yes </answer>" (the targets' tag format)."""
    return f"<{tag}> {content} </{tag}>"


def _tag_pattern(tag: str) -> re.Pattern[str]:
    pattern = _TAG_RES.get(tag)
    if pattern is None:
        t = re.escape(tag)
        pattern = re.compile(rf"<\s*{t}\s*>(.*?)<\s*/\s*{t}\s*>", re.IGNORECASE | re.DOTALL)
        _TAG_RES[tag] = pattern
    return pattern


def extract_tag(text: Any, tag: str, *, keep_case: bool = False) -> str | None:
    """Content of the last ``<tag> ... </tag>`` pair in ``text``, normalized; None if absent.

    Tag matching is case-insensitive and tolerates spaces inside the angle brackets
    (``< ANSWER >``). The content is lower-cased with whitespace collapsed
    (:func:`normalize_text`), or with ``keep_case`` only whitespace-collapsed (:func:`clean_text`,
    what class-name and label parsers use). Returns None when
    ``text`` is not a string, when either tag is missing, or when the content is empty.
    Never raises.
    """
    if not isinstance(text, str):
        return None
    matches = _tag_pattern(tag).findall(text)
    if not matches:
        return None
    content = clean_text(matches[-1]) if keep_case else normalize_text(matches[-1])
    return content or None


def has_empty_tag(text: Any, tag: str) -> bool:
    """True when ``text`` holds a ``<tag> </tag>`` pair with nothing but whitespace inside."""
    if not isinstance(text, str):
        return False
    return any(not m.strip() for m in _tag_pattern(tag).findall(text))


def tokenize(text: str) -> list[str]:
    """Split ``text`` by the offline tokenizer's rule.

    Whitespace separates tokens; ``<tag>`` / ``</tag>`` are single tokens; every digit and every
    punctuation character is its own token; runs of letters are words.
    """
    return _TOKEN_RE.findall(text)


def text_words(text: str) -> set[str]:
    """The tokens of ``text`` that a vocabulary must list: words and ``<tag>`` tokens."""
    return {t for t in tokenize(text) if t[0].isalpha() or (t[0] == "<" and len(t) > 1)}


def template_words(templates: Iterable[str]) -> set[str]:
    """Words of template strings with their ``{slot}`` fields removed (slots add their own)."""
    out: set[str] = set()
    for template in templates:
        out |= text_words(_SLOT_RE.sub(" ", template))
    return out
