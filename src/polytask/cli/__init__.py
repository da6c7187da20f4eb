"""The ``polytask`` command: ``polytask run`` for JSON Lines batch jobs, ``polytask simulate`` for a local server,
``polytask mcp`` for MCP clients (stdio; see :mod:`polytask.cli._mcp`).

Exit status of ``run``: 0 when every document succeeded; 1 when any document is partial (unless
``--allow-partial``) or any input line was invalid (its output line says why); 2 when the run stopped early
(insufficient quota, a rejected API key, a server that failed everything for ``--max-outage`` seconds, the next
call could take the run past ``--budget``) or could not start; 130 when interrupted (143 on SIGTERM; the documents
finished by then are kept in the partial file it names, or were already printed with ``-o -``); 141 when the reader
of ``-o -`` went away. After exit 2, 130, 143 or any death (kill -9), the same command resumes: the documents its
partial file holds are not asked again (``--restart`` starts over), see :mod:`polytask.cli._journal`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console

from .._version import __version__
from ..backends.base import settings_of
from ..cache import default_cache_path
from ..costs import batch_prices
from ..exceptions import PolytaskError
from ..orchestrator import Orchestrator
from ..ray_runner import RayOrchestrator
from ..retry import RetryPolicy
from ..tools import AnalyzeTool
from . import _options
from ._exits import err, fail, show_warnings, signals
from ._journal import Journal, job_fingerprint
from ._jsonl import Input
from ._options import (
    TASK_HELP,
    check_choices,
    check_distinct,
    check_local,
    check_numbers,
    check_paths,
    check_prices,
    open_trace,
    parse_task,
    parse_tasks,
)
from ._run import Progress, dry_run_table, write_file, write_stdout

__all__ = ["app", "main", "parse_task"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run structured LLM tasks on every sentence.")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"polytask {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Run structured LLM tasks on every sentence."""


