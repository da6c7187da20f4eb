"""Loose answers (issue 12): what is unambiguous is read before a re-ask — a code fence, prose around the JSON, an
enum value's case or spaces — and nothing is guessed; a pair that fails keeps what the model said in its error."""

import enum
import json
from typing import Literal

import pytest
from pydantic import BaseModel

import polytask as pt
import polytask.cli._options as options
from cli_helpers import own_cache_dir, run_cli, summary_value  # noqa: F401 (the fixture)
from polytask._recover import recover_answer
from polytask.testing.schema_fill import LOOSE_FORMS, answer_rng, loosen_answer
from polytask.testing.simulator import SimulatorConfig

pytestmark = pytest.mark.anyio

SENTIMENT = pt.Sentiment().json_schema()
ENTITIES = pt.Entities().json_schema()
GOOD = '{"label": "positive", "score": 0.5}'


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Paint(BaseModel):
    colour: Colour  # a Python Enum: its schema is a $ref into $defs
    mixed: list[Colour]
    finish: Literal["Matte"] | None  # a const-like Literal in an anyOf with null
    note: Literal["a", "b"] | str  # a branch takes free text


PAINT = pt.Task("paint", Paint, "Name the paint.").json_schema()


# --- what is recovered -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"```json\n{GOOD}\n```", GOOD),
        (f"```\n{GOOD}\n```", GOOD),
        (f"  ```JSON\n{GOOD}\n```\n", GOOD),
        (f"Here is the answer: {GOOD}", GOOD),
        (f"{GOOD}\nThe sentence is clearly positive.", GOOD),
        (f"Sure!\n```json\n{GOOD}\n```\nAnything else?", GOOD),
        ('{"label": "Positive ", "score": 0.5}', '{"label":"positive","score":0.5}'),
        ('{"label": "NEGATIVE", "score": -1}', '{"label":"negative","score":-1}'),
        ('Answer:\n```json\n{"label": " neutral\\n", "score": 0}\n```', '{"label":"neutral","score":0}'),
    ],
)
def test_a_fence_prose_and_an_enum_value_s_case_or_spaces_are_recovered(content, expected):
    assert recover_answer(content, SENTIMENT) == expected
    assert pt.Sentiment().parse(expected)


def test_nested_enum_values_are_recovered_in_arrays_and_through_defs():
    loose = {
        "entities": [{"text": "Ann", "label": "per"}, {"text": "Rome", "label": " Loc"}, {"text": "X", "label": "MISC"}]
    }
    got = json.loads(recover_answer(json.dumps(loose), ENTITIES))
    assert [e["label"] for e in got["entities"]] == ["PER", "LOC", "MISC"]
    assert [e["text"] for e in got["entities"]] == ["Ann", "Rome", "X"]  # free text is never touched


def test_a_python_enum_a_literal_in_an_anyof_and_a_free_text_branch():
    loose = {"colour": "RED", "mixed": ["Green", "red "], "finish": "matte", "note": "A"}
    got = json.loads(recover_answer(json.dumps(loose), PAINT))
    assert got == {"colour": "red", "mixed": ["green", "red"], "finish": "Matte", "note": "A"}  # "A" is free text
    assert Paint.model_validate(got).colour is Colour.RED


# --- what is never guessed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        GOOD,  # valid already: nothing to recover
        f"{GOOD}\n{GOOD}",  # two objects
        f"```json\n{GOOD}\n```\n```json\n{GOOD}\n```",  # two fences
        'First {"label": "negative"}, then {"label": "positive", "score": 0.5}',
        '{"label": "positive", "score": 0.5',  # cut off
        '```json\n{"label": "positive", "score": 0.5,}\n```',  # broken (a trailing comma)
        "{'label': 'positive', 'score': 0.5}",  # not JSON
        f"[{GOOD}]",  # an array holding the object
        f"The answer is [{GOOD}]",
        json.dumps(GOOD),  # a JSON string holding JSON
        "The sentiment is {positive}.",
        f'"first", {GOOD}',  # an item of a list without its brackets
        "positive",
        "",
        '{"label": "happy", "score": 0.5}',  # outside the enum after normalisation
        '{"label": "pos", "score": 0.5}',  # no prefix or fuzzy matching
        '{"Label": "positive", "score": 0.5}',  # keys are never renamed
    ],
)
def test_nothing_is_guessed(content):
    assert recover_answer(content, SENTIMENT) is None


