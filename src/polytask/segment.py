"""Rule-based sentence segmentation with exact character offsets.

:func:`segment` splits a document into :class:`~polytask.documents.Sentence` spans. It is pure Python,
one pass of compiled regular expressions over the text (linear time), with no models and no data files.

The rules are this module's own, written for English and for Chinese / Japanese text and tuned by
measuring boundary F1 on the dev splits of UD_English-EWT (web text: reviews, e-mail, Q&A, blogs) and
UD_Chinese-GSDSimp (Wikipedia) — see ``benchmarks/segment_f1.py``. They are general rules
(abbreviations, initials, numbers, URLs, quotes, ellipses, line breaks, e-mail greetings and
sign-offs), not a memory of those documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .documents import Sentence
from .exceptions import ConfigurationError

__all__ = ["segment"]

# --- character classes -----------------------------------------------------------------------------

# Terminators: ASCII, CJK fullwidth, fullwidth full stop, ellipsis, double marks.
_TERM_CHARS = ".!?。！？．…‼⁇⁈⁉｡"
# Closing quotes / brackets that belong to the sentence they follow.
_CLOSE_CHARS = "\"'”’»)\\]}」』）》〉】〕〗〙〛｣］｝〞"
_OPEN_CHARS = "\"'“‘«([{「『（《〈【〔〖〘〚｢［｛〝¿¡"
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\uac00-\ud7af"

_TERM = "[" + re.escape(_TERM_CHARS) + "]"
_CLOSE = "[" + re.escape(_CLOSE_CHARS) + "]"

_EMOTICON = r"(?:[:;=][-o^']?[()DPpOo3\[\]/\\|*]|[(][:;]|<3|\^_*\^|[xX]D)"
_SIGNOFF = (
    r"(?:(?:best|kind|kindest|warm|warmest)\s+(?:regards|wishes)|regards|sincerely|cheers|thanks(?:\s+again)?"
    r"|thank\s+you|many\s+thanks|yours(?:\s+(?:truly|sincerely))?|respectfully|take\s+care|keep\s+in\s+touch"
    r"|best)"
)
_GREETING = r"(?:hi|hello|hey|dear|greetings|good\s+(?:morning|afternoon|evening))\b[^\n.,;:!?]{0,40}"
# Candidate boundaries: a run of terminators, each optionally followed by closers ("？”。" is one run);
# a line break; an emoticon; a greeting or sign-off ending in a comma ("Best regards,", "Hi John,").
_CANDIDATE_RE = re.compile(
    rf"(?:{_TERM}+{_CLOSE}*)+|\n"
    rf"|(?<!\S)(?P<emo>{_EMOTICON}+)(?=\s)"
    rf"|(?<![^\s.!?])(?P<hello>(?:{_SIGNOFF}|{_GREETING}),)(?=\s)",
    re.IGNORECASE,
)
_EMOTICON_RE = re.compile(rf"{_EMOTICON}+(?!\S)")
_CJK_STOP_RE = re.compile("[。！？‼⁇⁈⁉｡]")
_CJK_RE = re.compile(f"[{_CJK_RANGES}]")
_SPACE_RE = re.compile(r"\s*")
_DOTTED_ABBREV_RE = re.compile(r"(?:[A-Za-z]\.){1,}[A-Za-z]\Z")  # "U.S", "e.g", "a.m", "Ph.D"
_NUMBER_RE = re.compile(r"[0-9]+\Z")
_URLISH_RE = re.compile(r"(?:https?://|www\.|@|\.[a-z]{2,4}/)", re.IGNORECASE)
_NEXT_WORD_RE = re.compile(r"[^\s]+")
# Where an over-long sentence may be cut: CJK clause marks anywhere, ASCII ones before whitespace.
_SOFT_PUNCT_RE = re.compile(r"[、，；：︰﹔﹕]|[;:,](?=\s)")
_SPACES_RE = re.compile(r"\s+")
# Chinese quoted speech followed by its attribution ("“你好吗？”他问道。"): the clause after the closing quote, up
# to the next clause or sentence mark, is short and has a verb of saying in it. Then the quote does not end the
# sentence: the attribution belongs to it (the convention of Chinese treebanks; Japanese marks it with と instead).
_ATTRIBUTION_RE = re.compile(
    r"[^。！？，,；;：:“”「」『』\n]{0,10}?(?:说|問|问|道|答|喊|叫|嚷|吼|笑|叹|称|表示|指出|回答|写道|告诉)"
    r"[^。！？“”「」『』\n]{0,12}?[。！？，,]"
)
_LIST_MARKER_RE = re.compile(r"(?:[-*•·‣◦▪–—]|\d{1,3}[.)]|[A-Za-z][.)]|\(\w{1,3}\))\s")

# Abbreviations that are followed by a name and never end a sentence.
_TITLES = frozenset(
    "mr mrs ms messrs mmes dr prof rev gen col capt cpt lt sgt cmdr adm gov sen rep hon pres supt insp"
    " mt ft st fr sr jr".split()
)
# Abbreviations that announce what follows and never end a sentence.
_NEVER_END = frozenset("e.g i.e cf vs viz approx ca al ps p.s pps p.p.s drs".split())
# Abbreviations that precede a number ("No. 5", "p. 12", "Jan. 3").
_BEFORE_NUMBER = frozenset(
    "no nos nr vol vols pp p fig figs eq eqs ch chap sec sect art para op ed"
    " jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
# Abbreviations that may end a sentence: a boundary only when a typical sentence opener follows.
_MAY_END = frozenset(
    "etc inc ltd co corp llc plc bros assn dept univ est ave blvd rd hwy sq oz lb lbs hr hrs mins secs"
    " tel ext misc govt intl natl mfg mgr div dist".split()
)
# Words that typically open a sentence; used after ambiguous abbreviations and initials.
_OPENERS = frozenset(
    "i i'm i've i'd i'll we you he she it they this that these those there here the a an my our your"
    " his her its their but and so if when while after before however also then now yes no please"
    " thanks thank what why how where who which it's that's there's what's".split()
)


def _skip_space(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not whitespace (``len(text)`` if none)."""
    m = _SPACE_RE.match(text, pos)
    return m.end() if m else pos


