"""Task fusion and sentence packing (polytask.packing): fewer calls, each part of an answer validated alone, a missing
or invalid part asked again alone, the same results as one call per pair."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

import polytask as pt
from polytask.chat import ChatRequest
from polytask.cli import app
from polytask.exceptions import BadRequestError, ConfigurationError
from polytask.packing import Bundle, Packer, bundle_schema
from polytask.segment import segment
from polytask.testing import FakeClock

pytestmark = pytest.mark.anyio

DATA = Path(__file__).parent / "data"
EWT = Path(__file__).parents[1] / "examples" / "ewt_dev.jsonl"
TEXT = "Alice met Bob in Paris. They went to Rome. It rained all week. Carol stayed home."


def sentences_of(request: ChatRequest) -> list[tuple[int, str]]:
    data = json.loads(request.messages[-1]["content"])
    return [(s["n"], s["sentence"]) for s in data["sentences"]]


def label_of(sentence: str) -> str:
    return "negative" if "rain" in sentence else "positive"


def single_answer(request: ChatRequest) -> dict[str, object]:
    sentence = json.loads(request.messages[-1]["content"])["sentence"]
    if request.schema_name == "sentiment":
        return {"label": label_of(sentence), "score": 0.5}
    return {"entities": []}


def test_the_schemas_sit_side_by_side_with_their_definitions_renamed_apart():
    class Inner(BaseModel):
        x: int

    class A(BaseModel):
        inner: Inner

    class B(BaseModel):
        inner: list[Inner]

    tasks = [pt.Task("a", A, "Do a."), pt.Task("b", B, "Do b.")]
    schema = bundle_schema(tasks, 2)
    assert schema["required"] == ["1", "2"] and schema["additionalProperties"] is False  # no sentence left out
    assert schema["properties"]["1"] == schema["properties"]["2"] == {"$ref": "#/$defs/polytask_entry"}
    entry = schema["$defs"]["polytask_entry"]
    assert entry["required"] == ["a", "b"] and entry["additionalProperties"] is False
    assert set(schema["$defs"]) == {"a__Inner", "b__Inner", "polytask_entry"}
    assert entry["properties"]["a"]["properties"]["inner"] == {"$ref": "#/$defs/a__Inner"}
    bundle = Bundle(tasks, 2)
    answer = bundle.parse(json.dumps({"2": {"a": {"inner": {"x": 1}}, "b": {"inner": [{"x": 2}]}}}))
    parts = bundle.split(answer, 2)
    assert parts[(1, "a")] == A(inner=Inner(x=1)) and parts[(1, "b")] == B(inner=[Inner(x=2)])
    assert isinstance(parts[(0, "a")], pt.AnswerValidationError)  # sentence 1 was not answered


def test_split_keeps_valid_parts_and_marks_the_rest():
    sentiment, entities = pt.Sentiment(), pt.Entities()
    bundle = Bundle([sentiment, entities], 3)
    answer = bundle.parse(
        json.dumps(
            {
                "1": {"sentiment": {"label": "Positive ", "score": 0.1}, "entities": {"entities": []}},
                "2": {"sentiment": {"label": "furious", "score": 0.1}, "entities": {"entities": []}},
                "9": {"sentiment": {"label": "neutral", "score": 0}, "entities": {"entities": []}},
                "3": ["not", "an", "object"],
            }
        )
    )
    parts = bundle.split(answer, 3)
    assert parts[(0, "sentiment")].label == "positive"  # recovered as a single answer is (the case, the space)
    assert isinstance(parts[(1, "sentiment")], pt.AnswerValidationError)  # not a label: asked again alone
    assert not isinstance(parts[(1, "entities")], Exception)  # its other task's part is kept
    assert all(isinstance(parts[(2, t)], pt.AnswerValidationError) for t in ("sentiment", "entities"))
    assert len(parts) == 6  # the unasked "9" is ignored


def test_packs_follow_the_token_budget_not_a_fixed_count():
    tasks = [pt.Sentiment()]
    short = segment("One. Two. Three. Four. Five. Six.")
    assert [len(u.sentences) for u in Packer(tasks, pack=4).units(short)] == [4, 2]
    long_text = " ".join(f"This sentence number {i} is made rather long on purpose with many words." for i in range(6))
    long = segment(long_text)
    probe = Packer(tasks)
    one = probe.prompt_tokens(probe.bundle(0, 1).messages([long[0].text])) - probe.prompt_tokens(
        probe.bundle(0, 1).messages([])
    )
    budget = probe.prompt_tokens(probe.bundle(0, 1).messages([])) + 2 * (one + 40)  # two sentences and answers
    small = Packer(tasks, pack=8, pack_tokens=budget)
    assert [len(u.sentences) for u in small.units(long)] == [2, 2, 2]  # two fit, not eight
    tiny = Packer(tasks, pack=8, pack_tokens=1)
    assert [len(u.sentences) for u in tiny.units(long)] == [1] * 6  # a sentence over the budget still goes, alone
    fused = Packer([pt.Sentiment(), pt.Entities()], fuse=True)
    units = fused.units(short)
    assert len(units) == 6 and all(len(u.tasks) == 2 and u.bundle is not None for u in units)
    plain = Packer([pt.Sentiment(), pt.Entities()]).units(short)
    assert len(plain) == 12 and all(u.bundle is None for u in plain)
    with pytest.raises(ConfigurationError, match="pack"):
        Packer(tasks, pack=0)


def test_the_shared_prompt_prefix_is_byte_identical_across_calls():
    class Product(BaseModel):
        names: list[str]

    products = pt.Task(
        "products", Product, "List the products.", examples=[("I love my Kindle.", {"names": ["Kindle"]})]
    )
    packer = Packer([pt.Sentiment(), products], fuse=True, pack=2)
    document = segment(TEXT)
    first, second = (packer.messages(u, document) for u in packer.units(document))
    assert first[0] == second[0] and first[1] != second[1]  # the system message (instructions, examples) is shared
    system = first[0]["content"]
    assert (
        'Task "products": List the products.' in system
        and '"I love my Kindle." → "products": {"names":["Kindle"]}' in system
    )


async def test_fused_and_packed_runs_give_the_per_pair_results_in_far_fewer_calls(simulator):
    sim = simulator(gold_path=EWT)
    documents = [{"id": r["id"], "text": r["text"]} for r in map(json.loads, EWT.read_text().splitlines()[:30])]
    out = {}
    for options in ({}, {"fuse": True, "pack": 8}):
        backend = pt.OpenAIBackend(model="sim", base_url=sim.base_url, api_key="sk-test")
        async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()], **options) as orch:
            out[bool(options)] = (await orch.run(documents), orch.stats)
    (plain, plain_stats), (packed, packed_stats) = out[False], out[True]
    assert [r.model_dump(exclude={"usage", "pairs", "elapsed"}) for r in packed] == [
        r.model_dump(exclude={"usage", "pairs", "elapsed"}) for r in plain
    ]  # the same answers, entity offsets included
    assert plain_stats.requests >= 8 * packed_stats.requests
    assert plain_stats.prompt_tokens >= 2 * packed_stats.prompt_tokens
    assert packed_stats.asked_alone == 0 and packed_stats.pairs_failed == 0
    assert sum(r.usage.requests for r in packed) == packed_stats.requests


async def test_a_missing_or_invalid_part_is_asked_again_alone_and_the_rest_kept():
    asked: list[str] = []

    def answer(request: ChatRequest) -> dict[str, object]:
        if request.schema_name in ("sentiment", "entities"):
            asked.append(request.schema_name)
            return single_answer(request)
        entries = {}
        for n, sentence in sentences_of(request):
            entry = {"sentiment": {"label": label_of(sentence), "score": 0.5}, "entities": {"entities": []}}
            if n == 2:
                entry["sentiment"] = {"label": "furious", "score": 0.5}  # invalid: asked again alone
            if n == 3:
                continue  # missing: both tasks asked again alone
            entries[str(n)] = entry
        return entries

    backend = pt.FunctionBackend(answer, prices=pt.Prices(input=1.0, output=1.0))
    async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()], fuse=True, pack=8) as orch:
        (result,) = await orch.run([TEXT])
    assert not result.partial
    labels = [p.answer.label for p in result.pairs if p.task == "sentiment"]
    assert labels == ["positive", "positive", "negative", "positive"]
    assert sorted(asked) == ["entities", "sentiment", "sentiment"]
    assert orch.stats.asked_alone == 3 and orch.stats.requests == 4
    by_pair = {(p.sentence, p.task): p for p in result.pairs}
    assert by_pair[(1, "sentiment")].attempts == 2 and by_pair[(0, "sentiment")].attempts == 1
    assert sum(p.cost for p in result.pairs) == pytest.approx(result.usage.cost)
    assert by_pair[(1, "sentiment")].cost > by_pair[(0, "sentiment")].cost > 0


async def test_an_unreadable_answer_is_re_asked_once_then_every_pair_alone():
    calls: list[str] = []

    def answer(request: ChatRequest) -> object:
        calls.append(request.schema_name)
        if request.schema_name.startswith("answers_"):
            return "not JSON at all"
        return single_answer(request)

    async with pt.Orchestrator(pt.FunctionBackend(answer), [pt.Sentiment(), pt.Entities()], fuse=True, pack=8) as orch:
        (result,) = await orch.run([TEXT])
    assert not result.partial
    assert calls[:2] == ["answers_sentiment_entities"] * 2  # asked, then re-asked once with the error
    assert sorted(calls[2:]) == ["entities"] * 4 + ["sentiment"] * 4
    assert orch.stats.asked_alone == 8


async def test_a_call_that_fails_for_the_server_is_not_asked_again_pair_by_pair():
    def answer(request: ChatRequest) -> object:
        raise pt.ServerError("HTTP 500: down", status_code=500)

    backend = pt.FunctionBackend(answer, prices=pt.Prices(input=1.0, output=1.0))
    retry = pt.RetryPolicy(attempts=2, wait_initial=0, wait_max=0, wait_jitter=0)
    async with pt.Orchestrator(
        backend, [pt.Sentiment(), pt.Entities()], fuse=True, pack=8, retry=retry, max_outage=None
    ) as orch:
        (result,) = await orch.run([TEXT])
    assert result.partial and backend.calls == 2 and orch.stats.asked_alone == 0  # retried as one call, not split
    assert {p.error.type for p in result.pairs} == {"ServerError"}


async def test_a_packed_call_too_large_for_the_server_or_the_tpm_limit_goes_pair_by_pair():
    def answer(request: ChatRequest) -> object:
        if request.max_tokens > 600:  # the server's context: prompt + max_tokens
            raise BadRequestError("HTTP 400: context length exceeded", status_code=400)
        return single_answer(request)

    async with pt.Orchestrator(pt.FunctionBackend(answer), [pt.Sentiment(), pt.Entities()], fuse=True, pack=8) as orch:
        (result,) = await orch.run([TEXT])
    assert not result.partial and orch.stats.asked_alone == 8
    tight = pt.FunctionBackend(single_answer, tpm=1500)  # a bundle's max_tokens alone is over the TPM limit
    async with pt.Orchestrator(tight, [pt.Sentiment(), pt.Entities()], fuse=True, pack=8, clock=FakeClock()) as orch:
        (result,) = await orch.run([TEXT])
    assert not result.partial and tight.calls == 8


async def test_what_a_failed_packed_call_cost_is_shared_by_its_pairs():
    calls = 0

    def answer(request: ChatRequest) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            return pt.ChatResponse(content="not JSON", finish_reason="stop", prompt_tokens=100, completion_tokens=10)
        raise pt.AuthenticationError("HTTP 401: bad key", status_code=401)

    backend = pt.FunctionBackend(answer, prices=pt.Prices(input=1.0, output=1.0))
    async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()], fuse=True, pack=8) as orch:
        with pytest.raises(pt.AuthenticationError) as caught:
            await orch.run([TEXT])
    (result,) = caught.value.results
    assert result.usage.cost > 0 and sum(p.cost for p in result.pairs) == pytest.approx(result.usage.cost)


async def test_a_rerun_of_a_packed_job_is_answered_from_the_cache(tmp_path, simulator):
    sim = simulator()
    for expected in (2, 0):
        backend = pt.OpenAIBackend(model="sim", base_url=sim.base_url, api_key="sk-test")
        async with pt.Orchestrator(
            backend, [pt.Sentiment(), pt.Entities()], fuse=True, pack=2, cache=tmp_path / "c.sqlite"
        ) as orch:
            (result,) = await orch.run([TEXT])
        assert orch.stats.requests == expected and not result.partial


def test_a_dry_run_counts_the_packed_calls():
    tasks = [pt.Sentiment(), pt.Entities()]
    plain = pt.Orchestrator(pt.FunctionBackend(single_answer), tasks).dry_run([TEXT])
    packed = pt.Orchestrator(pt.FunctionBackend(single_answer), tasks, fuse=True, pack=8).dry_run([TEXT])
    assert (plain.pairs, plain.calls) == (8, 8)
    assert (packed.pairs, packed.calls) == (8, 1)
    assert packed.prompt_tokens < plain.prompt_tokens / 2


def test_the_cli_runs_and_compares_packed_configurations(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "d", "text": TEXT}) + "\n")
    result = runner.invoke(
        app,
        ["run", str(src), "-o", str(out), "--simulate", "--fuse", "--pack", "4", "--no-cache"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    (line,) = out.read_text().splitlines()
    assert len(json.loads(line)["sentences"]) == 4
    bad = runner.invoke(app, ["run", str(src), "-o", str(out), "--simulate", "--pack", "0"])
    assert bad.exit_code == 2 and "--pack must be greater than 0" in bad.output
    compared = runner.invoke(
        app,
        ["eval", str(DATA / "oracle_sample.jsonl"), "--simulate", "--compare", "pack=1", "--compare", "fuse=1,pack=8"],
        catch_exceptions=False,
    )
    assert compared.exit_code == 0, compared.output
    (calls,) = [line for line in compared.output.splitlines() if line.startswith("│ calls")]
    plain, packed = (int(cell.strip().replace(",", "")) for cell in calls.split("│")[2:4])
    assert packed < plain


def test_packing_needs_a_positive_count():
    with pytest.raises(ConfigurationError, match="pack_tokens"):
        pt.Orchestrator(pt.FunctionBackend(single_answer), [pt.Sentiment()], pack=2, pack_tokens=0)


async def test_a_deadline_ends_every_pair_of_a_packed_call():
    started = anyio.Event()

    async def hang(request: ChatRequest) -> object:
        started.set()
        await anyio.Event().wait()  # never answers
        return {}

    class Clock(FakeClock):
        async def sleep(self, seconds: float) -> None:
            await started.wait()  # the deadline passes once the packed call is at the server
            await super().sleep(seconds)

    backend = pt.FunctionBackend(hang)
    async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()], fuse=True, pack=8, clock=Clock()) as orch:
        result = await orch.process(TEXT, deadline=5.0)
    assert result.partial and len(result.pairs) == 8 and backend.calls == 1
    assert {p.error.type for p in result.pairs} == {"DeadlineExceededError"}