def test_an_enum_value_matching_two_members_once_case_is_ignored_is_left_alone():
    class Ambiguous(BaseModel):
        mode: Literal["on", "ON", "off"]

    schema = pt.Task("a", Ambiguous, "Mode.").json_schema()
    assert recover_answer('{"mode": "On"}', schema) is None
    assert recover_answer('{"mode": "OFF"}', schema) == '{"mode":"off"}'
    assert recover_answer('```\n{"mode": "on"}\n```', schema) == '{"mode": "on"}'  # a member as it is


def test_a_fenced_object_with_an_invalid_value_is_unwrapped_but_stays_invalid():
    recovered = recover_answer('```json\n{"label": "ecstatic", "score": 0.5}\n```', SENTIMENT)
    assert recovered == '{"label": "ecstatic", "score": 0.5}'
    with pytest.raises(ValueError):
        pt.Sentiment().parse(recovered)


# --- through a backend: no re-ask for what was recovered ---------------------------------------------------------

SENTENCES = "Ann met Bob in Rome. The food was great. Nobody came."


def loose_backend(sentiment, entities):
    def fn(request):
        return sentiment if request.schema_name == "sentiment" else entities

    return pt.FunctionBackend(fn)


@pytest.mark.parametrize(
    "sentiment",
    [
        f"```json\n{GOOD}\n```",
        f"```\n{GOOD}\n```",
        f"Here is the JSON you asked for:\n{GOOD}\nLet me know if you need more.",
        '{"label": "POSITIVE ", "score": 0.5}',
    ],
)
async def test_loose_answers_are_accepted_with_one_call_per_pair(sentiment):
    entities = '```json\n{"entities": [{"text": "Ann", "label": "per"}, {"text": "Rome", "label": "Loc "}]}\n```'
    backend = loose_backend(sentiment, entities)
    async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()]) as orch:
        result = await orch.process(SENTENCES)
    pairs = len(result.pairs)
    assert pairs == 6 and not result.partial
    assert backend.calls == pairs  # exactly one call per pair: no re-ask
    assert orch.stats.reasks == 0 and orch.stats.recovered == pairs and orch.stats.requests == pairs
    assert not any(p.reasked for p in result.pairs)
    assert result.results["sentiment"].label == "positive"
    labels = {(e.text, e.label) for e in result.results["entities"].entities}
    assert labels == {("Ann", "PER"), ("Rome", "LOC")}


@pytest.mark.parametrize(
    "first",
    [
        f"{GOOD}\n{GOOD}",  # two objects: which one?
        '```json\n{"label": "happy", "score": 0.5}\n```',  # unwrapped, but no enum member
        '{"label": "pos", "score": 0.5}',
    ],
)
async def test_an_ambiguous_or_invalid_answer_still_goes_to_the_reask(first):
    answers = iter([first, GOOD])
    seen = []

    def fn(request):
        seen.append(request.messages)
        return next(answers)

    backend = pt.FunctionBackend(fn)
    async with pt.Orchestrator(backend, [pt.Sentiment()]) as orch:
        result = await orch.process("Nice.")
    pair = result.pairs[0]
    assert pair.ok and pair.reasked and pair.attempts == 2 and backend.calls == 2
    assert orch.stats.reasks == 1 and orch.stats.recovered == 0
    assert seen[1][-2] == {"role": "assistant", "content": first}  # the model sees its own answer as it was


