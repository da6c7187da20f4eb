"""pt.AnalyzeTool (issue 15): one agent tool from the configured tasks — its schemas, its compact result, and the shapes
OpenAI's APIs, pydantic-ai and the OpenAI Agents SDK take, each checked against that framework's own types or run by
that framework's own agent loop."""

import copy
import json
import sys

import anyio
import jsonschema
import pytest
from pydantic import TypeAdapter

import polytask as pt
from polytask.testing import SimulatorConfig, run_in_thread
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

TEXT = "Ada Lovelace met Babbage in London. It was a fine day!"


def sentence_of(request) -> str:
    return json.loads(request.messages[-1]["content"])["sentence"]


def answer(request):
    sentence = sentence_of(request)
    if request.schema_name == "entities":
        found = [("Ada Lovelace", "PER"), ("Babbage", "PER"), ("London", "LOC"), ("Paris", "LOC")]
        return {"entities": [{"text": t, "label": label} for t, label in found if t in sentence]}
    if request.schema_name == "classify":
        return {"label": "history" if "Babbage" in sentence else "weather"}
    return {"label": "positive", "score": 0.5}


def make_tool(tasks=None, **kwargs):
    orch = pt.Orchestrator(pt.FunctionBackend(answer), tasks or [pt.Sentiment(), pt.Entities()], clock=FakeClock())
    return pt.AnalyzeTool(orch, **kwargs)


async def test_the_result_is_compact_json_that_matches_its_schema():
    tool = make_tool([pt.Sentiment(), pt.Entities(), pt.Classify(["history", "weather"])])
    result = await tool.run(TEXT, id="turn-1")
    jsonschema.validate(result, tool.result_schema())
    assert json.loads(json.dumps(result)) == result  # JSON-ready as it is
    assert set(result) == {"id", "results", "sentences", "errors", "partial"}
    assert result["id"] == "turn-1" and result["errors"] == [] and result["partial"] is False
    assert result["results"]["sentiment"] == {"label": "positive", "score": 0.5, "coverage": 1.0, "sentences": 2}
    entities = result["results"]["entities"]["entities"]
    assert [(e["text"], e["label"]) for e in entities] == [
        ("Ada Lovelace", "PER"),
        ("Babbage", "PER"),
        ("London", "LOC"),
    ]
    assert all(set(e) == {"text", "label", "start", "end"} for e in entities)  # compact: no alignment details
    assert all(TEXT[e["start"] : e["end"]] == e["text"] for e in entities)
    assert result["results"]["classify"]["top"] == ["history", "weather"]
    assert [(s["start"], s["end"]) for s in result["sentences"]] == [(0, 35), (36, 54)]
    assert (await tool.run(TEXT))["id"] is None


async def test_a_deadline_lists_the_pairs_not_done_as_errors():
    class DeadlineClock(FakeClock):
        """The deadline's sleep waits until the quick pairs answered: no real waiting."""

        ready = anyio.Event()

        async def sleep(self, seconds):
            if seconds == 2.0:
                await self.ready.wait()
            await super().sleep(seconds)

    clock = DeadlineClock()
    hang = anyio.Event()

    async def server(request):
        if request.schema_name == "entities":
            await hang.wait()
        clock.ready.set()
        return answer(request)

    orch = pt.Orchestrator(pt.FunctionBackend(server), [pt.Sentiment(), pt.Entities()], clock=clock)
    tool = pt.AnalyzeTool(orch, deadline=2.0)
    result = await tool.run("Ada Lovelace met Babbage.")
    jsonschema.validate(result, tool.result_schema())
    assert result["partial"] is True and result["results"]["entities"]["coverage"] == 0
    assert [(e["sentence"], e["task"], e["type"]) for e in result["errors"]] == [
        (0, "entities", "DeadlineExceededError")
    ]
    assert result["results"]["sentiment"]["label"] == "positive"


async def test_a_users_task_has_its_merge_type_in_the_schema_or_any_json():
    from pydantic import BaseModel

    class Products(BaseModel):
        names: list[str]

    class Merged(pt.Task):
        def merge(self, text, sentences, answers) -> Products:
            return Products(names=[n for a in answers if a for n in a.names])

    plain = pt.Task("products", Products, "List the product names mentioned in the sentence.")
    typed = Merged("merged", Products, "List the product names mentioned in the sentence.")
    tool = make_tool([plain, typed], description="Find products.")
    assert tool.description == "Find products."
    fields = tool.result_schema()["$defs"]["AnalyzeResults"]["properties"]
    assert not {"type", "$ref", "anyOf"} & set(fields["products"])  # any JSON value: its merge says nothing
    assert fields["merged"]["anyOf"] == [{"$ref": "#/$defs/Products"}, {"type": "null"}]  # its merge's type
    assert "'List the product names mentioned in the sentence.'" in make_tool([plain]).description

    async def products(request):
        return {"names": ["Kindle"] if "Kindle" in sentence_of(request) else []}

    orch = pt.Orchestrator(pt.FunctionBackend(products), [plain, typed], clock=FakeClock())
    tool = pt.AnalyzeTool(orch)
    result = await tool.run("I love my Kindle. Yes.")
    jsonschema.validate(result, tool.result_schema())
    assert result["results"]["products"] == [{"names": ["Kindle"]}, {"names": []}]
    assert result["results"]["merged"] == {"names": ["Kindle"]}


