"""The Batch API mode (``OpenAIBackend(batch=True)``, ``polytask run --batch-api``) against the simulator's
``/v1/files`` and ``/v1/batches`` over loopback: answers through the usual validation path, failed lines retried in
a follow-up batch, batches split by the limits, a killed run resumed by batch id without paying twice, and the
batch prices. Batches end on the simulator's injected clock (``batch_delay``); the backend polls every 0.01 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import polytask as pt
from cli_helpers import own_cache_dir, run_cli, summary_value  # noqa: F401 (the fixture)
from polytask.backends._batch import custom_id
from polytask.backends._batch_state import BatchState
from polytask.chat import ChatRequest
from polytask.testing import FakeClock, SimulatorConfig, run_in_thread

DATA = Path(__file__).parent / "data"
FAST = {"flush_after": 0.05, "poll_every": 0.01, "poll_max": 0.05}

DOCS = [{"id": f"d{i}", "text": f"Alice met Bob in Paris on day {i}. It rained {i} times in London."} for i in range(6)]


def backend(url: str, **options: object) -> pt.OpenAIBackend:
    state = options.pop("state", None)
    return pt.OpenAIBackend(
        "gpt-4o-mini",
        base_url=url,
        batch=pt.BatchOptions(**{**FAST, **options}),  # type: ignore[arg-type]
        batch_state=state,  # type: ignore[arg-type]
    )


async def run_all(the_backend: pt.OpenAIBackend, docs: list[dict[str, str]], **kwargs: object) -> list:
    async with pt.Orchestrator(the_backend, [pt.Sentiment(), pt.Entities()], **kwargs) as orch:  # type: ignore[arg-type]
        results = await orch.run(docs)
    return results


def submitted(sim) -> list[str]:
    """Every custom_id the simulator's batches held, in order."""
    return [cid for ids in sim.batch_store.custom_ids.values() for cid in ids]


def test_a_run_goes_through_a_few_batches_with_gold_answers():
    gold = [json.loads(line) for line in (DATA / "oracle_sample.jsonl").read_text().splitlines()]
    with run_in_thread(SimulatorConfig(gold_path=DATA / "oracle_sample.jsonl")) as sim:
        results = anyio.run(run_all, backend(sim.base_url), gold)
    assert all(not r.partial for r in results)
    assert sim.stats.received == 0  # no live call: every answer came from a batch line
    pairs = sum(len(r.sentences) for r in results) * 2
    assert sim.stats.batch_lines == pairs and len(submitted(sim)) == pairs
    assert 1 <= sim.stats.batches_created <= 3  # one run's calls flushed together, not one batch per call
    for doc, result in zip(gold, results, strict=True):  # the oracle's entities, through the batch's lines
        found = {(e.start, e.end, e.label) for e in result.results["entities"].entities}
        assert found == {(e["start"], e["end"], e["label"]) for e in doc["entities"]}


def test_failed_lines_are_retried_in_a_follow_up_batch():
    clock = FakeClock()  # the caller's backoff between a failed line and its retry
    with run_in_thread(SimulatorConfig(batch_error_rate=0.25, seed=3)) as sim:
        the_backend = backend(sim.base_url)
        results = anyio.run(lambda: run_all(the_backend, DOCS, clock=clock))
    assert all(not r.partial for r in results)
    store = sim.batch_store
    ids = submitted(sim)
    again = {cid for cid in ids if ids.count(cid) > 1}
    assert again and len(store.custom_ids) >= 2  # a failed line's request went out again, in a later batch
    failed = [
        json.loads(line)
        for batch in store.batches.values()
        if batch["error_file_id"]
        for line in store.files[batch["error_file_id"]][1].splitlines()
    ]
    assert {line["custom_id"] for line in failed} == again  # exactly the failed lines were sent again
    assert {line["error"] is None for line in failed} == {True, False}  # 500 responses and batch_expired errors


def requests(n: int) -> list[ChatRequest]:
    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    return [
        ChatRequest([{"role": "user", "content": f"question {i}: " + "padding " * 20}], "answer", schema, 50)
        for i in range(n)
    ]


async def ask_all(the_backend: pt.OpenAIBackend, asked: list[ChatRequest]) -> list[pt.ChatResponse]:
    out: list[pt.ChatResponse | None] = [None] * len(asked)

    async def one(i: int) -> None:
        out[i] = await the_backend.complete(asked[i])

    try:
        async with anyio.create_task_group() as group:
            for i in range(len(asked)):
                group.start_soon(one, i)
    finally:
        await the_backend.aclose()
    return [r for r in out if r is not None]


def failures(the_backend: pt.OpenAIBackend, asked: list[ChatRequest]) -> list[BaseException]:
    """The errors each call raised (none: [])."""
    try:
        anyio.run(ask_all, the_backend, asked)
    except BaseExceptionGroup as group:
        return list(group.exceptions)
    return []


