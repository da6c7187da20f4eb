"""``polytask run`` end to end in-process, against the built-in simulator."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polytask.cli import app, parse_task

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, ["run", *map(str, args), "--no-progress"], catch_exceptions=False)


def test_run_writes_one_line_per_document_in_order(tmp_path):
    out = tmp_path / "out.jsonl"
    source = DATA / "oracle_sample.jsonl"
    result = run_cli(source, "-o", out, "--simulate-oracle", source, "--task", "sentiment", "--task", "entities")
    assert result.exit_code == 0, result.output
    gold = [json.loads(line) for line in source.read_text().splitlines()]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [g["id"] for g in gold]
    for g, r in zip(gold, lines, strict=True):
        assert r["results"]["sentiment"]["coverage"] == 1.0
        if [(s["start"], s["end"]) for s in g["sentences"]] == [(s["start"], s["end"]) for s in r["sentences"]]:
            got = [(e["start"], e["end"], e["label"]) for e in r["results"]["entities"]["entities"]]
            assert got == sorted((e["start"], e["end"], e["label"]) for e in g["entities"])
    assert "documents written" in result.output


def test_invalid_lines_keep_their_place_and_fail_the_exit_status(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"id": "a", "text": "Fine."}\nnot json\n\n{"id": "c", "body": "wrong field"}\n'
        '{"id": "d", "text": "Also fine."}\n'
    )
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment")
    assert result.exit_code == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4
    assert lines[0]["id"] == "a" and "results" in lines[0]
    assert lines[1]["line"] == 2 and "invalid JSON" in lines[1]["error"]["message"]
    assert lines[2]["id"] == "c" and "field 'text'" in lines[2]["error"]["message"]
    assert lines[3]["id"] == "d" and lines[3]["metadata"]["line"] == 5
    assert "line 2" in result.output


def test_text_and_id_fields_and_classify(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"key": "x1", "body": "My invoice is wrong. The parcel is late."}\n')
    out = tmp_path / "out.jsonl"
    result = run_cli(
        source,
        "-o",
        out,
        "--simulate",
        "--text-field",
        "body",
        "--id-field",
        "key",
        "-t",
        "classify=billing,delivery",
    )
    assert result.exit_code == 0, result.output
    line = json.loads(out.read_text())
    assert line["id"] == "x1" and set(line["results"]["classify"]["shares"]) == {"billing", "delivery"}


def test_failed_documents_give_a_nonzero_exit(tmp_path, monkeypatch):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "One."}\n')
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate-faults", "1.0", "--attempts", "1", "-t", "sentiment")
    assert result.exit_code == 1
    assert json.loads(out.read_text())["partial"] is True
    result = run_cli(
        source, "-o", out, "--simulate-faults", "1.0", "--attempts", "1", "-t", "sentiment", "--allow-partial"
    )
    assert result.exit_code == 0 and json.loads(out.read_text())["partial"] is True


def test_unknown_task_is_a_usage_error():
    with pytest.raises(Exception, match="unknown task"):
        parse_task("summarize")
    result = runner.invoke(app, ["run", str(DATA / "oracle_sample.jsonl"), "-o", "/dev/null", "-t", "nope"])
    assert result.exit_code == 2


def test_missing_api_key_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    result = run_cli(DATA / "oracle_sample.jsonl", "-o", tmp_path / "o.jsonl")
    assert result.exit_code == 2 and "OPENAI_API_KEY" in result.output
