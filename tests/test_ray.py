"""RayOrchestrator on a real (small, local) Ray cluster against the simulator: results in input order equal a
one-process run, one limit for every worker (Redis, or the run's actor), a worker killed mid-run has its batch redone
with no document twice, ``polytask run --ray``; and SharedLimit's buckets without Ray."""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path

import anyio
import pytest

import polytask as pt
from cli_helpers import own_cache_dir, run_cli  # noqa: F401 (a fixture: each test's own request cache)
from polytask.ray_runner import RayOrchestrator, SharedLimit, run
from polytask.testing import SimulatorConfig, run_in_thread
from services import need_module

TASKS = [pt.Sentiment(), pt.Entities()]
DOCS = [f"Document {i} is fine. Paris and Berlin{'!' * (i % 3)}" for i in range(11)] + [
    ("custom-id", "An (id, text) pair."),
    {"text": "A dict without an id.", "source": "x"},
]


@pytest.fixture(scope="module")
def cluster():
    ray = need_module("ray", "ray")
    here = str(Path(__file__).resolve().parent)
    # workers import polytask (and this module, for the factories below) as the driver does
    paths = [p for p in (str(Path(pt.__file__).resolve().parents[1]), here, os.environ.get("PYTHONPATH")) if p]
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def backend(sim) -> functools.partial:
    return functools.partial(pt.OpenAIBackend, "sim", base_url=sim.base_url, api_key="test")


def answers(results):
    return [(r.id, r.metadata, r.results, [(p.sentence, p.task, p.answer, p.error) for p in r.pairs]) for r in results]


class DiesOnce:
    """A backend factory whose first call, in whichever worker, kills its process (a marker file says it did)."""

    def __init__(self, marker: Path, sim_url: str) -> None:
        self.marker, self.url = marker, sim_url

    def __call__(self):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return pt.OpenAIBackend("sim", base_url=self.url, api_key="test")
        os.close(fd)
        os._exit(1)  # as an OOM kill would: no cleanup, no exception


def always_dies():
    os._exit(1)


def test_results_in_input_order_equal_a_one_process_run(cluster, tmp_path):
    with run_in_thread(SimulatorConfig(seed=7)) as sim:
        expected = pt.run_sync(backend(sim)(), TASKS, DOCS)
        cache = tmp_path / "cache.sqlite"
        got = run(DOCS, backend_factory=backend(sim), tasks=TASKS, workers=2, batch_size=3, cache=cache)
        assert answers(got) == answers(expected)
        assert [r.id for r in got][-2:] == ["custom-id", "12"]
        calls = sim.stats.received
        # the cache works across workers: a rerun in other batches sends nothing
        again = run(DOCS, backend_factory=backend(sim), tasks=TASKS, workers=2, batch_size=5, cache=cache)
        assert answers(again) == answers(expected) and sim.stats.received == calls


@pytest.mark.parametrize("shared", ["redis", "actor"])
def test_one_limit_for_every_worker(cluster, request, shared):
    # the server admits 10 calls at once, then 10 a second; two workers each believing they own the limit would
    # send 20 at once
    with run_in_thread(SimulatorConfig(rpm=600, rpm_window=1, seed=1)) as sim:
        limit = {}
        if shared == "redis":
            server = request.getfixturevalue("redis_server")
            limit = {"limiter_url": server.url, "limiter_key": "ray-test"}
        docs = [f"Sentence {i}." for i in range(30)]
        results = run(
            docs,
            backend_factory=backend(sim),
            tasks=[pt.Sentiment()],
            workers=2,
            batch_size=5,
            rpm=600,
            rate_window=1,
            **limit,
        )
        assert [r.id for r in results] == [str(i) for i in range(30)]
        assert not any(r.partial for r in results)
        assert sim.stats.outcomes.get("rate_limited", 0) == 0, sim.stats.outcomes
        assert sim.stats.received == 30


def test_a_killed_worker_has_its_batch_redone_without_duplicates(cluster, tmp_path):
    with run_in_thread(SimulatorConfig(seed=2)) as sim:
        docs = [f"Sentence {i} here." for i in range(12)]

        async def main():
            async with RayOrchestrator(
                DiesOnce(tmp_path / "died", sim.base_url), [pt.Sentiment()], workers=2, batch_size=3, max_retries=2
            ) as orch:
                return await orch.run(docs), orch.stats

        results, stats = anyio.run(main)
        assert (tmp_path / "died").exists()  # a worker did die
        assert [r.id for r in results] == [str(i) for i in range(12)]  # no gap, no duplicate
        assert not any(r.partial for r in results)
        assert stats.documents_done == 12  # the dead attempt's work is not counted


