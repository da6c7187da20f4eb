"""Dollars (issue 11): prices (polytask.costs, genai-prices' database), the cost of every pair, document and run,
and a budget no run's calls can go past — unit by unit, then through the orchestrator against a FunctionBackend
(counting the calls that reach it) and the simulator over loopback."""

import anyio
import anyio.lowlevel
import httpx2
import pytest

import polytask as pt
from polytask._prompts import extract_sentence
from polytask.backends.base import BackendSettings, ChatRequest, settings_of
from polytask.costs import Budget, format_usd
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

GOOD = '{"label": "positive", "score": 0.5}'
MINI = pt.Prices(input=0.15, output=0.60, cached_input=0.075)


# -- Prices ----------------------------------------------------------------------------------------------------------


def test_prices_cost_is_usd_per_million_tokens():
    assert MINI.cost(1_000_000, 0) == pytest.approx(0.15)
    assert MINI.cost(0, 1_000_000) == pytest.approx(0.60)
    assert MINI.cost(1_000, 100) == pytest.approx((1_000 * 0.15 + 100 * 0.60) / 1e6)
    assert MINI.cost(0, 0) == 0.0
    assert pt.Prices(input=0, output=0).cost(10_000, 10_000) == 0.0  # a local model: known to cost nothing


def test_cached_tokens_are_a_part_of_the_prompt_priced_at_cached_input():
    # 1,000 prompt tokens of which 800 cached: 200 at $0.15, 800 at $0.075, 100 completion at $0.60
    assert MINI.cost(1_000, 100, cached_tokens=800) == pytest.approx((200 * 0.15 + 800 * 0.075 + 100 * 0.60) / 1e6)
    assert MINI.cost(1_000, 0, cached_tokens=5_000) == pytest.approx(1_000 * 0.075 / 1e6)  # never more than the prompt
    plain = pt.Prices(input=2.0, output=8.0)
    assert plain.cached_input == 2.0  # cached input defaults to the input price
    assert plain.cost(1_000, 0, cached_tokens=1_000) == plain.cost(1_000, 0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"input": -1, "output": 1}, "Prices.input"),
        ({"input": 1, "output": float("nan")}, "Prices.output"),
        ({"input": 1, "output": 1, "cached_input": float("inf")}, "Prices.cached_input"),
        ({"input": True, "output": 1}, "Prices.input"),
    ],
)
def test_bad_prices_name_themselves(kwargs, name):
    with pytest.raises(pt.ConfigurationError, match=name):
        pt.Prices(**kwargs)


def test_prices_are_frozen_values():
    assert pt.Prices(input=1, output=2) == pt.Prices(1.0, 2.0, 1.0)
    with pytest.raises(AttributeError):
        MINI.input = 1.0  # type: ignore[misc]
    assert MINI.describe() == "$0.15 in ($0.075 cached) / $0.6 out"
    assert pt.Prices(input=1e6, output=0).describe() == "$1,000,000 in / $0 out"


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (0, "$0.00"),
        (5, "$5.00"),
        (4.99871, "$4.999"),
        (0.0123, "$0.0123"),
        (0.000015, "$0.000015"),
        (1234.5, "$1,234.50"),
    ],
)
def test_format_usd(amount, text):
    assert format_usd(amount) == text


# -- prices_for (genai-prices, offline) ------------------------------------------------------------------------------


def test_prices_for_a_known_model():
    assert pt.prices_for("gpt-4o-mini") == pt.Prices(input=0.15, output=0.60, cached_input=0.075)
    assert pt.prices_for("gpt-4o-mini", base_url="https://api.openai.com/v1") == MINI


@pytest.mark.parametrize(
    ("model", "base_url"),
    [
        ("polytask-sim-model", None),  # no provider lists it
        ("no-such-model-anywhere", "https://api.openai.com/v1"),  # a known provider, an unknown model
        ("gpt-4o-mini", "http://127.0.0.1:8000/v1"),  # a known name on a server genai-prices does not know
    ],
)
def test_prices_for_an_unknown_model_or_server_is_none(model, base_url):
    assert pt.prices_for(model, base_url=base_url) is None