def _word_at(text: str, pos: int) -> str:
    """The run of non-space characters starting at ``pos``."""
    m = _NEXT_WORD_RE.match(text, pos)
    return m.group() if m else ""


def _word_before(text: str, lo: int, pos: int) -> str:
    """The run of non-space characters ending at ``pos`` (at most 80 characters back, not before ``lo``)."""
    i = pos
    stop = max(lo, pos - 80)
    while i > stop and not text[i - 1].isspace():
        i -= 1
    return text[i:pos]


def _cjk(ch: str) -> bool:
    return _CJK_RE.match(ch) is not None


def _is_boundary(text: str, start: int, end: int, seg_start: int, never_end: frozenset[str] = frozenset()) -> bool:
    """Whether the terminator run ``text[start:end]`` ends a sentence (the boundary is at ``end``); ``never_end``:
    the caller's own abbreviations (lowercase, without their final period)."""
    n = len(text)
    run = text[start:end]
    nxt_pos = _skip_space(text, end)
    if nxt_pos >= n:
        return True
    nxt = text[nxt_pos]
    spaced = nxt_pos > end
    prev = text[start - 1] if start > 0 else ""

    # CJK full stops end a sentence wherever they are, except a Japanese quote closed before a particle
    # (「はい。」と言った).
    if _CJK_STOP_RE.search(run):
        if not spaced and run[-1] in '」』"”' and nxt in "とっのをがはにもやか":
            return False
        if not spaced and run[-1] in "」』”" and _ATTRIBUTION_RE.match(text, nxt_pos):
            return False  # "“你好吗？”他问道。": the attribution is part of the sentence
        return True
    if run[0] == "．" and not (prev.isdigit() and nxt.isdigit()):
        return True

    if not spaced:
        # "3.14", "e.g.", "www.x.com", "end.Next": only a lowercase word glued to a capitalised one,
        # or anything glued to CJK text, is a boundary.
        if _cjk(nxt):
            return _cjk(prev) or run[0] in "!?…"
        if nxt in _OPEN_CHARS or nxt in "-*":
            return False
        if not (nxt.isupper() and prev.islower()):
            return False
        word = _word_before(text, seg_start, start)
        if _URLISH_RE.search(word) or "." in word or len(word) < 2:
            return False
        after = _word_at(text, nxt_pos)
        if after.lower().rstrip(".,;:!?/") in ("com", "net", "org", "edu", "gov", "uk", "de", "html", "htm"):
            return False
        return not ("." in after or "@" in after or any(c.isupper() for c in after[1:]))

    if nxt in _CLOSE_CHARS and nxt not in "\"'":
        return False  # "(see p. 3) ..." — a closer after a space belongs to something larger
    if nxt in _TERM_CHARS or _EMOTICON_RE.match(text, nxt_pos):
        return False  # "region . . . This", "I love her. :) I have": the later mark decides
    quoted = any(c in "\"'”’»" for c in run)
    if "?" in run or "!" in run or "‽" in run:
        # "he asked "why?" and left": a quoted question followed by lowercase continues.
        return not (quoted and nxt.islower())

    # From here the run is "." (possibly several) or "…", followed by whitespace.
    if "…" in run or ".." in run:
        return not nxt.islower()

    word = _word_before(text, seg_start, start)
    while word and word[0] in _OPEN_CHARS:
        word = word[1:]
    low = word.lower()
    after = _word_at(text, nxt_pos)
    after_low = after.lower().strip("\"'“‘(,;:")
    opener = after_low in _OPENERS
    if low in _TITLES:
        return False
    if low in _NEVER_END or low in never_end:
        return False
    if low in _BEFORE_NUMBER and (nxt.isdigit() or nxt in "#"):
        return False
    if low in _MAY_END:
        return nxt.isupper() and (opener or len(low) > 3)
    if _DOTTED_ABBREV_RE.match(word):
        return nxt.isupper() and opener
    if len(word) == 1 and word.isalpha() and word.isupper():
        # An initial ("J. Smith") unless a sentence opener follows ("plan B. The ...").
        return nxt.isupper() and opener
    if _NUMBER_RE.match(word) and len(word) <= 2 and text[seg_start:start].strip() == word:
        return False  # a list number: "1. Buy milk"
    if nxt.islower():
        # Lower-cased web text: an ordinary word before the stop still ends the sentence.
        return word.isalpha() and len(word) >= 2
    return True


