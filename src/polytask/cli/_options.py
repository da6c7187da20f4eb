"""What ``polytask run``'s options become, each checked before anything is opened or started (a bad one exits 2
naming it): the tasks, the numbers, the prices, the paths, and the backend (or the built-in simulator)."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..backends.base import Backend
from ..costs import Prices
from ..exceptions import PolytaskError
from ..tasks import Classify, Entities, Sentiment, Task
from ._exits import fail

__all__ = [
    "TASK_HELP",
    "FuseOption",
    "PackOption",
    "PackTokensOption",
    "check_choices",
    "check_local",
    "check_numbers",
    "check_paths",
    "check_prices",
    "make_backend",
    "parse_task",
    "parse_tasks",
    "simulator_config",
    "simulator_identity",
]

TASK_HELP = (
    "sentiment | entities | classify=LABEL1,LABEL2[,…] | classify-multi=LABEL1,LABEL2[,…] "
    "(repeatable; default: sentiment and entities; results are keyed by these names)"
)


# fewer calls per document (polytask.packing), the same in run, mcp and eval
FuseOption = Annotated[
    bool,
    typer.Option(
        "--fuse/--no-fuse",
        help="Ask all the tasks of a sentence in one call (each task's part validated alone; an invalid part is "
        "asked again alone).",
    ),
]
PackOption = Annotated[
    int,
    typer.Option(
        metavar="N",
        help="Ask up to N consecutive sentences of a document in one call, as many as fit --pack-tokens (each "
        "sentence's answer validated alone; a missing or invalid one is asked again alone). 1: one call per sentence.",
    ),
]
PackTokensOption = Annotated[
    int,
    typer.Option(metavar="TOKENS", help="With --pack: the most estimated tokens of one call, prompt + answer."),
]


def parse_task(spec: str) -> Task[Any]:
    """A built-in task from its CLI spelling (``sentiment``, ``entities``, ``classify=a,b``)."""
    name, _, arg = spec.partition("=")
    name = name.strip().lower()
    if name == "sentiment" and not arg:
        return Sentiment()
    if name == "entities" and not arg:
        return Entities()
    if name in ("classify", "classify-multi") and arg:
        labels = [x.strip() for x in arg.split(",") if x.strip()]
        return Classify(labels, multi_label=name == "classify-multi", name=name)  # both can run at once
    raise typer.BadParameter(f"unknown task {spec!r}; expected {TASK_HELP}", param_hint="--task")


def parse_tasks(specs: list[str] | None) -> list[Task[Any]]:
    """The tasks of ``--task`` (default: sentiment and entities)."""
    try:
        return [parse_task(spec) for spec in (specs or ["sentiment", "entities"])]
    except PolytaskError as error:
        fail(str(error))


def check_numbers(**values: float | None) -> None:
    """Reject impossible settings before anything is opened or started (exit status 2, no traceback)."""
    positive = (
        "rpm",
        "tpm",
        "timeout",
        "concurrency",
        "attempts",
        "budget",
        "rate_window",
        "rpm_window",
        "serve_at_once",
        "deadline",
        "workers",
        "batch_size",
        "pack",
        "pack_tokens",
        "batch_poll",
    )
    for name, value in values.items():
        if value is None:
            continue
        if not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value:g}")
        if name in positive and not value > 0:
            fail(f"--{name.replace('_', '-')} must be greater than 0, got {value:g}")
        if not value >= 0:
            fail(f"--{name.replace('_', '-')} must be 0 or more, got {value:g}")
    for name in ("rate_window", "rpm_window"):
        window = values.get(name)
        if window is not None and not 0 < window <= 60:
            fail(f"--{name.replace('_', '-')} is the seconds an RPM limit is enforced over, in (0, 60], got {window:g}")
    for name in ("simulate_faults", "faults"):
        if (values.get(name) or 0) > 1:
            fail(f"--{name.replace('_', '-')} is a share of calls, from 0 to 1, got {values[name]:g}")


def check_choices(structured_outputs: str, max_tokens_param: str) -> None:
    """``--structured-outputs`` and ``--max-tokens-param`` name a mode the OpenAI backend knows (exit 2 if not)."""
    for flag, value, allowed in (
        ("--structured-outputs", structured_outputs, ("json_schema", "json_object", "none")),
        ("--max-tokens-param", max_tokens_param, ("auto", "max_completion_tokens", "max_tokens")),
    ):
        if value not in allowed:
            fail(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def check_prices(price_in: float | None, price_out: float | None) -> Prices | None:
    """``--price-in`` / ``--price-out`` (USD per million tokens, already checked ≥ 0) as :class:`Prices`, or None
    when neither is given (the backend's own, if it knows them); one without the other exits 2."""
    if price_in is None and price_out is None:
        return None
    if price_in is None or price_out is None:
        given, missing = ("--price-in", "--price-out") if price_out is None else ("--price-out", "--price-in")
        fail(f"{given} needs {missing} too: pass both (USD per million prompt / completion tokens)")
    return Prices(input=price_in, output=price_out)


def check_local(given: dict[str, Any]) -> None:
    """``given``: option name → its value if the user set it, else None. The hosted-API options are an error with
    ``--backend local``, not silently ignored."""
    ignored = [name for name, value in given.items() if value is not None]
    if ignored:
        fail(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to --backend local")


def check_paths(input: str, output: str, oracle: Path | None) -> tuple[Path | None, Path]:
    """``(input path or None for standard input, output path)``, after checking what can be checked up front."""
    in_path = None if input == "-" else Path(input)  # standard input ("./-" is a file named "-")
    if in_path is not None and not in_path.exists():
        fail(f"the input {in_path} does not exist")
    if in_path is not None and in_path.is_dir():
        fail(f"the input {in_path} is a folder: name a JSON Lines file")
    out_path = Path(output)
    if output != "-":
        if in_path is not None and out_path.exists() and out_path.resolve() == in_path.resolve():
            fail(f"the output {output} is the input file: choose another path (the input would be overwritten)")
        if out_path.is_dir():
            fail(f"the output {output} is a folder: name a file")
        if not out_path.parent.is_dir():
            fail(f"the output folder {out_path.parent} does not exist")
    if oracle is not None and not oracle.is_file():
        fail(f"the simulator's gold file {oracle} does not exist")
    return in_path, out_path


def check_distinct(paths: dict[str, Path | None]) -> None:
    """Exit 2 when two of the named files (the input, ``--output``, ``--trace``, ``--cache``) are one file: writing
    one would destroy the other (a trace truncating the input, an output replacing the request cache)."""
    seen: dict[Path, str] = {}
    for name, path in paths.items():
        if path is None:
            continue
        where = path.expanduser().resolve()
        if where in seen:
            fail(
                f"{name} {path} is the same file as {seen[where]}: choose another path (one would overwrite the other)"
            )
        seen[where] = name


def make_backend(
    kind: str,
    model: str | None,
    base_url: str | None,
    rpm: float | None,
    tpm: float | None,
    timeout: float,
    cache_identity: str | None = None,
    *,
    dry_run: bool = False,
    structured_outputs: str = "json_schema",
    max_tokens_param: str = "auto",
    stream: bool = False,
    batch: Any = False,
    batch_state: Path | None = None,
) -> Backend:
    """The backend ``--backend`` names (a local model loads here); ``cache_identity``: see
    :class:`~polytask.OpenAIBackend` (the built-in simulator's port changes with every run, its answers do not).
    A dry run sends nothing, so it needs no API key. ``batch`` (True or a :class:`~polytask.BatchOptions`) and
    ``batch_state``: the Batch API mode (``--batch-api``) and its state file."""
    try:
        if kind == "openai":
            from ..backends.openai import OpenAIBackend

            return OpenAIBackend(
                model or "gpt-4o-mini",
                base_url=base_url,
                rpm=rpm,
                tpm=tpm,
                timeout=timeout,
                cache_identity=cache_identity,
                structured_outputs=structured_outputs,  # type: ignore[arg-type]  # checked by the backend
                max_tokens_param=max_tokens_param,  # type: ignore[arg-type]
                stream=stream,
                api_key="not-needed-for-a-dry-run" if dry_run and not os.environ.get("OPENAI_API_KEY") else None,
                batch=batch,
                batch_state=batch_state,
            )
        if kind == "local":
            from ..backends.transformers import TransformersBackend

            return TransformersBackend(model)
    except PolytaskError as error:
        fail(str(error))
    raise typer.BadParameter(f"unknown backend {kind!r}; expected openai or local", param_hint="--backend")


def simulator_config(rpm: float | None, tpm: float | None, latency: float, oracle: Path | None, faults: float) -> Any:
    """A simulator configuration whose transient faults (429, 500, 503, connection reset) add up to ``faults``."""
    from ..testing import FaultRates, SimulatorConfig

    share = faults / 4
    return SimulatorConfig(
        rpm=rpm,
        tpm=tpm,
        latency=latency,
        latency_sigma=0.5 if latency else 0.0,
        gold_path=oracle,
        faults=FaultRates(rate_limit=share, server_error=share, unavailable=share, reset=share),
    )


def open_trace(path: Path) -> Any:
    """The ``--trace`` file, opened (a :class:`~polytask.traces.JsonlTrace`, closed by the caller's ``with``).

    Exits 2 (usage error) when it cannot be written: a missing folder, a directory, no permission.
    """
    from ..traces import JsonlTrace

    try:
        return JsonlTrace(path)
    except OSError as error:
        fail(f"--trace {path}: cannot write it ({error.strerror or error})")


def start_simulator(
    stack: contextlib.ExitStack[Any],
    rpm: float | None,
    tpm: float | None,
    latency: float,
    oracle: Path | None,
    faults: float,
) -> tuple[str, str]:
    """Start the built-in simulator for the rest of ``stack``; returns its base URL and its cache identity."""
    from ..testing import run_in_thread

    config = simulator_config(rpm, tpm, latency, oracle, faults)
    url = stack.enter_context(run_in_thread(config)).base_url
    assert url is not None  # started
    return url, simulator_identity(config, oracle)


def batch_options(simulated: bool, poll: float | None = None) -> Any:
    """``--batch-api``'s options: the defaults (a batch first polled after 5 s, growing to a minute), or against the
    built-in simulator, which ends a batch at once, 0.05 s; ``poll``: ``--batch-poll``, the first poll's wait."""
    if not simulated and poll is None:
        return True
    from ..backends import BatchOptions

    if simulated:
        return BatchOptions(flush_after=0.05, poll_every=poll or 0.05, poll_max=max(0.5, poll or 0))
    return BatchOptions(poll_every=poll or 5.0, poll_max=max(60.0, poll or 0))


def batch_state_path(output: Path) -> Path:
    """``--batch-api``'s state file for an output file: ``.NAME.batches`` beside it (and beside its partial file)."""
    return output.with_name(f".{output.name}.batches")


def batches_submitted(backend: Backend) -> int:
    """The batches an OpenAI backend in batch mode created (0 for any other backend)."""
    from ..backends.openai import OpenAIBackend

    return backend.batches_submitted if isinstance(backend, OpenAIBackend) else 0


def remove_batch_state(path: Path) -> None:
    """Delete a batch state file and SQLite's files beside it (``-wal``, ``-shm``)."""
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)


def simulator_identity(config: Any, oracle: Path | None) -> str:
    """The built-in simulator's identity for the request cache and the partial file: its answers depend on its seed
    and gold file, not on the port it got this time."""
    return f"polytask-simulator seed={config.seed} oracle={oracle.resolve() if oracle else ''}"
