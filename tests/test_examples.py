"""The agent examples (issue 15) run as they are, offline, against polytask's simulator: each one's output is checked,
so an example that no longer works fails CI."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out.splitlines()


def test_openai_tools_round_trip(capsys):
    out = run_example("agent_openai_tools.py", capsys)
    assert out[0].startswith('tool: analyze_text {"type": "object"')
    assert out[1].startswith("tool message for call_1 with")
    assert out[2].split(": ")[1] in {"positive", "negative", "neutral", "mixed"}
    assert out[3:] == ["entity: Mercedes PER 11-19", "entity: Dan PER 24-27"]


@pytest.mark.parametrize("name", ["agent_pydantic_ai.py", "agent_openai_agents.py"])
def test_an_agent_calls_the_tool_and_answers_from_it(name, capsys):
    out = run_example(name, capsys)
    assert out == ["tool calls: ['analyze_text']", "answer: The review praises Mercedes and Dan."]