def _newline_is_boundary(text: str, pos: int, seg_start: int) -> bool:
    """Whether the line break at ``pos`` ends a sentence (a terminator before it is judged separately).

    Always after a blank line or before a list item; otherwise when the line is shorter than its
    neighbours leave room for (so the break is not hard wrapping), or before a sentence opener.
    """
    n = len(text)
    nxt_pos = _skip_space(text, pos)
    if nxt_pos >= n:
        return True
    if "\n" in text[pos + 1 : nxt_pos]:
        return True  # a blank line: always a paragraph break
    if _LIST_MARKER_RE.match(text, nxt_pos):
        return True
    line_start = text.rfind("\n", 0, pos) + 1
    prev_line = text[line_start:pos].strip()
    if not prev_line:
        return True
    nxt = text[nxt_pos]
    # Hard-wrapped text breaks a line only when the next word would not fit: if it would have fitted
    # within the width of the neighbouring lines, the break is the writer's, so it ends a sentence.
    next_end = text.find("\n", nxt_pos)
    next_line = text[nxt_pos : n if next_end < 0 else next_end].rstrip()
    width = len(next_line)
    if line_start > 0:
        width = max(width, line_start - 1 - (text.rfind("\n", 0, line_start - 1) + 1))
    first_word = _word_at(text, nxt_pos)
    if len(text[line_start:pos].rstrip()) + 1 + len(first_word) <= width:
        return True
    # It looks wrapped: a boundary only before a typical sentence opener, after a line that does not
    # visibly continue.
    last = prev_line[-1]
    if last in ",;-–—&" or last in _OPEN_CHARS:
        return False
    if not (nxt.isupper() or nxt.isdigit() or _cjk(nxt) or nxt in _OPEN_CHARS):
        return False
    if _cjk(nxt) and _cjk(last):
        return False  # a hard-wrapped CJK line
    return first_word.lower().strip("\"'“‘(,;:") in _OPENERS


def _web_boundary(text: str, m: re.Match[str], seg_start: int) -> bool:
    """Boundaries without a terminator in web text: after an emoticon, a greeting or a sign-off."""
    nxt_pos = _skip_space(text, m.end())
    if nxt_pos >= len(text):
        return True
    nxt = text[nxt_pos]
    if m.lastgroup == "emo":
        return not _EMOTICON_RE.match(text, nxt_pos) and (nxt.isupper() or not nxt.isalnum())
    # "Best regards," / "Hi John," opening their own line of a message, before a capital.
    return nxt.isupper() and _skip_space(text, seg_start) >= m.start()


def _boundaries(text: str, never_end: frozenset[str] = frozenset()) -> list[int]:
    """End offsets (exclusive) of sentences, before whitespace trimming, in increasing order."""
    ends: list[int] = []
    seg_start = 0
    for m in _CANDIDATE_RE.finditer(text):
        start, end = m.start(), m.end()
        if start < seg_start:
            continue
        if m.lastgroup is not None:
            ok = _web_boundary(text, m, seg_start)
        elif text[start] == "\n":
            ok = _newline_is_boundary(text, start, seg_start)
        else:
            ok = _is_boundary(text, start, end, seg_start, never_end)
        if ok:
            ends.append(end)
            seg_start = _skip_space(text, end)  # candidates inside the whitespace that follows are moot
    ends.append(len(text))
    return ends