def test_batches_are_split_by_the_request_and_byte_limits():
    with run_in_thread(SimulatorConfig(batch_max_requests=3)) as sim:
        answers = anyio.run(ask_all, backend(sim.base_url, max_requests=3, clock=FakeClock()), requests(7))
        assert len(answers) == 7 and all(a.content for a in answers)
        assert [len(ids) for ids in sim.batch_store.custom_ids.values()] == [3, 3, 1]
    line = len(json.dumps({"custom_id": "x" * 35, "method": "POST", "url": "/v1/chat/completions", "body": {}}))
    with run_in_thread(SimulatorConfig()) as sim:
        anyio.run(ask_all, backend(sim.base_url, max_bytes=2 * line + 700, clock=FakeClock()), requests(5))
        sizes = [len(ids) for ids in sim.batch_store.custom_ids.values()]
        files = [f for f, data in sim.batch_store.files.values() if f["purpose"] == "batch"]
    assert sum(sizes) == 5 and max(sizes) < 5 and all(f["bytes"] <= 2 * line + 700 for f in files)
    with pytest.raises(pt.BadRequestError, match="max_bytes"):
        anyio.run(backend("http://127.0.0.1:9/v1", max_bytes=100).complete, requests(1)[0])


def test_the_simulators_limits_are_400s_the_backend_raises():
    with run_in_thread(SimulatorConfig(batch_max_requests=2)) as sim:
        errors = failures(backend(sim.base_url, clock=FakeClock()), requests(3))
    assert len(errors) == 3 and all(isinstance(e, pt.BadRequestError) for e in errors)
    assert "3 requests; the limit is 2" in str(errors[0])  # the server's reason, for each call of the batch
    with run_in_thread(SimulatorConfig(batch_max_bytes=500)) as sim:
        errors = failures(backend(sim.base_url, clock=FakeClock()), requests(3))
    assert len(errors) == 3 and "File is too large" in str(errors[0])
    assert sim.stats.batches_created == 0


def test_a_batch_refused_for_the_queue_limit_is_submitted_again():
    with run_in_thread(SimulatorConfig(batch_max_in_progress=1)) as sim:
        answers = anyio.run(ask_all, backend(sim.base_url, max_requests=2, clock=FakeClock()), requests(6))
    assert len(answers) == 6
    assert sim.stats.batches_refused >= 1 and sim.stats.batches_created == 3


async def run_until_submitted(the_backend: pt.OpenAIBackend, sim, pairs: int) -> None:
    """Start a run and cancel it (as a kill would end it) once all its requests are in submitted batches."""
    async with anyio.create_task_group() as group:
        group.start_soon(run_all, the_backend, DOCS[:2])
        while len(submitted(sim)) < pairs:  # noqa: ASYNC110 (the simulator's thread has no event to wait on)
            await anyio.sleep(0.01)
        group.cancel_scope.cancel()


def test_a_run_killed_mid_batch_resumes_by_batch_id_without_paying_twice(tmp_path):
    sim_clock = FakeClock()
    state = tmp_path / "run.batches"
    pairs = 2 * 2 * 2  # documents × sentences × tasks
    with run_in_thread(SimulatorConfig(batch_delay=3600), clock=sim_clock.now) as sim:
        anyio.run(run_until_submitted, backend(sim.base_url, state=state), sim, pairs)
        created = sim.stats.batches_created
        assert created == 1  # every call at once (no first call sent alone to learn rate limits from)
        assert sim.stats.batch_lines == 0  # still in progress when the run ended
        recorded = BatchState(state).submissions()
        assert [s.batch_id for s in recorded] == list(sim.batch_store.batches)
        sim_clock.advance(3600)  # the batch ends while nothing runs
        again = backend(sim.base_url, state=state)
        results = anyio.run(run_all, again, DOCS[:2])
    assert all(not r.partial for r in results)
    assert sim.stats.batches_created == created and again.batches_submitted == 0  # no new batch for those requests
    assert sim.stats.batch_lines == pairs and sim.stats.received == 0


def test_a_completed_batch_not_yet_read_is_read_back(tmp_path):
    state = tmp_path / "run.batches"
    with run_in_thread(SimulatorConfig(batch_delay=3600), clock=(sim_clock := FakeClock()).now) as sim:
        anyio.run(run_until_submitted, backend(sim.base_url, state=state), sim, 8)
        sim_clock.advance(3600)
        for batch_id in list(sim.batch_store.batches):  # it ends, and a poll of someone else's sees it completed
            for _ in range(2):
                assert anyio.run(_get, f"{sim.base_url}/batches/{batch_id}")["status"] in ("in_progress", "completed")
        results = anyio.run(run_all, again := backend(sim.base_url, state=state), DOCS[:2])
    assert all(not r.partial for r in results) and again.batches_submitted == 0


