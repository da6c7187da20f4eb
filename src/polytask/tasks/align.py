"""Align entity strings returned by a model to character offsets in the sentence they came from.

Rules, in order, for each entity (in the model's order):

1. exact match of the entity text;
2. a match after Unicode NFKC normalization (a character with its combining marks, so NFC and NFD text meet),
   case folding and whitespace collapsing, mapped back to the original offsets;

Repeated mentions of the same text take successive occurrences left to right, preferring an occurrence that does
not overlap a mention aligned before it (so "New Orleans" after "New Orleans Habitat" lands on its own occurrence,
not inside the longer name) and then one on word boundaries, when there are enough of those for every mention of
that text (so "US" lands on "US", not inside an earlier "USB", while "Merkel" twice in "Merkels Politik … Merkel
blieb" keeps both). No word boundaries are checked in scripts written without spaces (Chinese, Japanese, Korean,
Thai, Lao, Khmer, Myanmar, Tibetan) or whose prefixes and clitics join the word (Hebrew, Arabic, Syriac, Thaana).
An entity found by neither rule is returned unaligned (offsets None), never dropped and never placed at an invented
position.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Alignment", "align_mentions"]


@dataclass(frozen=True, slots=True)
class Alignment:
    """Where one mention lies in the sentence: ``[start, end)`` (None when unaligned) and how it was found."""

    start: int | None
    end: int | None
    match: Literal["exact", "normalized"] | None


_NOT_PLAIN = re.compile(r"[^\S ]|  ")  # whitespace other than a single space


def _normalize(text: str) -> tuple[str, list[int], list[int]]:
    """Normalized text and, for each of its characters, the source span ``[start, end)`` it came from.

    A character and the combining marks after it are normalized together (NFKC composes "u" + U+0308 into "ü", so
    text and entity meet whichever of NFC / NFD each is in), then case-folded; runs of whitespace become one space.
    """
    n = len(text)
    if text.isascii() and not _NOT_PLAIN.search(text):  # NFKC leaves ASCII as it is; nothing to collapse
        return text.lower(), list(range(n)), list(range(1, n + 1))
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i = 0
    while i < n:
        if text[i].isspace():
            if not (out and out[-1] == " "):
                out.append(" ")
                starts.append(i)
                ends.append(i + 1)
            i += 1
            continue
        j = i + 1
        while j < n and unicodedata.combining(text[j]):
            j += 1
        for ch in unicodedata.normalize("NFKC", text[i:j]).casefold():
            out.append(ch)
            starts.append(i)
            ends.append(j)
        i = j
    return "".join(out), starts, ends


def _spaced(ch: str) -> bool:
    """A letter or digit of a script whose words a name's edges can be checked against: not one written without
    spaces (CJK, kana, Hangul, Thai, Lao, Khmer, Myanmar, Tibetan) or whose prefixes and clitics join the word
    (Hebrew, Arabic, Syriac, Thaana)."""
    if not ch.isalnum():
        return False
    code = ord(ch)
    return not (
        0x0590 <= code <= 0x08FF  # Hebrew, Arabic, Syriac, Thaana, N'Ko …: prefixes and clitics join the word
        or 0x0E00 <= code <= 0x0FFF  # Thai, Lao, Tibetan
        or 0x1000 <= code <= 0x109F  # Myanmar
        or 0x1780 <= code <= 0x17FF  # Khmer
        or 0x1100 <= code <= 0x11FF  # Hangul jamo
        or 0x2E80 <= code <= 0xA4CF  # CJK radicals … kana … CJK ideographs, Yi
        or 0xAC00 <= code <= 0xD7FF  # Hangul syllables
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or 0xFB1D <= code <= 0xFDFF  # Hebrew and Arabic presentation forms
        or 0xFE70 <= code <= 0xFEFF  # Arabic presentation forms B
        or 0xFF66 <= code <= 0xFFDC  # half-width kana, Hangul
        or code >= 0x20000  # CJK extensions
    )


def _on_word_boundaries(haystack: str, at: int, end: int) -> bool:
    """Whether ``haystack[at:end]`` starts and ends a word (not "Al" inside "Alamo", "US" inside "USB")."""
    before = at > 0 and _spaced(haystack[at - 1]) and _spaced(haystack[at])
    after = end < len(haystack) and _spaced(haystack[end]) and _spaced(haystack[end - 1])
    return not (before or after)


def _cuts_a_character(haystack: str, at: int, end: int) -> bool:
    """Whether ``haystack[at:end]`` starts or ends between a character and its combining marks."""
    return bool(unicodedata.combining(haystack[at])) or (
        end < len(haystack) and bool(unicodedata.combining(haystack[end]))
    )


def _find(haystack: str, needle: str, start: int, taken: list[tuple[int, int]], needed: int = 1) -> int:
    """Where the next of ``needed`` mentions of ``needle`` lies, at or after ``start``: the first occurrence that
    overlaps no span in ``taken`` and lies on word boundaries, if there are enough such occurrences for all
    ``needed`` mentions ("Merkel" twice in "Merkels Politik … Merkel blieb" keeps both, the first inside "Merkels");
    else the first that overlaps nothing; else the first at all; -1 when there is none."""
    at = haystack.find(needle, start)
    while at >= 0 and _cuts_a_character(haystack, at, at + len(needle)):
        at = haystack.find(needle, at + 1)
    first = at
    free: list[int] = []
    bounded: list[int] = []
    while at >= 0:
        if _cuts_a_character(haystack, at, at + len(needle)):
            pass  # "Zu" inside "Zu\u0308rich": half of "ü" is not a name
        elif all(at >= e or at + len(needle) <= s for s, e in taken):
            free.append(at)
            if _on_word_boundaries(haystack, at, at + len(needle)):
                bounded.append(at)
                if len(bounded) >= needed:
                    return bounded[0]
        at = haystack.find(needle, at + 1)
    return free[0] if free else first


def align_mentions(sentence: str, mentions: Sequence[str]) -> list[Alignment]:
    """Offsets of each mention in ``sentence``.

    Args:
        sentence: the sentence text.
        mentions: entity texts in the order the model gave them.

    Returns:
        One :class:`Alignment` per mention, in the same order; offsets are ``str`` indices into ``sentence``.
    """
    norm_sentence: tuple[str, list[int], list[int]] | None = None
    exact_cursor: dict[str, int] = {}
    norm_cursor: dict[str, int] = {}
    out: list[Alignment] = []
    taken: list[tuple[int, int]] = []
    texts = [m.strip() for m in mentions]
    left = Counter(texts)  # mentions of each text still to place, this one included
    for text in texts:
        left[text] -= 1
        if not text:
            out.append(Alignment(None, None, None))
            continue
        at = _find(sentence, text, exact_cursor.get(text, 0), taken, left[text] + 1)
        if at >= 0:
            exact_cursor[text] = at + len(text)
            taken.append((at, at + len(text)))
            out.append(Alignment(at, at + len(text), "exact"))
            continue
        if norm_sentence is None:
            norm_sentence = _normalize(sentence)
        haystack, starts, ends = norm_sentence
        needle = _normalize(text)[0].strip()
        norm_taken = [(bisect.bisect_left(starts, s), bisect.bisect_right(ends, e)) for s, e in taken]
        # continue after the exact occurrences of the same text already taken
        cursor = max(norm_cursor.get(needle, 0), bisect.bisect_left(starts, exact_cursor.get(text, 0)))
        at = _find(haystack, needle, cursor, norm_taken) if needle else -1
        if at < 0:
            out.append(Alignment(None, None, None))
            continue
        norm_cursor[needle] = at + len(needle)
        start, end = starts[at], ends[at + len(needle) - 1]
        taken.append((start, end))
        out.append(Alignment(start, end, "normalized"))
    return out
