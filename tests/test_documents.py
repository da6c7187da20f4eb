"""The input rules shared by the Python API and the CLI (one home: ``polytask.documents``)."""

from __future__ import annotations

import json

import pytest

import polytask as pt
from polytask.documents import id_problem, surrogate_problem


@pytest.mark.parametrize("value", [None, "a", "", 0, 7, -3])
def test_ids_that_are_ids(value) -> None:
    assert id_problem(value) is None


@pytest.mark.parametrize(("value", "kind"), [(True, "bool"), (1.5, "float"), ([1], "list"), ({"a": 1}, "dict")])
def test_ids_that_are_not_name_their_type(value, kind) -> None:
    assert id_problem(value) == f"must be a string or an integer, got {kind}"


def test_a_lone_surrogate_is_named_with_its_offset_in_a_string_and_found_inside_data() -> None:
    text = json.loads('"ab\\ud800c"')
    assert surrogate_problem(text) == "holds an unpaired surrogate '\\ud800' at offset 2, which is not Unicode text"
    assert "unpaired surrogate" in (surrogate_problem({"meta": [text]}) or "")
    assert surrogate_problem("naïve 文字 🙂") is None and surrogate_problem({"a": ["b", 1]}) is None


@pytest.mark.anyio
async def test_the_python_api_refuses_what_the_rule_refuses() -> None:
    with pytest.raises(pt.InputError, match="'id' must be a string or an integer, got float"):
        async with pt.Orchestrator(pt.FunctionBackend(lambda r: "{}"), [pt.Sentiment()]) as orch:
            await orch.run([{"id": 1.5, "text": "Hello."}])