@app.command()
def run(
    input: Annotated[str, typer.Argument(help="JSON Lines input, one document per line; - for standard input.")],
    output: Annotated[
        str,
        typer.Option("--output", "-o", help="JSON Lines output, one line per input document; - for standard output."),
    ],
    task: Annotated[list[str] | None, typer.Option("--task", "-t", help=TASK_HELP)] = None,
    backend: Annotated[str, typer.Option(help="openai | local")] = "openai",
    model: Annotated[str | None, typer.Option(help="Model name (openai) or local path (local).")] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL).")
    ] = None,
    rpm: Annotated[float | None, typer.Option(help="Requests-per-minute limit.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens-per-minute limit.")] = None,
    structured_outputs: Annotated[
        str,
        typer.Option(
            help="json_schema | json_object | none: the response_format to start with (openai; a server that "
            "refuses one falls back to the next on its own).",
        ),
    ] = "json_schema",
    max_tokens_param: Annotated[
        str,
        typer.Option(
            help="auto | max_completion_tokens | max_tokens: the field the completion cap is sent in (openai; auto "
            "switches to max_tokens when the server ignores the other).",
        ),
    ] = "auto",
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Ask for each answer as a stream of server-sent events (openai), read whole before it is parsed; a "
            "stream cut off mid-way is retried.",
        ),
    ] = False,
    batch_api: Annotated[
        bool,
        typer.Option(
            "--batch-api",
            help="Send the calls through the provider's Batch API (openai; half the price, answers within 24 h): "
            "collected into batches, polled until done; a killed run resumes waiting for its batches (recorded in "
            ".OUTPUT.batches) instead of paying twice. --price-in / --price-out are then the live prices, halved.",
        ),
    ] = False,
    batch_poll: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="With --batch-api: seconds before a batch's first status poll, growing 1.5× per poll up to a "
            "minute (default 5; 0.05 against --simulate).",
        ),
    ] = None,
    rate_window: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="The seconds the server enforces its RPM over (Azure OpenAI: 1 or 10), so the first burst is one it "
            "admits (default: 60, or what its RateLimit-Policy header says).",
        ),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Most calls in flight (default 64; local: 2 × the batch size).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per HTTP call.")] = 60.0,
    attempts: Annotated[int, typer.Option(help="Most attempts per call.")] = 6,
    price_in: Annotated[
        float | None,
        typer.Option(
            metavar="USD",
            help="What a prompt token costs, USD per million tokens (with --price-out; default: genai-prices' price "
            "for a known model at a known provider, else the cost is unknown).",
        ),
    ] = None,
    price_out: Annotated[
        float | None,
        typer.Option(metavar="USD", help="What a completion token costs, USD per million tokens (with --price-in)."),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            metavar="USD",
            help="Stop before a call that could take the run's cost past this many dollars (exit 2; needs known "
            "prices). A rerun with a higher budget resumes from the cache.",
        ),
    ] = None,
    max_outage: Annotated[
        float,
        typer.Option(help="Stop the run after the server failed every call for this many seconds (0: never)."),
    ] = 300.0,
    context: Annotated[int, typer.Option(help="Neighbouring sentences passed as context on each side.")] = 0,
    fuse: _options.FuseOption = False,
    pack: _options.PackOption = 1,
    pack_tokens: _options.PackTokensOption = 2048,
    text_field: Annotated[str, typer.Option(help="Input field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="Input field holding the document id.")] = "id",
    simulate: Annotated[
        bool,
        typer.Option(help="Run against the built-in simulator (no API key, no network); implied by --simulate-*."),
    ] = False,
    simulate_oracle: Annotated[
        Path | None, typer.Option(help="Gold JSONL the simulator answers entities from.")
    ] = None,
    simulate_faults: Annotated[float, typer.Option(help="Share of simulated calls that fail transiently.")] = 0.0,
    simulate_latency: Annotated[float, typer.Option(help="Median simulated latency, seconds.")] = 0.0,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="Request cache (SQLite): answers validated before are not paid for again "
            "(default: $POLYTASK_CACHE_DIR/requests.sqlite, else ~/.cache/polytask/requests.sqlite)."
        ),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the request cache.")] = False,
    trace: Annotated[
        Path | None,
        typer.Option(
            metavar="PATH",
            help="Write one JSON line per call attempt here: document, sentence, task, attempt, status, waits, "
            "latency, tokens, cost, HTTP status, error, request id, Retry-After.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Read and segment the input and print what the job would take (calls, tokens, dollars, time at "
            "--rpm/--tpm) without making any call or writing OUTPUT.",
        ),
    ] = False,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="Discard what an unfinished earlier run of OUTPUT left in its partial file, instead of resuming.",
        ),
    ] = False,
    progress: Annotated[
        bool, typer.Option(help="Show progress: a live bar on a terminal, else a line every --progress-every s.")
    ] = True,
    progress_every: Annotated[
        float,
        typer.Option(help="Seconds between progress lines when stderr is not a terminal (0: one per document)."),
    ] = 30.0,
    allow_partial: Annotated[
        bool, typer.Option(help="Exit 0 when every document was written, even if some pairs failed (partial).")
    ] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Spread the documents over Ray workers (openai backend; pip install 'polytask[ray]'): a local "
            "cluster with this machine's CPUs, or the one at --ray-address. Without --redis the workers share the "
            "limit through a Ray actor.",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(metavar="ADDRESS", help="With --ray: a running cluster ('auto', ray://host:10001)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="With --ray: batches run at once (default: the cluster's CPUs)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="With --ray: documents per batch (a dead worker's batch is run again elsewhere).")
    ] = 16,
    redis: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Share the RPM / TPM limit through Redis with every process naming the same --limit-key "
            "(redis://host:6379/0; pip install 'polytask[redis]').",
        ),
    ] = None,
    limit_key: Annotated[
        str | None, typer.Option(metavar="KEY", help="The shared limit's name in Redis (with --redis).")
    ] = None,
) -> None:
    """Run tasks on every sentence of every document in INPUT and write one merged result per line to OUTPUT."""
    check_numbers(
        rpm=rpm,
        tpm=tpm,
        rate_window=rate_window,
        timeout=timeout,
        concurrency=concurrency,
        attempts=attempts,
        max_outage=max_outage,
        progress_every=progress_every,
        context=context,
        pack=pack,
        pack_tokens=pack_tokens,
        simulate_faults=simulate_faults,
        simulate_latency=simulate_latency,
        price_in=price_in,
        price_out=price_out,
        budget=budget,
    )
    check_choices(structured_outputs, max_tokens_param)
    prices = check_prices(price_in, price_out)
    if batch_api and prices is not None:  # --price-in / --price-out are the live prices
        prices = batch_prices(prices)
    simulated = simulate or simulate_oracle is not None or bool(simulate_faults) or bool(simulate_latency)
    if backend == "local":
        check_local(
            {
                "--base-url": base_url,
                "--rpm": rpm,
                "--tpm": tpm,
                "--timeout": timeout != 60.0 or None,
                "--structured-outputs": structured_outputs if structured_outputs != "json_schema" else None,
                "--max-tokens-param": max_tokens_param if max_tokens_param != "auto" else None,
                "--stream": stream or None,
                "--batch-api": batch_api or None,
                "--rate-window": rate_window,
                "--simulate": simulate or None,
                "--simulate-oracle": simulate_oracle,
                "--simulate-faults": simulate_faults or None,
                "--simulate-latency": simulate_latency or None,
            }
        )
    check_numbers(workers=workers, batch_size=batch_size)
    if (redis is None) != (limit_key is None):
        fail("--redis and --limit-key go together: the Redis URL and the shared limit's name")
    if not ray and (workers is not None or batch_size != 16 or ray_address is not None):
        fail("--workers, --batch-size and --ray-address apply to --ray")
    if ray:
        for flag, given in (("--backend local", backend == "local"), ("--budget", budget), ("--trace", trace)):
            if given:
                fail(
                    f"{flag} is not available with --ray (the local backend on Ray: polytask.RayOrchestrator with "
                    "num_gpus=1, see the README's 'On Ray')"
                    if flag == "--backend local"
                    else f"{flag} is not available with --ray yet: each worker would keep its own"
                )
    check_numbers(batch_poll=batch_poll)
    if batch_poll is not None and not batch_api:
        fail("--batch-poll applies to --batch-api")
    if batch_api:
        clashes: list[tuple[str, object]] = [("--stream", stream), ("--rpm", rpm), ("--tpm", tpm), ("--ray", ray)]
        for flag, clash in [*clashes, ("--redis", redis)]:
            if clash:
                fail(f"{flag} does not go with --batch-api (the Batch API has its own queue and answers in one piece)")
    tasks = parse_tasks(task)
    if no_cache and cache is not None:
        fail("--cache and --no-cache contradict each other: pass one")
    in_path, out_path = check_paths(input, output, simulate_oracle)
    batch_state = _options.batch_state_path(out_path) if batch_api and output != "-" else None
    check_distinct(
        {
            "the input": in_path,
            "--output": out_path if output != "-" else None,
            "--trace": trace,
            "--cache": None if no_cache else (cache or default_cache_path()),
        }
    )
    show_warnings()
    with contextlib.ExitStack() as stack, signals.handling_sigterm():
        identity = None
        if simulated:
            args = (rpm, tpm, simulate_latency, simulate_oracle, simulate_faults)
            base_url, identity = _options.start_simulator(stack, *args)
        try:
            the_backend = _options.make_backend(
                backend,
                model,
                base_url,
                rpm,
                tpm,
                timeout,
                identity,
                dry_run=dry_run,
                structured_outputs=structured_outputs,
                max_tokens_param=max_tokens_param,
                stream=stream,
                batch=_options.batch_options(simulated, batch_poll) if batch_api else False,
                batch_state=batch_state,
            )
        except KeyboardInterrupt:
            why, code = signals.interruption()
            err.print(f"[red]{why}:[/] nothing was written", soft_wrap=True)
            raise typer.Exit(code) from None
        limiter = None
        if redis is not None and limit_key is not None and not ray:
            from ..redis_limiter import RedisRateLimiter

            try:
                limiter = RedisRateLimiter(redis, key=limit_key, rpm=rpm, tpm=tpm, window=rate_window)
            except PolytaskError as error:
                fail(str(error))
        try:
            orch: Orchestrator | RayOrchestrator = Orchestrator(
                the_backend,
                tasks,
                max_concurrency=concurrency,
                retry=RetryPolicy(attempts=attempts),
                max_outage=max_outage or None,
                limiter=limiter,
                rate_window=None if limiter is not None else rate_window,
                context_sentences=context,
                fuse=fuse,
                pack=pack,
                pack_tokens=pack_tokens,
                cache=None if no_cache else (cache or default_cache_path()),
                prices=prices,
                budget=budget,
                on_call=stack.enter_context(open_trace(trace)) if trace is not None and not dry_run else None,
            )
            if ray and not dry_run:
                anyio.run(orch.aclose)  # it only checked the options: the workers make their own
                orch = RayOrchestrator(
                    functools.partial(
                        _options.make_backend,
                        backend,
                        model,
                        base_url,
                        rpm,
                        tpm,
                        timeout,
                        identity,
                        structured_outputs=structured_outputs,
                        max_tokens_param=max_tokens_param,
                        stream=stream,
                    ),
                    tasks,
                    workers=workers,
                    batch_size=batch_size,
                    limiter_url=redis,
                    limiter_key=limit_key,
                    rpm=rpm,
                    tpm=tpm,
                    rate_window=rate_window,
                    cache=None if no_cache else (cache or default_cache_path()),
                    address=ray_address,
                    max_concurrency=concurrency,
                    retry=RetryPolicy(attempts=attempts),
                    max_outage=max_outage or None,
                    context_sentences=context,
                    fuse=fuse,
                    pack=pack,
                    pack_tokens=pack_tokens,
                    prices=prices,
                )
        except PolytaskError as error:
            fail(str(error))
        source = Input(in_path, text_field, id_field)
        problem = source.format_problem()
        if problem is not None:
            fail(problem)
        if dry_run:
            assert isinstance(orch, Orchestrator)
            try:
                plan = orch.dry_run(source.documents())
            finally:
                anyio.run(orch.aclose)
            err.print(dry_run_table(plan, source.invalid_count))
            raise typer.Exit(0)
        terminal = sys.stderr.isatty()
        show = Progress(bar=progress and terminal, every=progress_every if progress and not terminal else None)
        if output == "-":
            code = write_stdout(orch, source, show, allow_partial)
        else:
            job = job_fingerprint(
                tasks,
                settings_of(the_backend).identity or the_backend.name,
                in_path,
                context=context,
                text_field=text_field,
                id_field=id_field,
            )
            try:
                journal = Journal(out_path, job, restart=restart)
            except PolytaskError as error:
                fail(str(error))
            if restart and batch_state is not None:  # the earlier run's batches are not waited for (nor paid) again
                _options.remove_batch_state(batch_state)
            if journal.dropped:
                err.print(
                    f"[yellow]resuming:[/] {journal.dropped} bytes of a line cut off when the earlier run died were "
                    "dropped; that document is run again",
                    soft_wrap=True,
                )
            if journal.finished:
                err.print(f"resuming: {journal.finished} document(s) finished by an earlier run are kept")
            code = write_file(orch, source, journal, show, allow_partial)
            if batch_state is not None and not journal.path.exists():  # the output is whole: nothing to resume
                _options.remove_batch_state(batch_state)
        if batch_api:
            err.print(f"batch API: {_options.batches_submitted(the_backend)} batch(es) submitted by this run")
    raise typer.Exit(code)