def test_the_openai_backend_declares_its_prices_and_takes_yours():
    at_openai = pt.OpenAIBackend("gpt-4o-mini", api_key="sk-test-0123456789")
    assert at_openai.settings.prices == MINI
    local = pt.OpenAIBackend("gpt-4o-mini", base_url="http://127.0.0.1:9/v1")
    assert local.settings.prices is None  # a server genai-prices does not know: unknown, not OpenAI's price
    mine = pt.Prices(input=1, output=2)
    assert pt.OpenAIBackend("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", prices=mine).settings.prices == mine
    with pytest.raises(pt.ConfigurationError, match=r"prices must be a polytask\.Prices"):
        pt.OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", prices=(1, 2))  # type: ignore[arg-type]


def test_other_backends_prices():
    assert pt.FunctionBackend(lambda r: GOOD).settings.prices is None  # unknown unless declared
    assert pt.FunctionBackend(lambda r: GOOD, prices=MINI).settings.prices == MINI

    class Old:  # a backend from before BackendSettings: rpm only
        name = "old"
        rpm = 60.0

        async def complete(self, request):
            return pt.ChatResponse(content=GOOD)

        async def aclose(self):
            return None

    assert settings_of(Old()) == BackendSettings(rpm=60.0)  # prices None: unknown
    assert pt.Orchestrator(Old(), [pt.Sentiment()]).stats.prices is None
    assert pt.Orchestrator(Old(), [pt.Sentiment()], prices=MINI, budget=1).stats.prices == MINI


def test_the_local_backend_costs_nothing_and_says_so(tiny):
    from polytask.backends.transformers import TransformersBackend

    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu")
    try:
        assert backend.settings.prices == pt.Prices(input=0, output=0)
        orch = pt.Orchestrator(backend, [pt.Sentiment()], budget=0.01)  # $0 prices are known: a budget is fine
        assert orch.stats.prices == pt.Prices(input=0, output=0)
    finally:
        anyio.run(backend.aclose)


@pytest.mark.parametrize("http", ["httpx2", "sdk"])
async def test_the_openai_backend_reads_cached_tokens(http):
    def handler(request):
        usage = {"prompt_tokens": 1200, "completion_tokens": 9, "total_tokens": 1209}
        if b"cached" in request.content:
            usage["prompt_tokens_details"] = {"cached_tokens": 1024, "audio_tokens": 0}
        elif b"null" in request.content:
            usage["prompt_tokens_details"] = None
        body = {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": GOOD}}],
            "usage": usage,
        }
        return httpx2.Response(200, json=body)

    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    backend = pt.OpenAIBackend(
        "m", base_url="http://test/v1", api_key="sk-test-0123456789", http_client=client, http=http
    )

    def request(text):
        return ChatRequest(
            messages=[{"role": "user", "content": text}], schema_name="s", json_schema={"type": "object"}, max_tokens=9
        )

    assert (await backend.complete(request("cached"))).cached_tokens == 1024
    assert (await backend.complete(request("null"))).cached_tokens == 0
    assert (await backend.complete(request("absent"))).cached_tokens == 0
    await client.aclose()


# -- Budget ----------------------------------------------------------------------------------------------------------


def test_budget_reserve_settle_release():
    budget = Budget(1.0)
    a = budget.reserve(0.4)
    b = budget.reserve(0.6)  # exactly at the limit: allowed
    assert budget.reserved == pytest.approx(1.0) and budget.spent == 0
    with pytest.raises(pt.BudgetExceededError) as caught:
        budget.reserve(0.01)
    error = caught.value
    assert (error.limit_usd, error.spent_usd, error.worst_case_usd) == (1.0, 0.0, 0.01)
    assert error.reserved_usd == pytest.approx(1.0)
    assert "$1.00" in str(error) and "$0.01" in str(error) and "rerun with a higher budget to resume" in str(error)
    assert budget.reserved == pytest.approx(1.0)  # a refused call holds nothing
    budget.settle(a, 0.1)  # cost less than its worst case: the rest is free again
    assert budget.spent == pytest.approx(0.1) and budget.reserved == pytest.approx(0.6)
    budget.release(b)  # failed without usage: nothing spent
    assert budget.reserved == 0.0 and budget.spent == pytest.approx(0.1)
    c = budget.reserve(0.9)
    budget.settle(c, 0.9)
    assert budget.spent == pytest.approx(1.0)
    with pytest.raises(pt.BudgetExceededError, match=r"\$1.00 spent"):
        budget.reserve(0.001)
    assert budget.reserve(0.0) is not None  # a call that costs nothing always fits