async def test_the_reask_names_what_is_still_wrong_in_a_fenced_answer():
    seen = []
    answers = iter(['```json\n{"label": "happy", "score": 0.5}\n```', GOOD])

    def fn(request):
        seen.append(request.messages)
        return next(answers)

    async with pt.Orchestrator(pt.FunctionBackend(fn), [pt.Sentiment()]) as orch:
        await orch.process("Nice.")
    assert "label" in seen[1][-1]["content"] and "Invalid JSON" not in seen[1][-1]["content"]


async def test_a_loose_reask_answer_is_recovered_too():
    answers = iter(["I think it is positive.", f"```json\n{GOOD}\n```"])
    backend = pt.FunctionBackend(lambda request: next(answers))
    async with pt.Orchestrator(backend, [pt.Sentiment()]) as orch:
        result = await orch.process("Nice.")
    assert result.pairs[0].ok and result.pairs[0].reasked
    assert (backend.calls, orch.stats.reasks, orch.stats.recovered) == (2, 1, 1)


async def test_a_recovered_answer_is_cached_as_valid_json(tmp_path):
    backend = loose_backend(f"```json\n{GOOD}\n```", '{"entities": []}')
    for _ in range(2):
        async with pt.Orchestrator(backend, [pt.Sentiment()], cache=tmp_path / "c.sqlite") as orch:
            result = await orch.process("Nice.")
        assert result.results["sentiment"].label == "positive"
    assert backend.calls == 1 and orch.stats.cache_hits == 1  # the second run paid nothing


async def test_a_task_that_overrides_parse_or_recover():
    class Upper(pt.Sentiment):
        def parse(self, content):  # a user's own parsing is given the recovered text
            answer = super().parse(content)
            return answer.model_copy(update={"score": 1.0})

    class Strict(pt.Sentiment):
        def recover(self, content):
            return None  # no recovery: straight to the re-ask

    fenced = f"```json\n{GOOD}\n```"
    backend = loose_backend(fenced, "")
    async with pt.Orchestrator(backend, [Upper()]) as orch:
        result = await orch.process("Nice.")
    assert result.results["sentiment"].score == 1.0 and backend.calls == 1 and orch.stats.recovered == 1
    backend = loose_backend(fenced, "")
    async with pt.Orchestrator(backend, [Strict()]) as orch:
        result = await orch.process("Nice.")
    assert result.pairs[0].error.type == "AnswerValidationError" and backend.calls == 2


# --- the raw answer in the error --------------------------------------------------------------------------------


async def test_a_pair_that_fails_keeps_the_model_s_last_answer():
    answers = iter(["Sorry, I can only say: happy", "still {not json"])
    async with pt.Orchestrator(pt.FunctionBackend(lambda r: next(answers)), [pt.Sentiment()]) as orch:
        result = await orch.process("Nice.")
    error = result.pairs[0].error
    assert error.type == "AnswerValidationError" and error.content == "still {not json"
    assert result.to_json_dict()["pairs"][0]["error"]["content"] == "still {not json"


async def test_a_long_answer_is_truncated_and_says_so():
    long = "x" * 3000
    backend = pt.FunctionBackend(lambda r: long)
    async with pt.Orchestrator(backend, [pt.Sentiment()]) as orch:
        result = await orch.process("Nice.")
    content = result.pairs[0].error.content
    assert content == "x" * 500 + " … [truncated to 500 characters]"


async def test_a_cut_off_answer_and_a_refusal_keep_what_the_model_said():
    cut = pt.ChatResponse(content='{"label": "posi', finish_reason="length", completion_tokens=32)
    refused = pt.ChatResponse(content=None, refusal="I can't help with that.")
    for response, kind, said in (
        (cut, "LengthLimitError", '{"label": "posi'),
        (refused, "RefusalError", "I can't help with that."),
    ):
        async with pt.Orchestrator(pt.FunctionBackend(lambda r, x=response: x), [pt.Sentiment()]) as orch:
            result = await orch.process("Nice.")
        assert (result.pairs[0].error.type, result.pairs[0].error.content) == (kind, said)