@app.command()
def simulate(
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    rpm: Annotated[float | None, typer.Option(help="Requests-per-minute limit to enforce.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens-per-minute limit to enforce.")] = None,
    rpm_window: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Enforce the RPM over this many seconds (Azure OpenAI's 1 or 10)."),
    ] = 60.0,
    latency: Annotated[float, typer.Option(help="Median latency, seconds.")] = 0.0,
    oracle: Annotated[Path | None, typer.Option(help="Gold JSONL to answer entities from.")] = None,
    faults: Annotated[float, typer.Option(help="Share of calls failing transiently (429/500/503/reset).")] = 0.0,
    serve_at_once: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Work on at most N calls at once and queue the rest, as a local llama.cpp or Ollama does (each "
            "takes --latency once its turn comes; calls whose client gave up are still served).",
        ),
    ] = None,
) -> None:
    """Serve the OpenAI-compatible simulator until Ctrl-C."""
    from ..testing import serve

    check_numbers(rpm=rpm, tpm=tpm, rpm_window=rpm_window, latency=latency, faults=faults, serve_at_once=serve_at_once)
    config = _options.simulator_config(rpm, tpm, latency, oracle, faults).model_copy(
        update={"rpm_window": rpm_window, "serve_at_once": serve_at_once}
    )
    try:
        serve(config, host, port)
    except OSError as error:  # a busy port, an address not on this machine
        fail(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port (or --host)")


@app.command()
def mcp(
    task: Annotated[list[str] | None, typer.Option("--task", "-t", help=TASK_HELP)] = None,
    backend: Annotated[str, typer.Option(help="openai | local")] = "openai",
    model: Annotated[str | None, typer.Option(help="Model name (openai) or local path (local).")] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL).")
    ] = None,
    rpm: Annotated[float | None, typer.Option(help="Requests-per-minute limit, shared by every tool call.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens-per-minute limit, shared by every tool call.")] = None,
    structured_outputs: Annotated[
        str, typer.Option(help="json_schema | json_object | none: the response_format to start with (openai).")
    ] = "json_schema",
    max_tokens_param: Annotated[
        str, typer.Option(help="auto | max_completion_tokens | max_tokens: the completion cap's field (openai).")
    ] = "auto",
    rate_window: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="The seconds the server enforces its RPM over.")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Most calls in flight (default 64; local: 2 × the batch size).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per HTTP call.")] = 60.0,
    attempts: Annotated[int, typer.Option(help="Most attempts per call.")] = 6,
    price_in: Annotated[
        float | None, typer.Option(metavar="USD", help="What a prompt token costs, USD per million tokens.")
    ] = None,
    price_out: Annotated[
        float | None, typer.Option(metavar="USD", help="What a completion token costs, USD per million tokens.")
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(metavar="USD", help="The most the server may spend over its lifetime, USD (needs prices)."),
    ] = None,
    max_outage: Annotated[
        float, typer.Option(help="Stop a call after the server failed every call for this many seconds (0: never).")
    ] = 300.0,
    context: Annotated[int, typer.Option(help="Neighbouring sentences passed as context on each side.")] = 0,
    fuse: _options.FuseOption = False,
    pack: _options.PackOption = 1,
    pack_tokens: _options.PackTokensOption = 2048,
    deadline: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="analyze_text returns what finished after this many seconds, the rest listed as errors "
            "(default: wait for every pair).",
        ),
    ] = None,
    text_field: Annotated[str, typer.Option(help="analyze_file: the input field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="analyze_file: the input field holding the document id.")] = "id",
    simulate: Annotated[
        bool,
        typer.Option(help="Run against the built-in simulator (no API key, no network); implied by --simulate-*."),
    ] = False,
    simulate_oracle: Annotated[
        Path | None, typer.Option(help="Gold JSONL the simulator answers entities from.")
    ] = None,
    simulate_faults: Annotated[float, typer.Option(help="Share of simulated calls that fail transiently.")] = 0.0,
    simulate_latency: Annotated[float, typer.Option(help="Median simulated latency, seconds.")] = 0.0,
    cache: Annotated[
        Path | None,
        typer.Option(help="Request cache (SQLite; default: $POLYTASK_CACHE_DIR/requests.sqlite)."),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the request cache.")] = False,
) -> None:
    """Serve the tasks to MCP clients (Claude Desktop, IDEs, agent frameworks) over stdio.

    Two tools: analyze_text (one text) and analyze_file (a JSON Lines file, as `polytask run` does), every call in
    one orchestrator: one rate limit, cache and budget. Standard output carries the protocol only."""
    from . import _mcp

    check_numbers(
        rpm=rpm,
        tpm=tpm,
        rate_window=rate_window,
        timeout=timeout,
        concurrency=concurrency,
        attempts=attempts,
        max_outage=max_outage,
        context=context,
        pack=pack,
        pack_tokens=pack_tokens,
        deadline=deadline,
        simulate_faults=simulate_faults,
        simulate_latency=simulate_latency,
        price_in=price_in,
        price_out=price_out,
        budget=budget,
    )
    check_choices(structured_outputs, max_tokens_param)
    prices = check_prices(price_in, price_out)
    simulated = simulate or simulate_oracle is not None or bool(simulate_faults) or bool(simulate_latency)
    if backend == "local":
        check_local(
            {
                "--base-url": base_url,
                "--rpm": rpm,
                "--tpm": tpm,
                "--timeout": timeout != 60.0 or None,
                "--structured-outputs": structured_outputs if structured_outputs != "json_schema" else None,
                "--max-tokens-param": max_tokens_param if max_tokens_param != "auto" else None,
                "--rate-window": rate_window,
                "--simulate": simulated or None,
            }
        )
    tasks = parse_tasks(task)
    if no_cache and cache is not None:
        fail("--cache and --no-cache contradict each other: pass one")
    if simulate_oracle is not None and not simulate_oracle.is_file():
        fail(f"the simulator's gold file {simulate_oracle} does not exist")
    try:
        _mcp.check_sdk()
    except PolytaskError as error:
        fail(str(error))
    with contextlib.ExitStack() as stack:
        identity = None
        if simulated:
            args = (rpm, tpm, simulate_latency, simulate_oracle, simulate_faults)
            base_url, identity = _options.start_simulator(stack, *args)
        the_backend = _options.make_backend(
            backend,
            model,
            base_url,
            rpm,
            tpm,
            timeout,
            identity,
            structured_outputs=structured_outputs,
            max_tokens_param=max_tokens_param,
        )
        try:
            orch = Orchestrator(
                the_backend,
                tasks,
                max_concurrency=concurrency,
                retry=RetryPolicy(attempts=attempts),
                max_outage=max_outage or None,
                rate_window=rate_window,
                context_sentences=context,
                fuse=fuse,
                pack=pack,
                pack_tokens=pack_tokens,
                cache=None if no_cache else (cache or default_cache_path()),
                prices=prices,
                budget=budget,
            )
            tool = AnalyzeTool(orch, deadline=deadline)
        except PolytaskError as error:
            fail(str(error))
        job = _mcp.FileJob(
            tasks,
            settings_of(the_backend).identity or the_backend.name,
            context=context,
            text_field=text_field,
            id_field=id_field,
        )
        try:
            _mcp.serve(tool, job)
        except KeyboardInterrupt:
            raise typer.Exit(signals.interruption()[1]) from None


@app.command(name="eval")
def eval_(
    gold: Annotated[
        Path,
        typer.Argument(
            help="Gold JSON Lines (the format of examples/ewt_dev.jsonl): id, text, and any of sentences, entities, "
            "sentiment."
        ),
    ],
    task: Annotated[
        list[str] | None,
        typer.Option("--task", "-t", help="Tasks to run (default: entities, and sentiment when the gold has it)."),
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY=VALUE[,KEY=VALUE]",
            help="A configuration to run and score, side by side with the others (repeat it): model, context, "
            "fuse, pack, pack_tokens, concurrency, temperature, structured_outputs, max_tokens_param, stream, "
            "simulate_faults.",
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="openai | local")] = "openai",
    model: Annotated[str | None, typer.Option(help="Model name (openai) or local path (local).")] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL).")
    ] = None,
    rpm: Annotated[float | None, typer.Option(help="Requests-per-minute limit.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens-per-minute limit.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Most calls in flight.")] = None,
    context: Annotated[int, typer.Option(help="Neighbouring sentences passed as context on each side.")] = 0,
    fuse: _options.FuseOption = False,
    pack: _options.PackOption = 1,
    pack_tokens: _options.PackTokensOption = 2048,
    timeout: Annotated[float, typer.Option(help="Seconds per HTTP call.")] = 60.0,
    price_in: Annotated[float | None, typer.Option(metavar="USD", help="USD per million prompt tokens.")] = None,
    price_out: Annotated[float | None, typer.Option(metavar="USD", help="USD per million completion tokens.")] = None,
    simulate: Annotated[
        bool,
        typer.Option(
            help="Against the built-in simulator answering from the gold itself: a check of the pipeline (offsets, "
            "merging, alignment), not of a model."
        ),
    ] = False,
    simulate_faults: Annotated[float, typer.Option(help="Share of simulated calls that fail transiently.")] = 0.0,
) -> None:
    """Run the job on GOLD and print sentence-boundary and entity precision / recall / F1 (per label too), sentiment
    accuracy, calls, tokens, dollars, wall time and peak memory; several configurations side by side with
    --compare."""
    from . import _eval

    check_numbers(
        rpm=rpm,
        tpm=tpm,
        timeout=timeout,
        concurrency=concurrency,
        context=context,
        pack=pack,
        pack_tokens=pack_tokens,
        simulate_faults=simulate_faults,
        price_in=price_in,
        price_out=price_out,
    )
    prices = check_prices(price_in, price_out)
    if not gold.is_file():
        fail(f"the gold file {gold} does not exist")
    records = _eval.read_gold(gold)
    settings = _eval.parse_compare(compare or [])
    if task:
        tasks = parse_tasks(task)
    else:
        tasks = parse_tasks(["entities", *(["sentiment"] if any("sentiment" in r for r in records) else [])])
    show_warnings()
    with contextlib.ExitStack() as stack:

        def make(setting: dict[str, Any]) -> Orchestrator:
            url, identity = base_url, None
            if simulate or "simulate_faults" in setting:
                faults = setting.get("simulate_faults", simulate_faults)
                url, identity = _options.start_simulator(stack, rpm, tpm, 0.0, gold, faults)
            the_backend = _options.make_backend(
                backend,
                setting.get("model", model),
                url,
                rpm,
                tpm,
                timeout,
                identity,
                structured_outputs=setting.get("structured_outputs", "json_schema"),
                max_tokens_param=setting.get("max_tokens_param", "auto"),
                stream=setting.get("stream", False),
            )
            return Orchestrator(
                the_backend,
                tasks,
                max_concurrency=setting.get("concurrency", concurrency),
                context_sentences=setting.get("context", context),
                fuse=setting.get("fuse", fuse),
                pack=setting.get("pack", pack),
                pack_tokens=setting.get("pack_tokens", pack_tokens),
                temperature=setting.get("temperature", 0.0),
                prices=prices,
            )

        try:
            runs = _eval.evaluate(records, settings, make)
        except PolytaskError as error:
            fail(str(error))
    console = Console()
    console.print(_eval.table(gold, runs))


def main() -> None:
    app()