def test_budget_reservations_close_once_and_leave_no_drift():
    budget = Budget(0.3)
    holds = [budget.reserve(0.1) for _ in range(3)]  # 0.1 + 0.1 + 0.1 > 0.3 in floats: still three calls
    for hold in holds:
        budget.settle(hold, 0.1)
    assert budget.reserved == 0.0  # exactly, with nothing in flight
    with pytest.raises(ValueError, match="already settled"):
        budget.settle(holds[0], 0.1)
    with pytest.raises(ValueError, match="already settled"):
        budget.release(holds[1])
    assert budget.spent == pytest.approx(0.3)


@pytest.mark.parametrize("limit", [0, -1, float("nan"), float("inf"), None, "5"])
def test_budget_must_be_a_positive_number(limit):
    with pytest.raises(pt.ConfigurationError, match="budget"):
        Budget(limit)  # type: ignore[arg-type]


def test_budget_refuses_a_negative_worst_case():
    with pytest.raises(pt.ConfigurationError, match="worst_case_usd"):
        Budget(1).reserve(-0.1)


# -- the orchestrator: costs of pairs, documents, runs -----------------------------------------------------------------


def per_token(dollars: float = 1.0) -> pt.Prices:
    """Prices where every token (prompt or completion) costs ``dollars``: costs in whole dollars, exact in floats."""
    return pt.Prices(input=dollars * 1e6, output=dollars * 1e6)


def check_sums(results, stats):
    """Pairs add up to their document, documents to the run."""
    for r in results:
        assert sum(p.cost for p in r.pairs) == pytest.approx(r.usage.cost)
    assert sum(r.usage.cost for r in results) == pytest.approx(stats.cost)


async def test_every_response_is_paid_for_reasks_and_cut_offs_included():
    responses = {
        # pair 1: an invalid answer (10 + 3 tokens), then a valid re-ask (20 + 4)
        "One": [pt.ChatResponse('{"label": "great"}', prompt_tokens=10, completion_tokens=3), (GOOD, 20, 4)],
        # pair 2: cut off at the task's max_tokens (30 + 16): a LengthLimitError, paid for all the same
        "Two": [pt.ChatResponse('{"label": "pos', finish_reason="length", prompt_tokens=30, completion_tokens=16)],
        # pair 3: a 500 (no usage, no cost), then an answer (5 + 2) with 4 of its prompt tokens cached
        "Three": [pt.ServerError("boom", status_code=500), (GOOD, 5, 2, 4)],
    }

    def fn(request):
        step = responses[extract_sentence(request.messages).rstrip(".")].pop(0)
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, tuple):
            content, prompt, completion, *cached = step
            return pt.ChatResponse(
                content, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=sum(cached)
            )
        return step

    task = pt.Sentiment()
    task.max_tokens = 16
    prices = pt.Prices(input=1e6, output=1e6, cached_input=0.5e6)  # $1 a token, $0.50 a cached one
    retry = pt.RetryPolicy(attempts=3, wait_jitter=0)
    async with pt.Orchestrator(pt.FunctionBackend(fn), [task], prices=prices, retry=retry, clock=FakeClock()) as orch:
        results = await orch.run(["One.", "Two.", "Three."])
    one, two, three = (r.pairs[0] for r in results)
    assert one.ok and one.reasked and one.cost == 10 + 3 + 20 + 4
    assert two.error.type == "LengthLimitError" and two.cost == 30 + 16
    assert three.ok and three.attempts == 2 and three.cost == (5 - 4) + 4 * 0.5 + 2
    assert results[2].usage.cached_tokens == 4 and orch.stats.cached_tokens == 4
    assert [r.usage.cost for r in results] == [one.cost, two.cost, three.cost]
    assert orch.stats.cost == one.cost + two.cost + three.cost
    assert orch.stats.requests == 5
    check_sums(results, orch.stats)