def _split_long(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Cut ``text[start:end]`` into pieces of at most ``max_chars`` characters, preferring punctuation,
    then whitespace near the limit."""
    pieces: list[tuple[int, int]] = []
    while end - start > max_chars:
        hi = start + max_chars
        lo = start + max_chars // 2
        cut = -1
        for lower in (lo, start + 1):
            for pm in _SOFT_PUNCT_RE.finditer(text, lower, hi):
                cut = pm.end()
            if cut > start:
                break
            for sm in _SPACES_RE.finditer(text, lower, hi + 1):
                cut = sm.start()
            if cut > start:
                break
        if cut <= start:
            cut = hi
        piece_end = cut
        while piece_end > start and text[piece_end - 1].isspace():
            piece_end -= 1
        pieces.append((start, piece_end))
        start = _skip_space(text, cut)
    if end > start:
        pieces.append((start, end))
    return pieces


def segment(text: str, *, max_chars: int = 1000, abbreviations: Iterable[str] = ()) -> list[Sentence]:
    """Split ``text`` into sentences with exact character offsets.

    Args:
        text: the document. Any length; empty or whitespace-only text gives ``[]``.
        max_chars: the longest sentence allowed, in characters (code points). A longer sentence is cut
            after the last clause mark (``、 ， ； ：`` anywhere, ``; : ,`` before a space) in the second half
            of the ``max_chars`` window, else at the last whitespace there, else the same in the first
            half, else hard at the limit; so every piece has at most ``max_chars`` characters.
        abbreviations: your own abbreviations, which a period never ends a sentence after (``"approx"``,
            ``"Abs."``, ``"Ref"``: case-insensitive, the final period optional), added to the built-in ones. To
            use them in a run: ``Orchestrator(..., segmenter=functools.partial(pt.segment, abbreviations=[...]))``.

    Returns:
        ``Sentence(index, start, end, text)`` in document order, ``index`` 0..n-1, with
        ``text[start:end] == sentence.text``. Offsets are Python ``str`` indices, end exclusive.
        Sentences do not overlap, never start or end with whitespace, and together cover every
        non-whitespace character of ``text`` exactly once.

    Raises:
        ConfigurationError: ``max_chars`` is below 1, or an abbreviation is not a string.

    Rules (this module's own, tuned on the UD_English-EWT and UD_Chinese-GSDSimp dev splits):
    ``. ! ?`` followed by whitespace end a sentence unless the word before is an abbreviation (titles
    such as "Dr.", "e.g.", "No. 5", "U.S." before a lowercase word, initials such as "J. Smith") or a
    list number; ``. !`` inside numbers, URLs and e-mail addresses never do; ``。！？`` (and fullwidth
    ``．``) end a sentence with no space needed; closing quotes and brackets after a terminator stay with
    its sentence, and so does a short attribution after a Chinese quote ("“你好吗？”他问道。"); ``…`` and
    ``...`` end one unless a lowercase word follows; in web text ``.`` after an ordinary word ends one even
    before a lowercase word, as do an emoticon and a greeting / sign-off ("Best regards,") opening a line; a
    blank line always ends one, a single line break does before a list item, or when the line is shorter than
    hard wrapping would leave it, or before a sentence opener ("I", "The", "Thanks" ...).

    Measured (``benchmarks/segment_f1.py``): boundary F1 0.86 on UD_English-EWT dev web text (pysbd
    0.80), 0.996 on UD_Chinese-GSDSimp dev (pysbd 0.99); about 2-5 million characters per second
    (building the pydantic ``Sentence`` objects costs about 4 µs each).
    """
    if max_chars < 1:
        raise ConfigurationError(f"max_chars must be at least 1, got {max_chars}")
    if isinstance(abbreviations, str):
        abbreviations = [abbreviations]  # one abbreviation, not its letters
    if not all(isinstance(a, str) for a in abbreviations):
        raise ConfigurationError("abbreviations must be strings, such as ['approx', 'Abs.']")
    own = frozenset(a.strip().lower().removesuffix(".") for a in abbreviations if a.strip())
    sentences: list[Sentence] = []
    prev = 0
    for cut in _boundaries(text, own):
        s, e = prev, cut
        prev = cut
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if s >= e:
            continue
        for ps, pe in _split_long(text, s, e, max_chars) if e - s > max_chars else ((s, e),):
            sentences.append(Sentence(index=len(sentences), start=ps, end=pe, text=text[ps:pe]))
    return sentences
