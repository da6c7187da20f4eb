"""``polytask mcp`` (issue 15): the MCP server over stdio, driven by the official SDK's own client — tools listed,
``analyze_text`` and ``analyze_file`` called against the built-in simulator — and, in process, what its tools do with
one shared orchestrator (a stop and its resume, paths that cannot work)."""

import json
import os
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from mcp import Client, ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from typer.testing import CliRunner

import polytask as pt
from polytask.cli import app
from polytask.cli._mcp import FileJob, build_server
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
GOLD = ROOT / "examples" / "quickstart.jsonl"
SRC = Path(pt.__file__).resolve().parents[1]
SECRET = "sk-test-DO-NOT-ECHO-4242"


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


async def test_the_server_over_stdio_with_the_sdks_own_client(tmp_path):
    gold = [json.loads(line) for line in GOLD.read_text().splitlines()]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"id": g["id"], "text": g["text"]} for g in gold[:2]] + ["{not json"])
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "polytask", "mcp", "--simulate-oracle", str(GOLD), "--cache", str(tmp_path / "cache.sqlite")],
        env={"PYTHONPATH": str(SRC), "OPENAI_API_KEY": SECRET},
        cwd=str(tmp_path),
    )
    seen = []
    stray = []  # anything on the server's stdout that is not a protocol message

    async def on_message(message):
        if isinstance(message, Exception):
            stray.append(message)

    with (tmp_path / "stderr.txt").open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write, message_handler=on_message) as session,
        ):
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == {"analyze_text", "analyze_file"}
            text_tool = tools["analyze_text"]
            assert text_tool.input_schema["required"] == ["text"] and "id" in text_tool.input_schema["properties"]
            assert "named entities" in text_tool.description
            assert set(text_tool.output_schema["$defs"]["AnalyzeResults"]["required"]) == {"sentiment", "entities"}
            assert tools["analyze_file"].input_schema["required"] == ["input_path", "output_path"]

            # one text (the client checks the structured result against the tool's output schema itself)
            review = gold[1]["text"]  # "Great job! Mercedes and Dan are very thorough and on top of everything!"
            called = await session.call_tool("analyze_text", {"text": review, "id": "r1"})
            assert not called.is_error, called.content
            result = called.structured_content
            seen.append(json.dumps(result) + called.content[0].text)
            assert result["id"] == "r1" and result["errors"] == [] and len(result["sentences"]) == 2
            people = [(e["text"], e["label"], e["start"], e["end"]) for e in result["results"]["entities"]["entities"]]
            assert people == [("Mercedes", "PER", 11, 19), ("Dan", "PER", 24, 27)]
            assert json.loads(called.content[0].text) == result  # the same, as text, for clients without schemas

            # a file: the job `polytask run` runs, in input order, an invalid line kept in its place
            called = await session.call_tool("analyze_file", {"input_path": "in.jsonl", "output_path": str(out)})
            assert not called.is_error, called.content
            summary = called.structured_content
            seen.append(json.dumps(summary))
            assert summary["output"] == str(out) and summary["input"] == str(source)
            assert (summary["lines"], summary["complete"], summary["partial"], summary["invalid_lines"]) == (3, 2, 0, 1)
            assert summary["exit_status"] == 1 and summary["stopped"] is None  # an invalid line: as run exits 1
            assert summary["pairs_ok"] == 8 and summary["pairs_failed"] == 0  # 2 documents × 2 sentences × 2 tasks
            assert summary["requests"] == 4 and summary["prompt_tokens"] > 0  # gold[1]: analyze_text's cache
            records = [json.loads(line) for line in out.read_text().splitlines()]
            assert [r["id"] for r in records] == [gold[0]["id"], gold[1]["id"], None]
            assert records[2]["error"]["type"] == "InputError" and records[2]["line"] == 3
            assert [e["text"] for e in records[1]["results"]["entities"]["entities"]] == ["Mercedes", "Dan"]
            assert not (tmp_path / ".out.jsonl.partial").exists()

            called = await session.call_tool("analyze_file", {"input_path": "missing.jsonl", "output_path": "o.jsonl"})
            assert (
                called.is_error and f"the input {tmp_path / 'missing.jsonl'} does not exist" in called.content[0].text
            )
            seen.append(called.content[0].text)
    assert stray == []
    seen.append((tmp_path / "stderr.txt").read_text())
    assert not any(SECRET in text for text in seen)  # the API key is never echoed, not even on stderr