async def test_costs_add_up_through_the_simulator_with_reasks(simulator):
    sim = simulator(seed=3, faults={"invalid_answer": 0.3, "length": 0.1})
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="test-key-123456")
    assert backend.settings.prices is None  # the simulator's model is unknown to genai-prices
    docs = [f"Doc {i} is here. It has two sentences." for i in range(12)]
    retry = pt.RetryPolicy(attempts=2, wait_jitter=0)
    async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()], prices=MINI, retry=retry) as orch:
        results = await orch.run(docs)
    assert orch.stats.reasks > 0 and any(p.error for r in results for p in r.pairs)  # invalid and cut-off answers
    check_sums(results, orch.stats)
    for r in results:  # every response the server sent is priced: the document's cost is its tokens' cost
        assert r.usage.cost == pytest.approx(MINI.cost(r.usage.prompt_tokens, r.usage.completion_tokens))
    assert orch.stats.cost == pytest.approx(MINI.cost(orch.stats.prompt_tokens, orch.stats.completion_tokens))
    assert orch.stats.requests == sim.stats.received


async def test_unknown_prices_leave_costs_at_zero_and_say_unknown(simulator):
    sim = simulator()
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="test-key-123456")
    async with pt.Orchestrator(backend, [pt.Sentiment()]) as orch:
        result = await orch.process("Hello there.")
    assert orch.stats.prices is None and orch.stats.cost == 0 and result.usage.cost == 0
    assert result.usage.prompt_tokens > 0  # tokens counted, dollars unknown


async def test_an_answer_from_the_cache_costs_nothing(tmp_path):
    backend = pt.FunctionBackend(lambda r: pt.ChatResponse(GOOD, prompt_tokens=7, completion_tokens=3))
    docs = ["First one. Second one.", "Third."]
    costs = []
    for _ in range(2):
        async with pt.Orchestrator(
            backend, [pt.Sentiment()], prices=per_token(), cache=tmp_path / "c.sqlite", close_backend=False
        ) as orch:
            results = await orch.run(docs)
        costs.append((orch.stats.cost, [r.usage.cost for r in results], [p.cost for r in results for p in r.pairs]))
        check_sums(results, orch.stats)
    assert costs[0] == (30.0, [20.0, 10.0], [10.0, 10.0, 10.0])
    assert costs[1] == (0.0, [0.0, 0.0], [0.0, 0.0, 0.0])  # every answer from the cache
    assert backend.calls == 3


# -- the orchestrator: a budget ----------------------------------------------------------------------------------------


def fixed_cost_backend(delay: bool = False):
    """A backend whose every answer uses all of ``max_tokens`` and no prompt token: with ``per_token`` output-only
    prices an answer costs exactly its worst case."""

    async def fn(request):
        if delay:
            await anyio.lowlevel.checkpoint()
        return pt.ChatResponse(GOOD, prompt_tokens=0, completion_tokens=request.max_tokens)

    return pt.FunctionBackend(fn)


OUTPUT_ONLY = pt.Prices(input=0, output=1e6)  # $1 a completion token, prompts free


async def test_a_budget_for_exactly_n_calls_stops_the_run_before_the_next_and_keeps_the_finished():
    task = pt.Sentiment()
    task.max_tokens = 10  # the worst case of a call: $10
    backend = fixed_cost_backend()
    docs = [f"Document {i}." for i in range(12)]
    async with pt.Orchestrator(backend, [task], prices=OUTPUT_ONLY, budget=50, max_concurrency=1) as orch:
        with pytest.raises(pt.BudgetExceededError) as caught:
            await orch.run(docs)
    assert backend.calls == 5  # exactly the five calls the budget allows, none beyond
    assert orch.stats.cost == 50 and orch.budget is not None and orch.budget.spent == 50
    error = caught.value
    assert "the budget of $50.00 is reached: $50.00 spent" in str(error) and "up to $10.00" in str(error)
    assert "rerun with a higher budget to resume" in str(error)
    results = error.results
    assert len(results) >= 6 and [r.id for r in results] == [str(i) for i in range(len(results))]  # all taken in
    assert [r.partial for r in results[:5]] == [False] * 5 and [p.cost for r in results[:5] for p in r.pairs] == [
        10
    ] * 5
    assert results[5].pairs[0].error.type == "BudgetExceededError" and results[5].pairs[0].attempts == 0
    assert {p.error.type for r in results[6:] for p in r.pairs} == {"RunStopped"}
    check_sums(results, orch.stats)