async def _get(url: str) -> dict:
    import httpx2

    async with httpx2.AsyncClient() as client:
        return (await client.get(url)).json()


def test_custom_id_names_the_question_not_the_cap():
    (a,) = requests(1)
    capped = ChatRequest(a.messages, a.schema_name, a.json_schema, max_tokens=7)
    assert custom_id("m", a) == custom_id("m", capped)  # a learned cap does not make it another request
    assert custom_id("m", a) != custom_id("other", a)
    assert custom_id("m", a) != custom_id("m", ChatRequest(a.messages, "answer", a.json_schema, 50, temperature=1))
    assert custom_id("m", a).startswith("pt-") and len(custom_id("m", a)) == 35


def test_batch_prices_and_settings():
    live = pt.OpenAIBackend("gpt-4o-mini", api_key="sk-test-key")
    batch = pt.OpenAIBackend("gpt-4o-mini", api_key="sk-test-key", batch=True)
    assert live.settings.prices is not None and batch.settings.prices is not None
    assert batch.settings.prices.input == pytest.approx(live.settings.prices.input / 2)  # genai-prices' batch price
    assert batch.settings.prices.output == pytest.approx(live.settings.prices.output / 2)
    given = pt.OpenAIBackend("x", base_url="http://h/v1", batch=True, prices=pt.Prices(input=1, output=2))
    assert given.settings.prices == pt.Prices(input=0.5, output=1, cached_input=0.5)  # the live prices, halved
    settings = batch.settings
    assert settings.concurrency == 10_000 and not settings.adaptive_concurrency and settings.rpm is None
    assert pt.prices_for("gpt-4o-mini", base_url="https://api.openai.com/v1", batch=True).input == pytest.approx(0.075)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": True, "stream": True}, "stream"),
        ({"batch": True, "rpm": 10}, "rpm does not apply"),
        ({"batch_state": "x.sqlite"}, "needs batch=True"),
        ({"batch": "yes"}, "batch must be"),
    ],
)
def test_batch_mode_configuration_errors_name_the_setting(kwargs, match):
    with pytest.raises(pt.ConfigurationError, match=match):
        pt.OpenAIBackend("m", base_url="http://h/v1", **kwargs)


def write_docs(path: Path, docs: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_cli_batch_api_against_the_built_in_simulator(tmp_path):
    source = write_docs(tmp_path / "in.jsonl", DOCS)
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--batch-api", "--simulate", "--price-in", "1", "--price-out", "2")
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == len(DOCS)
    assert summary_value(result.output, "price per million tokens") == "$0.5 in / $1 out"
    assert "batch(es) submitted by this run" in result.output
    assert not (tmp_path / ".out.jsonl.batches").exists()  # the output is whole: nothing left to resume
    for flags, said in ((["--stream"], "--stream does not go"), (["--rpm", "5"], "--rpm does not go")):
        bad = run_cli(source, "-o", out, "--batch-api", "--simulate", *flags)
        assert bad.exit_code == 2 and said in bad.output


def test_cli_killed_mid_batch_resumes_without_a_new_batch(tmp_path):
    source = write_docs(tmp_path / "in.jsonl", DOCS[:3])
    out = tmp_path / "out.jsonl"
    state = tmp_path / ".out.jsonl.batches"
    pairs = 3 * 2 * 2
    sim_clock = FakeClock()
    with run_in_thread(SimulatorConfig(batch_delay=3600), clock=sim_clock.now) as sim:
        args = [str(source), "-o", str(out), "--batch-api", "--base-url", sim.base_url, "--batch-poll", "0.05"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        child = subprocess.Popen(
            [sys.executable, "-m", "polytask", "run", *args, "--no-progress"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while len(submitted(sim)) < pairs and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.05)  # a subprocess: only real time tells when it got there
        finally:
            child.kill()  # kill -9, mid-batch
            child.wait()
        assert len(submitted(sim)) == pairs and state.exists()
        created = sim.stats.batches_created
        sim_clock.advance(3600)
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        assert sim.stats.batches_created == created  # waited for the recorded batch instead of paying twice
        assert "0 batch(es) submitted by this run" in result.output
    assert len(out.read_text().splitlines()) == 3 and not state.exists()


def test_cli_restart_discards_the_recorded_batches(tmp_path):
    source = write_docs(tmp_path / "in.jsonl", DOCS[:1])
    out = tmp_path / "out.jsonl"
    state = tmp_path / ".out.jsonl.batches"
    BatchState(state).uploaded("file-old", ["pt-old"])
    result = run_cli(source, "-o", out, "--batch-api", "--simulate", "--restart")
    assert result.exit_code == 0, result.output
    assert not state.exists()
