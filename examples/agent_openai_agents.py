"""An OpenAI Agents SDK agent calling polytask's tool, offline.

The agent's model is scripted (the SDK ships no test model): its first turn calls the tool on the review, its second
answers from the tool's output. The tool's own calls go to polytask's OpenAI-compatible simulator. With a real model,
drop ``model=`` (the SDK's default model, ``OPENAI_API_KEY``).

    pip install 'polytask[agents]' && python examples/agent_openai_agents.py
"""

import json
from pathlib import Path
from typing import Any

import anyio
from agents import Agent, Model, ModelResponse, RunConfig, Runner, Usage
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

import polytask as pt
from polytask.testing import SimulatorConfig, run_in_thread

GOLD = Path(__file__).with_name("quickstart.jsonl")
REVIEW = "Great job! Mercedes and Dan are very thorough and on top of everything!"


class ScriptedModel(Model):
    """Calls the first tool it is given, then answers from that tool's output."""

    async def get_response(
        self, system_instructions: Any, input: Any, model_settings: Any, tools: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        items = input if isinstance(input, list) else []
        outputs = [i for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]
        if not outputs:
            arguments = json.dumps({"text": REVIEW, "id": None})  # strict mode: every argument, id null
            call = ResponseFunctionToolCall(
                type="function_call", call_id="call_1", name=tools[0].name, arguments=arguments
            )
            return ModelResponse(output=[call], usage=Usage(), response_id=None)
        result = json.loads(outputs[-1]["output"])
        people = [e["text"] for e in result["results"]["entities"]["entities"] if e["label"] == "PER"]
        text = ResponseOutputText(
            type="output_text", text=f"The review praises {' and '.join(people)}.", annotations=[]
        )
        message = ResponseOutputMessage(
            id="msg_1", type="message", role="assistant", status="completed", content=[text]
        )
        return ModelResponse(output=[message], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("this example does not stream")


async def main() -> None:
    with run_in_thread(SimulatorConfig(gold_path=GOLD)) as sim:
        backend = pt.OpenAIBackend("gpt-4o-mini", base_url=sim.base_url, api_key="simulated")
        async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()]) as orch:
            tool = pt.AnalyzeTool(orch, deadline=30)
            tools = [tool.openai_agents_tool()]
            agent = Agent(name="analyst", instructions="Answer from the tool.", model=ScriptedModel(), tools=tools)
            no_tracing = RunConfig(tracing_disabled=True)  # nothing is sent to OpenAI's trace service
            run = await Runner.run(agent, f"Who does this review praise? {REVIEW}", run_config=no_tracing)
    print("tool calls:", [i.raw_item.name for i in run.new_items if i.type == "tool_call_item"])
    print("answer:", run.final_output)


if __name__ == "__main__":
    anyio.run(main)