def test_only_the_model_s_answer_is_kept_never_an_other_error_s_attributes():
    class Leaky(Exception):
        content = "request body with sk-secret"

    assert pt.ErrorInfo.from_exception(Leaky("x")).content is None
    assert pt.ErrorInfo.from_exception(pt.ServerError("x", status_code=500)).content is None
    assert pt.ErrorInfo.from_exception(pt.AnswerValidationError("bad", content="said")).content == "said"


# --- through the simulator over loopback --------------------------------------------------------------------------


def test_the_simulator_writes_every_loose_form_and_each_is_recovered():
    answer = {"entities": [{"text": "Ann", "label": "PER"}]}
    forms = set()
    for i in range(60):
        text = loosen_answer(answer, ENTITIES, answer_rng(0, f"s{i}"))
        assert text != json.dumps(answer, separators=(",", ":"))
        recovered = recover_answer(text, ENTITIES)
        assert json.loads(recovered) == answer
        forms.add("fence" if text.startswith("```") else "prose" if text.startswith("Here") else "case")
    assert forms == {"fence", "prose", "case"} and len(LOOSE_FORMS) == 4


async def test_loose_answers_from_the_simulator_need_no_reask(simulator):
    sim = simulator(seed=5, faults={"loose_answer": 1.0})
    texts = ["Ann lives in Rome. She loves it!", "Bob works at Acme in Paris. The weather is bad."]
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="test-key-123456", timeout=5.0)
    async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()]) as orch:
        results = await orch.run(texts)
    pairs = sum(len(r.pairs) for r in results)
    assert not any(r.partial for r in results)
    assert sim.stats.received == pairs and sim.stats.outcomes == {"loose_answer": pairs}
    assert orch.stats.reasks == 0 and orch.stats.recovered == pairs


async def test_invalid_answers_from_the_simulator_end_with_the_raw_text(simulator):
    sim = simulator(faults={"invalid_answer": 1.0})
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="sk-test-key-123456", timeout=5.0)
    async with pt.Orchestrator(backend, [pt.Sentiment()]) as orch:
        result = await orch.process("Just one sentence.")
    error = result.pairs[0].error
    assert error.type == "AnswerValidationError" and "label" not in json.loads(error.content)  # what was sent
    assert "sk-test" not in json.dumps(result.to_json_dict())


# --- the CLI -------------------------------------------------------------------------------------------------------


def test_the_cli_counts_recovered_answers_and_writes_the_raw_text_of_failed_ones(tmp_path, monkeypatch):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "text": "Ann lives in Rome. She loves it!"}\n')
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(options, "simulator_config", lambda *a: SimulatorConfig(faults={"loose_answer": 1.0}))
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--no-cache")
    assert result.exit_code == 0, result.output
    assert summary_value(result.output, "loose answers recovered (no re-ask)") == "2"
    assert summary_value(result.output, "429s / retries / re-asks") == "0 / 0 / 0"

    monkeypatch.setattr(options, "simulator_config", lambda *a: SimulatorConfig(faults={"invalid_answer": 1.0}))
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--no-cache", "--allow-partial")
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    errors = [p["error"] for p in line["pairs"]]
    assert [e["type"] for e in errors] == ["AnswerValidationError"] * 2
    assert all(isinstance(json.loads(e["content"]), dict) for e in errors)  # the model's last answer, as it came


def test_json_nested_past_the_parser_s_depth_is_not_recovered_and_raises_nothing():
    assert recover_answer("[" * 100_000, SENTIMENT) is None
    assert recover_answer("Answer: {" + "[" * 100_000 + "}", SENTIMENT) is None
