"""Sentence-boundary precision / recall / F1 and speed of :func:`polytask.segment.segment`.

Usage (from the repository root)::

    python benchmarks/segment_f1.py [--data-dir ../shared/data] [--errors N]

Reads ``ewt_dev.jsonl`` and ``zh_gsd_dev.jsonl`` (each line: ``text`` and gold ``sentences``
``[{start, end}]``). Default data dir: ``../shared/data`` relative to the repository root, else
``examples/``. A boundary is a sentence end offset, normalised to the position after the sentence's
last non-space character; each document's final end is ignored. pysbd is measured too when it is
importable (it is not a dependency of polytask).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from polytask.evaluate import boundaries  # noqa: E402
from polytask.segment import segment  # noqa: E402

Spans = list[tuple[int, int]]
DATASETS = (("ewt_dev.jsonl", "en"), ("zh_gsd_dev.jsonl", "zh"))


def load(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def one_per_line(doc: dict[str, object]) -> dict[str, object]:
    """The document with the single space between gold sentences replaced by a line break."""
    chars = list(str(doc["text"]))
    for sent in doc["sentences"][:-1]:  # type: ignore[index]
        end = int(sent["end"])
        if end < len(chars) and chars[end] == " ":
            chars[end] = "\n"
    return {**doc, "text": "".join(chars)}


def hard_wrapped(doc: dict[str, object], width: int = 72) -> dict[str, object]:
    """The document hard-wrapped at ``width`` columns by turning spaces into line breaks (offsets kept)."""
    chars = list(str(doc["text"]))
    line_start = 0
    last_space = -1
    for i, ch in enumerate(chars):
        if ch == " ":
            last_space = i
        if i - line_start >= width and last_space > line_start:
            chars[last_space] = "\n"
            line_start = last_space + 1
    return {**doc, "text": "".join(chars)}


def polytask_spans(text: str, lang: str) -> Spans:
    return [(s.start, s.end) for s in segment(text)]


def pysbd_factory() -> Callable[[str, str], Spans] | None:
    try:
        import pysbd  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    segmenters = {lang: pysbd.Segmenter(language=lang, clean=False, char_span=True) for lang in ("en", "zh")}

    def spans(text: str, lang: str) -> Spans:
        return [(s.start, s.end) for s in segmenters[lang].segment(text)]

    return spans


def evaluate(
    fn: Callable[[str, str], Spans], docs: list[dict[str, object]], lang: str, errors: int = 0
) -> tuple[float, float, float, float]:
    tp = fp = fn_ = 0
    chars = 0
    elapsed = 0.0
    shown = 0
    for doc in docs:
        text = str(doc["text"])
        gold_spans = [(int(s["start"]), int(s["end"])) for s in doc["sentences"]]  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        pred_spans = fn(text, lang)
        elapsed += time.perf_counter() - t0
        chars += len(text)
        gold, pred = boundaries(text, gold_spans), boundaries(text, pred_spans)
        tp += len(gold & pred)
        fp += len(pred - gold)
        fn_ += len(gold - pred)
        if shown < errors:
            for kind, offsets in (("FP", pred - gold), ("FN", gold - pred)):
                for off in sorted(offsets):
                    print(f"  {kind} {text[max(0, off - 45) : off]!r} | {text[off : off + 30]!r}")
                    shown += 1
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn_) if tp + fn_ else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f1, chars / elapsed if elapsed else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--errors", type=int, default=0, help="print up to N boundary errors of polytask")
    parser.add_argument(
        "--line-breaks",
        action="store_true",
        help="also score English copies with one sentence per line (+lines) and hard-wrapped at 72 (+wrap72)",
    )
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir or ROOT.parent / "shared" / "data"
    if not data_dir.is_dir():
        data_dir = ROOT / "examples"
    segmenters: list[tuple[str, Callable[[str, str], Spans]]] = [("polytask", polytask_spans)]
    sbd = pysbd_factory()
    if sbd is None:
        print("pysbd not installed: skipped", file=sys.stderr)
    else:
        segmenters.append(("pysbd", sbd))
    rows = []
    for filename, lang in DATASETS:
        path = data_dir / filename
        if not path.is_file():
            print(f"{path}: missing, skipped", file=sys.stderr)
            continue
        docs = load(path)
        for name, fn in segmenters:
            shown = args.errors if name == "polytask" else 0
            rows.append((name, filename, *evaluate(fn, docs, lang, shown)))
        if lang == "en" and args.line_breaks:
            for suffix, transform in (("+lines", one_per_line), ("+wrap72", hard_wrapped)):
                variant = [transform(d) for d in docs]
                for name, fn in segmenters:
                    rows.append((name, filename + suffix, *evaluate(fn, variant, lang)))
    print(f"{'segmenter':<10} {'dataset':<25} {'precision':>9} {'recall':>7} {'F1':>6} {'chars/s':>12}")
    for name, dataset, p, r, f1, cps in rows:
        print(f"{name:<10} {dataset:<25} {p:>9.3f} {r:>7.3f} {f1:>6.3f} {cps:>12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
