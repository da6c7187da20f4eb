"""pt.analyze: one document in one call, in a shared orchestrator or one of its own, with a deadline that returns what
finished instead of raising late."""

import anyio
import anyio.lowlevel
import pytest

import polytask as pt
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

TEXT = "Ann lives in Rome. She loves it! The end is near."


def answer(request):
    if request.schema_name == "entities":
        return {"entities": []}
    return {"label": "neutral", "score": 0}


class DeadlineClock(FakeClock):
    """Virtual time whose sleeps of ``deadline`` seconds wait until ``ready`` is set: the test says when the deadline
    passes (after the quick pairs answered), with no real waiting."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline
        self.ready = anyio.Event()

    async def sleep(self, seconds: float) -> None:
        if seconds == self.deadline:
            await self.ready.wait()
        await super().sleep(seconds)


async def test_analyze_with_a_backend_runs_the_default_tasks_and_leaves_the_backend_open():
    class Backend(pt.FunctionBackend):
        closed = False

        async def aclose(self):
            self.closed = True

    backend = Backend(answer)
    result = await pt.analyze(TEXT, backend=backend)
    assert set(result.results) == {"sentiment", "entities"} and not result.partial
    assert len(result.pairs) == 2 * len(result.sentences) == 6
    assert not backend.closed  # yours: a second call works
    again = await pt.analyze({"id": "doc-7", "text": "Fine."}, backend=backend, tasks=[pt.Sentiment()])
    assert again.id == "doc-7" and set(again.results) == {"sentiment"}


async def test_concurrent_calls_share_one_orchestrators_call_slots():
    in_flight = most = 0

    async def server(request):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await anyio.lowlevel.checkpoint()  # let the other turns send what they can
        in_flight -= 1
        return answer(request)

    orch = pt.Orchestrator(pt.FunctionBackend(server), [pt.Sentiment()], max_concurrency=3, clock=FakeClock())
    results = []

    async def turn(i):
        results.append(await pt.analyze(f"Turn {i} says hello. Twice.", orchestrator=orch))

    async with orch, anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(turn, i)
    assert len(results) == 20 and not any(r.partial for r in results)
    assert orch.stats.requests == 40 and most == 3  # 20 turns, one pool of 3 call slots between them


async def test_a_deadline_returns_what_finished_with_typed_errors_for_the_rest():
    clock = DeadlineClock(deadline=2.0)
    hang = anyio.Event()  # never set: the entities calls are at the server forever
    answered = []

    async def server(request):
        if request.schema_name == "entities":
            await hang.wait()
        answered.append(request.schema_name)
        if len(answered) == 3:
            clock.ready.set()  # the three sentiment pairs are done: now the deadline passes
        return answer(request)

    orch = pt.Orchestrator(pt.FunctionBackend(server), [pt.Sentiment(), pt.Entities()], clock=clock)
    result = await pt.analyze(TEXT, orchestrator=orch, deadline=2.0)
    assert result.partial and result.results["sentiment"].coverage == 1.0
    late = [p for p in result.pairs if p.error is not None]
    assert [(p.task, p.error.type) for p in late] == [("entities", "DeadlineExceededError")] * 3
    assert "deadline of 2 s passed" in late[0].error.message
    # the orchestrator is fine afterwards: the next call, without a deadline, answers everything
    hang.set()
    assert not (await orch.process(TEXT)).partial


async def test_a_deadline_that_does_not_pass_changes_nothing():
    orch = pt.Orchestrator(pt.FunctionBackend(answer), [pt.Sentiment()], clock=DeadlineClock(deadline=5.0))
    result = await orch.process(TEXT, deadline=5.0)
    assert not result.partial and all(p.error is None for p in result.pairs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"deadline": 0}, "deadline"),
        ({"deadline": -1}, "deadline"),
        ({"backend": pt.FunctionBackend(answer)}, "not both"),
        ({"tasks": [pt.Entities()]}, "differ from the orchestrator's"),
    ],
)
async def test_bad_arguments_name_themselves(kwargs, message):
    orch = pt.Orchestrator(pt.FunctionBackend(answer), [pt.Sentiment()], clock=FakeClock())
    with pytest.raises(pt.ConfigurationError, match=message):
        await pt.analyze(TEXT, orchestrator=orch, **kwargs)


def test_analyze_sync_runs_in_a_script_and_refuses_a_running_loop():
    result = pt.analyze_sync(TEXT, backend=pt.FunctionBackend(answer), tasks=[pt.Sentiment()])
    assert not result.partial

    async def inside():
        with pytest.raises(RuntimeError, match=r"await pt\.analyze"):
            pt.analyze_sync(TEXT, backend=pt.FunctionBackend(answer))

    anyio.run(inside)