def test_a_batch_that_always_loses_its_worker_stops_the_run(cluster):
    with pytest.raises(pt.WorkerLostError) as caught:
        run(["One.", "Two."], backend_factory=always_dies, tasks=[pt.Sentiment()], workers=1, max_retries=0)
    assert caught.value.documents == ("0", "1") and caught.value.results == []


def test_what_cannot_go_to_workers_is_refused_by_name(cluster):
    with pytest.raises(pt.ConfigurationError, match="backend_factory must be a zero-argument callable"):
        RayOrchestrator(pt.OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", api_key="x"), TASKS)
    lock = threading.Lock()
    with pytest.raises(pt.ConfigurationError, match="backend_factory cannot be sent to Ray workers"):
        RayOrchestrator(lambda: lock, TASKS)
    with pytest.raises(pt.ConfigurationError, match="budget= is not taken on Ray"):
        RayOrchestrator(always_dies, TASKS, budget=1.0)


def test_cli_ray_writes_every_line_in_input_order(cluster, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Line {i} is good."}) + "\n" for i in range(9)))
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--ray", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"d{i}" for i in range(9)]
    assert all(line["results"]["sentiment"]["label"] for line in lines)
    assert not (tmp_path / ".out.jsonl.partial").exists()


def test_cli_ray_stopped_by_a_quota_resumes_paying_only_for_the_rest(cluster, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Line {i} is fine."}) + "\n" for i in range(12)))
    with run_in_thread(SimulatorConfig(daily_quota=4)) as sim:  # the key's daily quota: 4 answers, then 429s
        args = [source, "-o", out, "-t", "sentiment", "--base-url", sim.base_url, "--ray", "--batch-size", "2"]
        stopped = run_cli(*args, "--concurrency", "1", "--workers", "1")
        assert stopped.exit_code == 2, stopped.output
        assert (tmp_path / ".out.jsonl.partial").exists()  # kept for the rerun
        answered = sim.stats.outcomes.get("ok", 0)
        sim.config = sim.config.model_copy(update={"daily_quota": None})  # the next day
        again = run_cli(*args)
        assert again.exit_code == 0, again.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"d{i}" for i in range(12)] and not any(line["partial"] for line in lines)
    assert sim.stats.outcomes["ok"] == 12 and answered == 4  # each answer paid once, across the two runs
    assert not (tmp_path / ".out.jsonl.partial").exists()


# -- SharedLimit's buckets, on a fake clock ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def starts(limit: SharedLimit, calls: int, tokens: int = 0) -> list[float]:
    return [limit.acquire(tokens)[1] for _ in range(calls)]


def test_shared_limit_burst_then_refill_rate():
    clock = Clock()
    limit = SharedLimit(rpm=600, headroom=0, window=1, clock=clock)  # 10 at once, then 10 a second
    waits = starts(limit, 15)
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_shared_limit_tpm_too_large_settle_and_pause():
    clock = Clock()
    limit = SharedLimit(tpm=600, headroom=0, clock=clock)  # 10 tokens a second
    assert limit.acquire(601)[0] == "too_large"
    assert limit.acquire(600)[1] == 0.0
    assert limit.acquire(10)[1] == pytest.approx(1.0)
    limit.settle(-600)  # the first call used nothing after all: the next goes at once
    assert limit.acquire(10)[1] == 0.0
    limit.pause(5.0, drain_requests=True, drain_tokens=True)
    status, wait, _, _ = limit.acquire(10)
    assert status == "ok" and wait >= 5.0


def test_shared_limit_learns_limits_and_remaining_from_headers():
    clock = Clock()
    limit = SharedLimit(clock=clock, headroom=0)
    assert limit.acquire(10)[1] == 0.0 and limit.limits() == (0.0, 0.0)  # nothing known: no limit
    limit.observe(60, 0, 0, -1)  # 60 a minute, none left
    assert limit.limits() == (60.0, 0.0)
    assert limit.acquire(0)[1] == pytest.approx(1.0)  # one refills in a second
