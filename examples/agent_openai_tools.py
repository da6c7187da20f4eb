"""A Chat Completions tool call answered by polytask, offline: the model's tool call → the tool → the tool message.

The assistant message is scripted (it is what a model sends when it decides to call the tool), so no API key is
needed; the tool's calls go to polytask's OpenAI-compatible simulator, which answers entities from the example's gold
annotations. With a real model, send ``tools`` with ``client.chat.completions.create(model=..., messages=...,
tools=tools)`` and append the tool messages to ``messages`` for the next request.

    python examples/agent_openai_tools.py
"""

import json
from pathlib import Path

import anyio
from openai.types.chat import ChatCompletionMessage

import polytask as pt
from polytask.testing import SimulatorConfig, run_in_thread

GOLD = Path(__file__).with_name("quickstart.jsonl")
REVIEW = "Great job! Mercedes and Dan are very thorough and on top of everything!"


async def main() -> None:
    with run_in_thread(SimulatorConfig(gold_path=GOLD)) as sim:
        backend = pt.OpenAIBackend("gpt-4o-mini", base_url=sim.base_url, api_key="simulated")
        # one orchestrator for the whole app: every turn's tool calls share its rate limit and connections
        async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()]) as orch:
            tool = pt.AnalyzeTool(orch, deadline=30)
            tools = [tool.openai_function()]
            print("tool:", tools[0]["function"]["name"], json.dumps(tools[0]["function"]["parameters"]))

            messages: list[dict[str, object]] = [{"role": "user", "content": f"Who does this review praise? {REVIEW}"}]
            reply = ChatCompletionMessage.model_validate(  # the model's answer, as the openai SDK parses it
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": tool.name, "arguments": json.dumps({"text": REVIEW, "id": "r1"})},
                        }
                    ],
                }
            )
            messages.append(reply.model_dump(exclude_none=True))
            for call in reply.tool_calls or []:
                if call.type == "function" and call.function.name == tool.name:
                    content = await tool.call_json(call.function.arguments)
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": content})

    answer = json.loads(str(messages[-1]["content"]))
    print("tool message for", messages[-1]["tool_call_id"], "with", len(str(messages[-1]["content"])), "characters")
    print("sentiment:", answer["results"]["sentiment"]["label"])
    for entity in answer["results"]["entities"]["entities"]:
        print(f"entity: {entity['text']} {entity['label']} {entity['start']}-{entity['end']}")


if __name__ == "__main__":
    anyio.run(main)
