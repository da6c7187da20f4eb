"""A pydantic-ai agent calling polytask's tool, offline.

The agent's model is pydantic-ai's ``FunctionModel``, scripted: its first turn calls the tool on the review, its second
answers from the tool's result. The tool's own calls go to polytask's OpenAI-compatible simulator. With a real model,
write ``Agent("openai:gpt-4o-mini", tools=[tool.pydantic_ai_tool()])`` instead.

    pip install 'polytask[agents]' && python examples/agent_pydantic_ai.py
"""

from pathlib import Path

import anyio
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

import polytask as pt
from polytask.testing import SimulatorConfig, run_in_thread

GOLD = Path(__file__).with_name("quickstart.jsonl")
REVIEW = "Great job! Mercedes and Dan are very thorough and on top of everything!"


def scripted_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Call the tool first; once its result is in, answer from it."""
    returns = [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]
    if not returns:
        (tool,) = info.function_tools
        return ModelResponse(parts=[ToolCallPart(tool.name, {"text": REVIEW})])
    result = returns[-1].content
    people = [e["text"] for e in result["results"]["entities"]["entities"] if e["label"] == "PER"]
    return ModelResponse(parts=[TextPart(f"The review praises {' and '.join(people)}.")])


async def main() -> None:
    with run_in_thread(SimulatorConfig(gold_path=GOLD)) as sim:
        backend = pt.OpenAIBackend("gpt-4o-mini", base_url=sim.base_url, api_key="simulated")
        async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()]) as orch:
            tool = pt.AnalyzeTool(orch, deadline=30)
            agent = Agent(FunctionModel(scripted_model), tools=[tool.pydantic_ai_tool()])
            run = await agent.run(f"Who does this review praise? {REVIEW}")
    calls = [p for m in run.all_messages() for p in m.parts if isinstance(p, ToolCallPart)]
    print("tool calls:", [c.tool_name for c in calls])
    print("answer:", run.output)


if __name__ == "__main__":
    anyio.run(main)