def server_of(answer, tasks=None, **orchestrator):
    backend = pt.FunctionBackend(answer, name="fn")
    orch = pt.Orchestrator(backend, tasks or [pt.Sentiment()], clock=FakeClock(), **orchestrator)
    tool = pt.AnalyzeTool(orch)
    return orch, build_server(tool, FileJob(tool.tasks, "fn"))


def sentiment(request):
    return {"label": "positive", "score": 0.5}


async def call(client, name, arguments):
    result = await client.call_tool(name, arguments)
    return result.is_error, (result.content[0].text if result.is_error else result.structured_content)


async def test_every_tool_call_runs_in_the_one_orchestrator(tmp_path):
    in_flight = most = 0

    async def server(request):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await anyio.lowlevel.checkpoint()
        in_flight -= 1
        return sentiment(request)

    orch, mcp_server = server_of(server, max_concurrency=2)
    write_jsonl(tmp_path / "in.jsonl", [{"text": f"Doc {i}. Two."} for i in range(5)])
    async with orch, Client(mcp_server) as client:
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(call, client, "analyze_text", {"text": f"Turn {i}. Again."})
            paths = {"input_path": str(tmp_path / "in.jsonl"), "output_path": str(tmp_path / "out.jsonl")}
            tg.start_soon(call, client, "analyze_file", paths)
    assert orch.stats.requests == 6 * 2 + 5 * 2 and most == 2  # every call, one pool of 2 slots


async def test_a_stopped_file_job_resumes_in_the_same_server_paying_once(tmp_path):
    quota = {"left": 3}
    calls = []

    def server(request):
        calls.append(request)
        if quota["left"] <= 0:
            raise pt.QuotaExceededError("You exceeded your current quota", status_code=429)
        quota["left"] -= 1
        return sentiment(request)

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"id": f"d{i}", "text": f"Doc {i}."} for i in range(8)])
    orch, mcp_server = server_of(server, max_concurrency=1)
    arguments = {"input_path": str(source), "output_path": str(out)}
    async with orch, Client(mcp_server) as client:
        error, stopped = await call(client, "analyze_file", arguments)
        assert not error and stopped["exit_status"] == 2 and stopped["stopped"].startswith("QuotaExceededError")
        assert stopped["complete"] == 3 and stopped["lines"] == 8 and (tmp_path / ".out.jsonl.partial").exists()
        assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"d{i}" for i in range(8)]

        quota["left"] = 100
        paid = len(calls)
        error, resumed = await call(client, "analyze_file", arguments)
        assert not error and resumed["exit_status"] == 0 and resumed["stopped"] is None
        assert resumed["resumed"] == 3 and resumed["complete"] == 5 and resumed["lines"] == 8
        assert len(calls) - paid == 5  # the 3 finished documents are not asked again
        assert not (tmp_path / ".out.jsonl.partial").exists()
        assert all(not json.loads(line)["partial"] for line in out.read_text().splitlines())
        error, text = await call(client, "analyze_text", {"text": "Still serving."})
        assert not error and text["results"]["sentiment"]["label"] == "positive"


