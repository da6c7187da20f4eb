"""``polytask eval``: run the job on a gold file and print its quality beside what it cost, for one configuration or
several side by side (``--compare context=0 --compare context=1``).

Each configuration runs the whole gold file once, one after the other in this process, with no request cache (a
cached answer would make the second configuration look free and say nothing of its quality). Quality comes from
:func:`polytask.evaluate.score`; cost from the orchestrator's counters; peak memory is this process's peak resident
size so far (``ru_maxrss``), so a later column includes the earlier ones'.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from rich.table import Table

from ..costs import format_usd
from ..evaluate import Counts, EvalScores, score
from ..orchestrator import Orchestrator
from ._exits import fail

__all__ = ["Setting", "evaluate", "parse_compare", "read_gold"]


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# what --compare may change, and how its text becomes the setting's value
_CHANGEABLE: dict[str, Callable[[str], Any]] = {
    "model": str,
    "context": int,
    "fuse": lambda text: _flag(text),
    "pack": int,
    "pack_tokens": int,
    "concurrency": int,
    "temperature": float,
    "structured_outputs": str,
    "max_tokens_param": str,
    "simulate_faults": float,
    "stream": lambda text: _flag(text),
}

Setting = dict[str, Any]


def parse_compare(specs: Sequence[str]) -> list[Setting]:
    """``["context=0", "context=1,model=m"]`` → one setting per spec (an empty list: the command's own settings).

    Exits 2 naming the spec when a key is unknown or a value is not of its type.
    """
    out: list[Setting] = []
    for spec in specs:
        setting: Setting = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in _CHANGEABLE:
                fail(f"--compare {spec!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(_CHANGEABLE))}")
            try:
                setting[key] = _CHANGEABLE[key](value.strip())
            except ValueError:
                fail(f"--compare {spec!r}: {value.strip()!r} is not a valid {key}")
        out.append(setting)
    return out


def read_gold(path: Path) -> list[dict[str, Any]]:
    """The gold records (each with ``id`` and ``text``), exiting 2 naming the line of one that is not."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                fail(f"{path} line {number}: not JSON ({error})")
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                fail(f"{path} line {number}: a gold record needs 'text' (a string), and 'id'")
            record.setdefault("id", str(number))
            record["id"] = str(record["id"])
            if record["id"] in seen:
                fail(f"{path} line {number}: the id {record['id']!r} is used twice; gold ids must be unique")
            seen.add(record["id"])
            records.append(record)
    if not records:
        fail(f"{path} holds no gold records")
    return records


def evaluate(
    gold: list[dict[str, Any]], settings: list[Setting], make: Callable[[Setting], Orchestrator]
) -> list[tuple[str, EvalScores, dict[str, Any]]]:
    """Run every setting over ``gold`` (``make`` builds its orchestrator) → ``(label, scores, figures)`` each."""
    by_id = {record["id"]: record for record in gold}
    documents = [{"id": r["id"], "text": r["text"]} for r in gold]
    out = []
    for setting in settings or [{}]:
        orch = make(setting)

        async def run(orch: Orchestrator = orch) -> Any:
            async with orch:
                return await orch.run(documents)

        started = time.perf_counter()
        results = anyio.run(run)
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        stats = orch.stats
        figures = {
            "calls": stats.requests,
            "asked_alone": stats.asked_alone,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "cost": stats.cost if stats.prices is not None else None,
            "wall_s": wall,
            "peak_rss_mb": peak / 2**20,
            "partial": sum(r.partial for r in results),
        }
        label = ", ".join(f"{k}={v}" for k, v in setting.items()) or "as given"
        out.append((label, score(by_id, results), figures))
    return out


def table(gold_path: Path, runs: list[tuple[str, EvalScores, dict[str, Any]]]) -> Table:
    """The side-by-side table ``polytask eval`` prints."""
    result = Table(title=f"polytask eval: {gold_path.name}")
    result.add_column("")
    for label, _, _ in runs:
        result.add_column(label, justify="right")

    def row(name: str, cell: Callable[[EvalScores, dict[str, Any]], str]) -> None:
        result.add_row(name, *(cell(s, f) for _, s, f in runs))

    def prf(pick: Callable[[EvalScores], Any]) -> Callable[[EvalScores, dict[str, Any]], str]:
        def cell(s: EvalScores, f: dict[str, Any]) -> str:
            c = pick(s)
            if c is None or c.tp + c.fp + c.fn == 0:
                return "—"
            return f"{c.precision:.3f} / {c.recall:.3f} / {c.f1:.3f}"

        return cell

    row("documents (partial)", lambda s, f: f"{s.documents:,} ({f['partial']:,})")
    row("sentence boundaries P / R / F1", prf(lambda s: s.sentences))
    row("entities P / R / F1 (exact span + label)", prf(lambda s: s.entities))
    labels = sorted({label for _, s, _ in runs for label in s.entities_by_label})
    for label in labels:

        def of_label(s: EvalScores, label: str = label) -> Counts | None:
            return s.entities_by_label.get(label)

        row(f"  {label}", prf(of_label))
    row(
        "sentiment accuracy",
        lambda s, f: "—" if s.sentiment_accuracy is None else f"{s.sentiment_accuracy:.3f} of {s.sentiment_total:,}",
    )
    row("calls", lambda s, f: f"{f['calls']:,}")
    row("pairs asked again alone (fuse / pack)", lambda s, f: f"{f['asked_alone']:,}")
    row("prompt / completion tokens", lambda s, f: f"{f['prompt_tokens']:,} / {f['completion_tokens']:,}")
    row("cost", lambda s, f: "unknown" if f["cost"] is None else format_usd(f["cost"]))
    row("wall time", lambda s, f: f"{f['wall_s']:.1f} s")
    row("peak memory (process so far)", lambda s, f: f"{f['peak_rss_mb']:.0f} MB")
    return result