async def test_a_merge_that_failed_is_null_with_its_error_listed():
    class Broken(pt.Sentiment):
        def merge(self, text, sentences, answers):
            raise ValueError("no merge today")

    tool = make_tool([Broken(), pt.Entities()])
    result = await tool.run(TEXT)
    jsonschema.validate(result, tool.result_schema())
    assert result["results"]["sentiment"] is None and result["partial"] is True
    assert [(e["sentence"], e["task"], e["type"]) for e in result["errors"]] == [(-1, "sentiment", "ValueError")]
    assert len(result["results"]["entities"]["entities"]) == 3


async def test_call_json_runs_a_models_arguments_and_names_what_is_wrong():
    tool = make_tool()
    out = json.loads(await tool.call_json('{"text": "Ada Lovelace met Babbage in London.", "id": null}'))
    assert out["id"] is None and len(out["results"]["entities"]["entities"]) == 3
    assert json.loads(await tool.call_json({"text": "Hi.", "id": "7"}))["id"] == "7"
    for arguments, message in [
        ("{not json", "not JSON"),
        ("[1]", "must be a JSON object"),
        ({"id": "x"}, "argument 'text' is missing"),
        ({"text": "Hi.", "lang": "en"}, "unknown argument"),
        ({"text": 3}, "argument 'text' must be a string, got int"),
        ({"text": "Hi.", "id": 1.5}, "argument 'id' must be a string or an integer, got float"),
        ({"text": "\ud800"}, "unpaired surrogate"),
    ]:
        with pytest.raises(pt.InputError, match=message):
            await tool.call_json(arguments)


def test_settings_that_cannot_work_name_themselves():
    orch = pt.Orchestrator(pt.FunctionBackend(answer), [pt.Sentiment()])
    with pytest.raises(pt.ConfigurationError, match="tool name 'analyze text'"):
        pt.AnalyzeTool(orch, name="analyze text")
    with pytest.raises(pt.ConfigurationError, match="deadline"):
        pt.AnalyzeTool(orch, deadline=0)
    with pytest.raises(pt.ConfigurationError, match="tasks= applies to a backend"):
        pt.AnalyzeTool(orch, tasks=[pt.Sentiment()])


async def test_a_backend_gets_an_orchestrator_of_its_own_left_open():
    class Backend(pt.FunctionBackend):
        closed = False

        async def aclose(self):
            self.closed = True

    backend = Backend(answer)
    tool = pt.AnalyzeTool(backend)
    assert [t.name for t in tool.tasks] == ["sentiment", "entities"]
    assert not (await tool(TEXT))["partial"]
    await tool.orchestrator.aclose()
    assert not backend.closed


def test_openai_shapes_validate_against_the_openai_sdks_own_types():
    from agents.strict_schema import ensure_strict_json_schema
    from openai.types.chat import ChatCompletionFunctionToolParam
    from openai.types.responses import FunctionToolParam

    tool = make_tool()
    chat = tool.openai_function()
    assert TypeAdapter(ChatCompletionFunctionToolParam).validate_python(chat) == chat
    assert set(chat["function"]) == {"name", "description", "parameters", "strict"}
    responses = tool.openai_responses_tool()
    assert TypeAdapter(FunctionToolParam).validate_python(responses) == responses
    assert set(responses) == {"type", "name", "description", "parameters", "strict"}
    assert chat["function"]["parameters"] == responses["parameters"] == tool.parameters_schema(strict=True)
    # strict mode's rules (every property required, no extra ones): the Agents SDK's converter changes nothing
    strict = tool.parameters_schema(strict=True)
    assert ensure_strict_json_schema(copy.deepcopy(strict)) == strict
    assert strict["required"] == ["text", "id"] and strict["properties"]["id"]["type"] == ["string", "null"]
    loose = tool.openai_function(strict=False)["function"]
    assert loose["strict"] is False and loose["parameters"]["required"] == ["text"]
    jsonschema.validate({"text": "x", "id": None}, strict)
    jsonschema.validate({"text": "x"}, loose["parameters"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"text": "x", "extra": 1}, strict)