async def test_paths_and_inputs_that_cannot_work_are_named(tmp_path):
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"text": "Fine."}])
    (tmp_path / "array.jsonl").write_text('[{"text": "a"}]\n')
    orch, mcp_server = server_of(sentiment)
    async with orch, Client(mcp_server) as client:
        for arguments, message in [
            ({"input_path": "-", "output_path": "o.jsonl"}, "carry the MCP protocol"),
            ({"input_path": str(source), "output_path": "-"}, "carry the MCP protocol"),
            ({"input_path": str(tmp_path), "output_path": "o.jsonl"}, "is not a file"),
            ({"input_path": str(source), "output_path": str(source)}, "is the input file"),
            ({"input_path": str(source), "output_path": str(tmp_path)}, "is a folder"),
            ({"input_path": str(source), "output_path": str(tmp_path / "no" / "o.jsonl")}, "does not exist"),
            ({"input_path": str(tmp_path / "array.jsonl"), "output_path": str(tmp_path / "o.jsonl")}, "JSON array"),
        ]:
            error, text = await call(client, "analyze_file", arguments)
            assert error and message in text, (arguments, text)
        error, text = await call(client, "analyze_text", {"text": "\ud800"})
        assert error and "InputError" in text and "unpaired surrogate" in text
        assert orch.stats.requests == 0


async def test_a_partial_file_of_another_job_is_refused_until_restart(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"text": "Fine."}])
    (tmp_path / ".out.jsonl.partial").write_text('{"format": "polytask-partial/1", "job": "another"}\n')
    orch, mcp_server = server_of(sentiment)
    async with orch, Client(mcp_server) as client:
        arguments = {"input_path": str(source), "output_path": str(out)}
        error, text = await call(client, "analyze_file", arguments)
        assert error and "different job" in text
        error, summary = await call(client, "analyze_file", {**arguments, "restart": True})
        assert not error and summary["exit_status"] == 0 and out.exists()


def test_settings_that_cannot_work_exit_2_before_serving(monkeypatch, tmp_path):
    runner = CliRunner()
    for args, message in [
        (["--rpm", "0"], "--rpm must be greater than 0"),
        (["--deadline", "-1"], "--deadline must be greater than 0"),
        (["-t", "nope"], "unknown task"),
        (["--simulate-oracle", str(tmp_path / "none.jsonl")], "does not exist"),
        (["--backend", "local", "--simulate"], "--simulate does not apply to --backend local"),
    ]:
        result = runner.invoke(app, ["mcp", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    for module in ("mcp", "mcp.server", "mcp.server.mcpserver"):
        monkeypatch.setitem(sys.modules, module, None)  # as if the SDK were not installed
    result = runner.invoke(app, ["mcp", "--simulate"])
    assert result.exit_code == 2 and "pip install 'polytask[mcp]'" in result.output


def test_the_command_is_listed():
    result = CliRunner().invoke(app, ["mcp", "--help"], env={**os.environ, "COLUMNS": "200"})
    assert result.exit_code == 0 and "analyze_text" in result.output and "--simulate" in result.output


async def test_a_model_cannot_overwrite_the_cache_or_an_existing_file_nor_read_one_back(tmp_path):
    source, out, cache = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    write_jsonl(source, [{"text": "Fine."}])
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "secret.tsv").write_text("name\tpassword-hunter2\n")
    orch, mcp_server = server_of(sentiment, cache=cache)
    async with orch, Client(mcp_server) as client:
        error, text = await call(client, "analyze_file", {"input_path": str(source), "output_path": str(cache)})
        assert error and "request cache" in text
        error, text = await call(
            client, "analyze_file", {"input_path": str(source), "output_path": str(tmp_path / "notes.txt")}
        )
        assert error and "overwrite=true" in text and (tmp_path / "notes.txt").read_text() == "my notes\n"
        error, text = await call(
            client, "analyze_file", {"input_path": str(tmp_path / "secret.tsv"), "output_path": str(out)}
        )
        assert error and "TSV" in text and "hunter2" not in text  # the file's content is not quoted back
        error, summary = await call(client, "analyze_file", {"input_path": str(source), "output_path": str(out)})
        assert not error and summary["exit_status"] == 0
        error, text = await call(client, "analyze_file", {"input_path": str(source), "output_path": str(out)})
        assert error and "exists" in text  # done: a second call must say overwrite
        arguments = {"input_path": str(source), "output_path": str(out), "overwrite": True}
        error, summary = await call(client, "analyze_file", arguments)
        assert not error and summary["exit_status"] == 0
