"""The OpenAI-compatible simulator: rate-limit buckets, 429 shape, faults, schema answers, oracle answers."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Coroutine
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx2
import openai
import pytest
from pydantic import BaseModel, Field, ValidationError

from polytask.testing import (
    FAULT_KINDS,
    FaultRates,
    GoldIndex,
    ServerRateLimiter,
    SimulatorConfig,
    answer_rng,
    fill_schema,
    format_duration,
    oracle_answer,
    run_in_thread,
    violate_schema,
)
from polytask.testing.pytest_plugin import SimulatorFactory
from polytask.testing.pytest_plugin import simulator as simulator  # the plugin's fixture, if not installed

GOLD = Path(__file__).parent / "data" / "oracle_sample.jsonl"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Label(StrEnum):
    PER = "PER"
    ORG = "ORG"
    LOC = "LOC"


class Entity(BaseModel):
    text: str
    label: Label


class Entities(BaseModel):
    entities: list[Entity]


class Score(BaseModel):
    value: int = Field(ge=-3, le=3)
    weight: float = Field(gt=0.5, lt=0.75)


class Nested(BaseModel):
    kind: Literal["a", "b", "c"]
    tags: list[str] = Field(min_length=2, max_length=4)
    scores: list[Score] = Field(max_length=2)
    best: Score | None
    flag: bool
    child: Entity
    note: str = Field(min_length=12, max_length=15)


def entity_schema() -> dict[str, Any]:
    return Entities.model_json_schema()


def body(sentence: str, schema: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "You are a careful annotator."},
            {"role": "user", "content": json.dumps({"sentence": sentence})},
        ],
        "max_tokens": 100,
        "temperature": 0,
    }
    if schema is not None:
        data["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        }
    data.update(extra)
    return data


def post(base_url: str, data: dict[str, Any], timeout: float = 5.0) -> httpx2.Response:
    return httpx2.post(base_url + "/chat/completions", json=data, timeout=timeout)


# --- durations and buckets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.02, "20ms"),
        (0.0004, "1ms"),
        (0, "0ms"),
        (1, "1s"),
        (1.234, "1.234s"),
        (360, "6m0s"),
        (90.5, "1m30.5s"),
        (3723, "1h2m3s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_rate_limiter_checks_requests_then_tokens() -> None:
    clock = FakeClock()
    limiter = ServerRateLimiter(rpm=2, tpm=1000, clock=clock)
    first = limiter.check(400, "m")
    assert first.allowed
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-tokens"] == "600"
    assert first.headers["x-ratelimit-reset-tokens"] == "24s"  # 400 tokens at 1000/60 per second
    assert first.headers["x-ratelimit-reset-requests"] == "30s"
    over = limiter.check(700, "m")
    assert not over.allowed and over.kind == "tokens"
    assert over.retry_after == pytest.approx(6.0)  # 100 tokens short at 16.67/s
    assert "tokens per min (TPM): Limit 1000, Used 400, Requested 700" in over.message
    assert "Please try again in 6s." in over.message
    assert limiter.check(100, "m").allowed
    blocked = limiter.check(1, "m")
    assert not blocked.allowed and blocked.kind == "requests"
    assert blocked.retry_after == pytest.approx(30.0)
    clock.now += 30
    assert limiter.check(1, "m").allowed
    too_big = limiter.check(5000, "m")
    assert not too_big.allowed and math.isinf(too_big.retry_after)
    assert too_big.message.startswith("Request too large for m on tokens per min (TPM)")


# --- the server over loopback --------------------------------------------------------------------------


def test_answers_parse_with_openai_client(simulator: SimulatorFactory) -> None:
    sim = simulator(rpm=100, tpm=100_000)

    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="test", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=body("Iguazu is in Argentina :)")["messages"],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": entity_schema(), "strict": True},
            },
            max_tokens=200,
        )
        completion = raw.parse()
        assert completion.object == "chat.completion" and completion.model == "gpt-test"
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and choice.message.refusal is None
        assert choice.message.content is not None and " " not in choice.message.content.split('"')[0]
        Entities.model_validate_json(choice.message.content)
        assert completion.usage is not None and completion.usage.total_tokens > 0
        assert raw.headers["x-ratelimit-limit-requests"] == "100"
        assert raw.headers["x-ratelimit-remaining-requests"] == "99"
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        models = await client.models.list()
        assert [m.id for m in models.data] == ["sim-model"]
        await client.close()

    run(go())


def test_answers_are_deterministic_per_seed_and_sentence(simulator: SimulatorFactory) -> None:
    a, b = simulator(seed=7), simulator(seed=7)
    schema = Nested.model_json_schema()
    first = post(a.base_url or "", body("one", schema)).json()["choices"][0]["message"]["content"]
    assert post(b.base_url or "", body("one", schema)).json()["choices"][0]["message"]["content"] == first
    others = {
        post(a.base_url or "", body(f"s{i}", schema)).json()["choices"][0]["message"]["content"] for i in range(5)
    }
    assert len(others) > 1
    # without /v1, too
    url = (a.base_url or "").removesuffix("/v1") + "/chat/completions"
    assert httpx2.post(url, json=body("one", schema)).status_code == 200


def test_rpm_429_body_headers_and_refill(simulator: SimulatorFactory) -> None:
    clock = FakeClock()
    sim = simulator(rpm=2, clock=clock)
    assert post(sim.base_url or "", body("a")).status_code == 200
    assert post(sim.base_url or "", body("b")).status_code == 200
    r = post(sim.base_url or "", body("c"))
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded" and err["param"] is None
    assert err["message"].startswith("Rate limit reached for gpt-test on requests per min (RPM): Limit 2, Used 2")
    assert "Please try again in 30s." in err["message"]
    assert r.headers["retry-after-ms"] == "30000"
    assert r.headers["retry-after"] == "30"
    assert r.headers["x-ratelimit-limit-requests"] == "2"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-ratelimit-limit-tokens" not in r.headers  # tpm unlimited
    clock.now += 30
    assert post(sim.base_url or "", body("d")).status_code == 200
    stats = httpx2.get((sim.base_url or "") + "/stats").json()
    assert stats["received"] == 4 and stats["outcomes"] == {"ok": 3, "rate_limited": 1}


def test_tpm_charges_prompt_estimate_plus_max_tokens(simulator: SimulatorFactory) -> None:
    clock = FakeClock()
    sim = simulator(tpm=1000, clock=clock)
    ok = post(sim.base_url or "", body("a", max_tokens=800))
    assert ok.status_code == 200
    prompt = ok.json()["usage"]["prompt_tokens"]
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(1000 - 800 - prompt)
    r = post(sim.base_url or "", body("a", max_completion_tokens=800))
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "tokens"
    assert f"Requested {800 + prompt}" in r.json()["error"]["message"]
    wait_ms = math.ceil((800 + prompt - (200 - prompt)) / (1000 / 60) * 1000)
    assert abs(int(r.headers["retry-after-ms"]) - wait_ms) <= 1


def test_openai_client_sees_rate_limit_error(simulator: SimulatorFactory) -> None:
    sim = simulator(faults={"rate_limit": 1.0}, fault_retry_after=1.5, rpm=10)

    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="test", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert info.value.code == "rate_limit_exceeded"
        assert info.value.response.headers["retry-after-ms"] == "1500"
        assert info.value.response.headers["retry-after"] == "2"
        assert info.value.response.headers["x-ratelimit-limit-requests"] == "10"
        await client.close()

    run(go())


@pytest.mark.parametrize(
    ("fault", "status", "exc"),
    [
        ("insufficient_quota", 429, openai.RateLimitError),
        ("server_error", 500, openai.InternalServerError),
        ("bad_gateway", 502, openai.InternalServerError),
        ("unavailable", 503, openai.InternalServerError),
    ],
)
def test_status_faults(simulator: SimulatorFactory, fault: str, status: int, exc: type[Exception]) -> None:
    sim = simulator(faults={fault: 1.0})
    r = post(sim.base_url or "", body("x"))
    assert r.status_code == status
    if fault == "bad_gateway":
        assert r.headers["content-type"].startswith("text/html") and "502 Bad Gateway" in r.text
    else:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if fault == "insufficient_quota":
        assert r.json()["error"]["code"] == "insufficient_quota"
        assert "retry-after" not in r.headers

    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="test", max_retries=0)
        with pytest.raises(exc) as info:
            await client.chat.completions.create(model="m", messages=body("x")["messages"])
        assert getattr(info.value, "status_code", None) == status
        await client.close()

    run(go())
    assert sim.stats.outcomes == {fault: 2}


def test_reset_aborts_the_connection(simulator: SimulatorFactory) -> None:
    sim = simulator(faults={"reset": 1.0})
    with pytest.raises(httpx2.TransportError):
        post(sim.base_url or "", body("x"))

    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="test", max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="m", messages=body("x")["messages"])
        await client.close()

    run(go())
    assert sim.stats.outcomes == {"reset": 2}


def test_hang_outlasts_the_client_timeout_and_stop_is_quick() -> None:
    start = time.monotonic()
    with run_in_thread(SimulatorConfig(faults=FaultRates(hang=1.0), hang_seconds=30)) as sim:

        async def go() -> None:
            client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="test", max_retries=0, timeout=0.3)
            with pytest.raises(openai.APITimeoutError):
                await client.chat.completions.create(model="m", messages=body("x")["messages"])
            await client.close()

        run(go())
        deadline = time.monotonic() + 2
        while sim.stats.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sim.stats.outcomes == {"hang": 1} and sim.stats.in_flight == 0
    assert time.monotonic() - start < 5


def test_malformed_body(simulator: SimulatorFactory) -> None:
    sim = simulator(faults={"malformed": 1.0})
    r = post(sim.base_url or "", body("x", entity_schema()))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    with pytest.raises(ValueError):
        json.loads(r.text)


def test_length_refusal_and_invalid_answer(simulator: SimulatorFactory) -> None:
    schema = Nested.model_json_schema()

    async def ask(fault: str) -> Any:
        sim = simulator(faults={fault: 1.0})
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="test", max_retries=0)
        completion = await client.chat.completions.create(
            model="m",
            messages=body("x")["messages"],
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
            max_tokens=300,
        )
        await client.close()
        return completion

    length = run(ask("length"))
    assert length.choices[0].finish_reason == "length"
    assert length.usage.completion_tokens == 300
    with pytest.raises(ValueError):
        json.loads(length.choices[0].message.content)
    refusal = run(ask("refusal"))
    assert refusal.choices[0].message.content is None and refusal.choices[0].message.refusal
    invalid = run(ask("invalid_answer"))
    text = invalid.choices[0].message.content
    json.loads(text)
    with pytest.raises(ValidationError):
        Nested.model_validate_json(text)


def test_small_max_tokens_truncates_with_length(simulator: SimulatorFactory) -> None:
    sim = simulator()
    r = post(sim.base_url or "", body("x", Nested.model_json_schema(), max_tokens=3)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3


def test_json_schema_unsupported_falls_back_to_json_object(simulator: SimulatorFactory) -> None:
    sim = simulator(supports_json_schema=False)
    r = post(sim.base_url or "", body("x", entity_schema()))
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "response_format"
    system = "Annotate.\nAnswer schema (JSON Schema): " + json.dumps(Nested.model_json_schema())
    data = body("x", response_format={"type": "json_object"})
    data["messages"][0]["content"] = system
    ok = post(sim.base_url or "", data)
    assert ok.status_code == 200
    Nested.model_validate_json(ok.json()["choices"][0]["message"]["content"])
    plain = post(sim.base_url or "", body("x"))
    assert json.loads(plain.json()["choices"][0]["message"]["content"]) == {}


def test_bad_requests_get_400(simulator: SimulatorFactory) -> None:
    sim = simulator()
    url = (sim.base_url or "") + "/chat/completions"
    assert httpx2.post(url, content=b"not json").status_code == 400
    assert httpx2.post(url, json={"model": "m", "messages": []}).status_code == 400
    assert httpx2.post(url, json=body("x", max_tokens=0)).json()["error"]["type"] == "invalid_request_error"


def test_max_concurrency_gives_503_without_rate_limit_headers(simulator: SimulatorFactory) -> None:
    sim = simulator(max_concurrency=1, latency=0.3, rpm=1000)

    async def go() -> list[httpx2.Response]:
        async with httpx2.AsyncClient(timeout=5) as client:
            url = (sim.base_url or "") + "/chat/completions"
            return list(await asyncio.gather(*(client.post(url, json=body(str(i))) for i in range(3))))

    responses = run(go())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert not any(h.startswith("x-ratelimit") or h.startswith("retry-after") for h in r.headers)
    assert sim.stats.max_in_flight >= 2 and sim.stats.outcomes == {"ok": 1, "over_capacity": 2}


def test_serve_at_once_queues_first_come_first_served_and_serves_abandoned_requests(
    simulator: SimulatorFactory,
) -> None:
    # one slot, 0.2 s each: three requests at once finish at 0.2, 0.4 and 0.6 s; a client that gives up at 0.3 s
    # leaves two requests behind, which the server still works on (as llama.cpp and Ollama do), so a request sent
    # after they were abandoned waits behind them
    sim = simulator(serve_at_once=1, latency=0.2)
    url = (sim.base_url or "") + "/chat/completions"

    async def go() -> tuple[list[httpx2.Response | BaseException], float]:
        async with httpx2.AsyncClient(timeout=0.3) as client:
            first = await asyncio.gather(
                *(client.post(url, json=body(str(i))) for i in range(3)), return_exceptions=True
            )
        start = time.monotonic()
        async with httpx2.AsyncClient(timeout=5) as client:
            assert (await client.post(url, json=body("late"))).status_code == 200
        return first, time.monotonic() - start

    first, late = run(go())
    assert sum(isinstance(r, httpx2.Response) and r.status_code == 200 for r in first) == 1
    assert sum(isinstance(r, httpx2.TimeoutException) for r in first) == 2
    assert late >= 0.4  # 0.3 s more of abandoned work, then its own 0.2 s
    stats = sim.stats
    assert stats.abandoned == 2 and stats.max_queued == 2 and stats.max_in_flight == 3
    assert stats.max_queue_wait == pytest.approx(0.4, abs=0.1) and stats.queued == 0
    assert stats.outcomes == {"ok": 2, "cancelled": 2}


def test_a_spent_daily_quota_answers_429_asking_to_wait_a_day(simulator: SimulatorFactory) -> None:
    sim = simulator(daily_quota=2)
    assert [post(sim.base_url or "", body(s)).status_code for s in "ab"] == [200, 200]
    r = post(sim.base_url or "", body("c"))
    assert r.status_code == 429
    assert (r.headers["retry-after"], r.headers["retry-after-ms"]) == ("86400", "86400000")
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert err["message"].startswith(
        "Rate limit reached for gpt-test on requests per day (RPD): Limit 2, Used 2, Requested 1. "
        "Please try again in 24h0m0s."
    )
    assert post(sim.base_url or "", body("d")).status_code == 429  # it never refills
    assert sim.stats.outcomes == {"ok": 2, "daily_quota": 2}
    with pytest.raises(ValidationError):
        SimulatorConfig(daily_quota=-1)


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        FaultRates(server_error=0.6, reset=0.6)
    with pytest.raises(ValidationError):
        SimulatorConfig(rpm=0)
    with pytest.raises(ValidationError):
        SimulatorConfig(serve_at_once=0)
    with pytest.raises(ValidationError):
        SimulatorConfig(nonsense=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SimulatorConfig.model_validate({"faults": {"explode": 0.1}})
    assert SimulatorConfig.model_validate({"faults": {"reset": 0.5}}).faults.reset == 0.5
    assert set(SimulatorConfig().faults.model_dump()) == set(FAULT_KINDS)


# --- answers -------------------------------------------------------------------------------------------


def test_fill_schema_nested_enum_array_ref() -> None:
    schema = Nested.model_json_schema()
    assert "$defs" in schema
    kinds = set()
    for seed in range(200):
        model = Nested.model_validate(fill_schema(schema, answer_rng(seed, "s")))
        kinds.add(model.kind)
    assert kinds == {"a", "b", "c"}
    hand: dict[str, Any] = {
        "type": "object",
        "properties": {
            "n": {"type": ["integer", "null"], "exclusiveMinimum": 5, "exclusiveMaximum": 7},
            "c": {"const": "x"},
            "tree": {"$ref": "#/$defs/Node"},
        },
        "required": ["n", "c", "tree"],
        "additionalProperties": False,
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
                "required": ["kids"],
            }
        },
    }
    value = fill_schema(hand, answer_rng(1, "s"))
    assert value["n"] == 6 and value["c"] == "x" and isinstance(value["tree"]["kids"], list)


def test_fill_schema_honours_patterns_multiples_and_keeps_recursion_short() -> None:
    from pydantic import BaseModel, Field

    class Tree(BaseModel):
        name: str
        children: list[Tree]

    class Form(BaseModel):
        code: str = Field(pattern=r"^[A-Z]{3}-\d{4}$")
        choice: str = Field(pattern=r"^(yes|no)$")
        step: float = Field(ge=0, le=1, multiple_of=0.25)
        week: int = Field(ge=1, le=100, multiple_of=7)
        tree: Tree

    schema = Form.model_json_schema()
    sizes = []
    for seed in range(100):
        value = fill_schema(schema, answer_rng(seed, "s"))
        Form.model_validate(value)  # every answer valid: the pattern, the multiples
        sizes.append(len(json.dumps(value)))
    assert max(sizes) < 1000  # recursive trees stay well under a 256-token answer


def test_violate_schema_is_valid_json_but_invalid() -> None:
    for model in (Nested, Entities, Score):
        value = violate_schema(model.model_json_schema(), answer_rng(0, "s"))
        with pytest.raises(ValidationError):
            model.model_validate_json(json.dumps(value))


def test_oracle_index() -> None:
    gold = GoldIndex(GOLD)
    assert len(gold) == 4
    got = gold.entities("Iguazu is in Argentina :)")
    assert [(e.text, e.label) for e in got] == [("Iguazu", "LOC"), ("Argentina", "LOC")]
    # a substring of a document that is not a gold sentence
    assert [e.text for e in gold.entities("miramar florida theyy")] == ["miramar", "florida"]
    assert gold.entities("no such sentence") == []
    answer = oracle_answer(entity_schema(), "What foods do you eat in Miramar?", gold, answer_rng(0, "x"))
    assert answer == {"entities": [{"text": "Miramar", "label": "LOC"}]}


def test_oracle_answers_over_http(simulator: SimulatorFactory) -> None:
    sim = simulator(gold_path=GOLD)
    sentence = (
        "I searched all over the internet, but I could not find one place in Tampa Bay that sells morcillas, "
        "also known as blood pudding, black pudding and blood sausages."
    )
    for text, expected in [
        (sentence, [{"text": "Tampa Bay", "label": "LOC"}]),
        ("huh?", []),
        ("大多数的加长型礼车则是租车公司的财产。", []),
        ("not in the gold data", []),
    ]:
        r = post(sim.base_url or "", body(text, entity_schema()))
        assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"entities": expected}