async def test_pydantic_ai_runs_the_tool_from_its_own_agent_loop():
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import FunctionModel

    tool = make_tool()
    seen = {}

    def model(messages, info):
        returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        (definition,) = info.function_tools
        seen["definition"] = definition
        if not returns:
            return ModelResponse(parts=[ToolCallPart(definition.name, {"txt": "typo"})])  # pydantic-ai says why
        if len(returns) == 1:
            seen["retry"] = str(returns[0].content)
            return ModelResponse(parts=[ToolCallPart(definition.name, {"text": TEXT, "id": "a"})])
        seen["result"] = returns[-1].content
        return ModelResponse(parts=[TextPart("done")])

    agent = Agent(FunctionModel(model), tools=[tool.pydantic_ai_tool()])
    run = await agent.run("go")
    assert run.output == "done"
    definition = seen["definition"]
    assert definition.name == "analyze_text" and definition.description == tool.description
    assert definition.parameters_json_schema["required"] == ["text"]
    assert set(definition.parameters_json_schema["properties"]) == {"text", "id"}
    assert seen["result"]["id"] == "a" and seen["result"]["results"]["sentiment"]["label"] == "positive"
    assert "text" in seen["retry"] and "Field required" in seen["retry"]  # the first call's arguments were wrong
    # a text polytask cannot take goes back to the model as a retry too
    from pydantic_ai import ModelRetry

    with pytest.raises(ModelRetry, match="unpaired surrogate"):
        await tool.pydantic_ai_tool().function(text="\ud800")


async def test_the_openai_agents_sdk_runs_the_tool_from_its_own_runner():
    from agents import Agent, FunctionTool, Model, ModelResponse, RunConfig, Runner, Usage
    from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

    tool = make_tool()
    exported = tool.openai_agents_tool()
    assert isinstance(exported, FunctionTool) and exported.strict_json_schema
    assert exported.params_json_schema == tool.parameters_schema(strict=True)
    outputs = []

    class Scripted(Model):
        async def get_response(self, system_instructions, input, model_settings, tools, *args, **kwargs):
            assert [t.name for t in tools] == ["analyze_text"]
            done = [i["output"] for i in input if isinstance(i, dict) and i.get("type") == "function_call_output"]
            outputs[:] = done
            calls = [{"text": "Ada Lovelace met Babbage in London.", "id": "q"}, {"txt": "typo"}]
            if len(done) < len(calls):
                arguments = json.dumps(calls[len(done)])
                item = ResponseFunctionToolCall(
                    type="function_call", call_id=f"c{len(done)}", name=tools[0].name, arguments=arguments
                )
                return ModelResponse(output=[item], usage=Usage(), response_id=None)
            text = ResponseOutputText(type="output_text", text="done", annotations=[])
            message = ResponseOutputMessage(
                id="m", type="message", role="assistant", status="completed", content=[text]
            )
            return ModelResponse(output=[message], usage=Usage(), response_id=None)

        def stream_response(self, *args, **kwargs):
            raise NotImplementedError

    agent = Agent(name="a", model=Scripted(), tools=[exported])
    run = await Runner.run(agent, "go", run_config=RunConfig(tracing_disabled=True))
    assert run.final_output == "done"
    first = json.loads(outputs[0])
    assert first["id"] == "q" and [e["text"] for e in first["results"]["entities"]["entities"]] == [
        "Ada Lovelace",
        "Babbage",
        "London",
    ]
    assert outputs[1].startswith("error: unknown argument(s) 'txt'")  # the model is told, the run goes on


@pytest.mark.parametrize(("module", "export"), [("pydantic_ai", "pydantic_ai_tool"), ("agents", "openai_agents_tool")])
def test_a_missing_framework_is_a_clear_error_naming_the_extra(monkeypatch, module, export):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(pt.ConfigurationError, match=r"not installed: pip install 'polytask\[agents\]'"):
        getattr(make_tool(), export)()


def test_import_polytask_imports_no_agent_framework():
    import subprocess

    code = "import sys, polytask, polytask.cli; bad = [m for m in ('mcp', 'pydantic_ai', 'agents') if m in sys.modules]"
    subprocess.run([sys.executable, "-c", code + "; assert not bad, bad"], check=True)


async def test_the_tool_over_loopback_against_the_simulator():
    with run_in_thread(SimulatorConfig(faults={"server_error": 0.2})) as sim:
        backend = pt.OpenAIBackend("gpt-4o-mini", base_url=sim.base_url, api_key="sk-test-secret")
        async with pt.Orchestrator(
            backend, [pt.Sentiment(), pt.Entities()], retry=pt.RetryPolicy(wait_initial=0, wait_jitter=0)
        ) as orch:
            tool = pt.AnalyzeTool(orch)
            results = []

            async def turn(i):
                results.append(json.loads(await tool.call_json({"text": f"Turn {i} in Paris. Fine.", "id": str(i)})))

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(turn, i)
    assert sorted(r["id"] for r in results) == [str(i) for i in range(8)]
    assert not any(r["partial"] for r in results)
    assert orch.stats.requests >= 32  # 8 turns × 2 sentences × 2 tasks, retries on top, in one orchestrator
    assert all("sk-test-secret" not in json.dumps(r) for r in results)