async def test_concurrent_calls_never_go_past_the_budget_together():
    task = pt.Sentiment()
    task.max_tokens = 10
    backend = fixed_cost_backend(delay=True)  # calls overlap: each holds its worst case while in flight
    got = []
    async with pt.Orchestrator(backend, [task], prices=OUTPUT_ONLY, budget=75, max_concurrency=8) as orch:
        with pytest.raises(pt.BudgetExceededError):
            async for r in orch.stream([f"Document {i}. And a second sentence." for i in range(40)]):
                got.append(r)
    assert backend.calls <= 7  # $75 holds 7 worst cases of $10, never an 8th
    assert orch.stats.cost <= 75 and orch.budget is not None and orch.budget.reserved == 0
    assert got and {p.error.type for r in got for p in r.pairs if p.error} <= {"BudgetExceededError", "RunStopped"}
    check_sums(got, orch.stats)


async def test_a_reask_reserves_its_own_worst_case():
    answers = iter(['{"label": "great"}', GOOD])  # an invalid answer, then its re-ask
    task = pt.Sentiment()
    task.max_tokens = 10

    def fn(request):
        return pt.ChatResponse(next(answers), prompt_tokens=0, completion_tokens=request.max_tokens)

    backend = pt.FunctionBackend(fn)
    async with pt.Orchestrator(backend, [task], prices=OUTPUT_ONLY, budget=15) as orch:
        with pytest.raises(pt.BudgetExceededError) as caught:
            await orch.process("Just one.")  # the first answer leaves $5: not enough for the re-ask's $10
    pair = caught.value.results[0].pairs[0]
    assert backend.calls == 1 and pair.error.type == "BudgetExceededError" and pair.reasked and pair.cost == 10


@pytest.mark.parametrize("budget", [0, -5, float("nan"), float("inf")])
def test_a_budget_must_be_positive(budget):
    with pytest.raises(pt.ConfigurationError, match="budget must be a finite number > 0"):
        pt.Orchestrator(pt.FunctionBackend(lambda r: GOOD), [pt.Sentiment()], prices=MINI, budget=budget)


def test_a_budget_without_prices_is_a_configuration_error_naming_the_model():
    backend = pt.OpenAIBackend("my-finetune", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(pt.ConfigurationError) as caught:
        pt.Orchestrator(backend, [pt.Sentiment()], budget=5.0)
    assert "openai:my-finetune" in str(caught.value) and "--price-in/--price-out" in str(caught.value)
    assert "prices=Prices(" in str(caught.value)
    with pytest.raises(pt.ConfigurationError, match=r"prices must be a polytask\.Prices"):
        pt.Orchestrator(backend, [pt.Sentiment()], prices={"input": 1})  # type: ignore[arg-type]


async def test_a_shared_budget_spans_orchestrators():
    task = pt.Sentiment()
    task.max_tokens = 10
    budget = Budget(30)
    backend = fixed_cost_backend()

    def orchestrator():
        return pt.Orchestrator(
            backend, [task], prices=OUTPUT_ONLY, budget=budget, max_concurrency=1, close_backend=False
        )

    async with orchestrator() as orch:
        await orch.run(["A.", "B."])  # $20
    async with orchestrator() as orch:
        with pytest.raises(pt.BudgetExceededError, match=r"\$30\.00 spent"):
            await orch.run(["C.", "D."])  # $10 left: one more call
    assert backend.calls == 3 and budget.spent == 30
