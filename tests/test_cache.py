"""The request cache (SQLite): a rerun pays for nothing, two processes share one file, a broken file is named, and
no secret is stored."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import polytask as pt
from polytask.cache import RequestCache
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

TEXTS = ["Ann lives in Rome. She loves it!", "这是一段文本。它描述了人工智能的应用场景。", "One more. Done."]
KEY = "test-key-123456-secret"


def orchestrator(sim, cache, tasks=None):
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key=KEY, timeout=5.0)
    return pt.Orchestrator(backend, tasks or [pt.Sentiment(), pt.Entities()], clock=FakeClock(), cache=cache)


def answers(results):
    return [(r.id, {p.task: (p.sentence, p.answer) for p in r.pairs}) for r in results]


async def test_a_second_identical_run_makes_no_call_and_gives_the_same_documents(simulator, tmp_path):
    sim = simulator(seed=3)
    path = tmp_path / "cache.sqlite"
    async with orchestrator(sim, path) as first:
        before = await first.run(TEXTS)
    calls = sim.stats.received
    assert calls > 0 and first.stats.cache_hits == 0
    async with orchestrator(sim, path) as second:
        after = await second.run(TEXTS)
    assert sim.stats.received == calls  # not one call more
    assert second.stats.cache_hits == sum(len(r.pairs) for r in after) and second.stats.requests == 0
    assert answers(after) == answers(before)
    assert all(p.attempts == 0 for r in after for p in r.pairs)


async def test_another_server_model_or_task_is_not_answered_from_the_cache(simulator, tmp_path):
    sim, other = simulator(seed=3), simulator(seed=3)
    path = tmp_path / "cache.sqlite"
    async with orchestrator(sim, path, [pt.Sentiment()]) as orch:
        await orch.run(TEXTS[:1])
    async with orchestrator(other, path, [pt.Sentiment()]) as orch:  # another base URL
        await orch.run(TEXTS[:1])
    assert orch.stats.cache_hits == 0 and other.stats.received > 0
    async with orchestrator(sim, path, [pt.Classify(["a", "b"])]) as orch:  # another task on the same server
        await orch.run(TEXTS[:1])
    assert orch.stats.cache_hits == 0


async def test_a_stored_answer_that_no_longer_validates_is_asked_again(simulator, tmp_path):
    sim = simulator(seed=3)
    cache = RequestCache(tmp_path / "cache.sqlite")
    async with orchestrator(sim, cache, [pt.Sentiment()]) as orch:
        await orch.run(TEXTS[:1])
    with cache._lock:  # damage every stored answer as a bug or a hand edit might
        cache._db.execute("UPDATE answers SET content = '{\"label\": 7}'")
    calls = sim.stats.received
    async with orchestrator(sim, cache, [pt.Sentiment()]) as orch:
        results = await orch.run(TEXTS[:1])
    assert orch.stats.cache_hits == 0 and sim.stats.received > calls
    assert all(p.error is None for r in results for p in r.pairs)


def test_no_secret_is_stored(tmp_path):
    backend = pt.OpenAIBackend("sim-model", base_url="http://127.0.0.1:9/v1", api_key=KEY)
    assert KEY not in (backend.settings.identity or "")
    cache = RequestCache(tmp_path / "cache.sqlite")
    key = cache.key(backend.settings.identity or "", "sentiment", {}, 10, [{"role": "user", "content": "x"}], 0.0)
    cache.put(key, '{"label": "neutral"}', 5, 3)
    cache.close()
    assert all(KEY.encode() not in p.read_bytes() for p in tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_file_that_is_not_a_cache_is_named_in_a_clear_error(tmp_path, content):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(content)
    with pytest.raises(pt.ConfigurationError, match=r"cache\.sqlite") as info:
        RequestCache(path)
    assert "--no-cache" in str(info.value)


def test_two_processes_writing_one_cache_at_once_lose_nothing(tmp_path):
    path = tmp_path / "cache.sqlite"
    RequestCache(path).close()  # created (and switched to WAL) first
    writer = textwrap.dedent(
        f"""
        import sys
        from polytask.cache import RequestCache
        cache = RequestCache({str(path)!r})
        for i in range(300):
            cache.put(f"{{sys.argv[1]}}-{{i}}", "{{}}", i, i)
            assert cache.get(f"{{sys.argv[1]}}-{{i}}") is not None
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, name]) for name in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    cache = RequestCache(path)
    assert len(cache) == 600
    hit = cache.get("b-299")
    assert hit is not None and (hit.content, hit.prompt_tokens) == ("{}", 299)
