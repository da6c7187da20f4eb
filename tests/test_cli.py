"""``polytask run`` end to end in-process, against the built-in simulator."""

import json
from pathlib import Path

import pytest

import polytask as pt
from cli_helpers import own_cache_dir, run_cli, runner, summary_value  # noqa: F401 (the fixture)
from polytask.cli import app, parse_task

DATA = Path(__file__).parent / "data"


def partial_records(path):
    """The document records of a partial file (its first line names the job)."""
    header, *lines = path.read_text().splitlines()
    assert json.loads(header)["format"] == "polytask-partial/1"
    return [json.loads(line) for line in lines]


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
    assert "lines written" in result.output


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
    assert lines[0]["line"] == 1 and lines[3]["id"] == "d" and lines[3]["line"] == 5
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
        "-t",
        "classify-multi=urgent,polite",
    )
    assert result.exit_code == 0, result.output
    line = json.loads(out.read_text())
    assert line["id"] == "x1" and set(line["results"]["classify"]["shares"]) == {"billing", "delivery"}
    assert set(line["results"]["classify-multi"]["shares"]) == {"urgent", "polite"}


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


def test_output_equal_to_input_is_refused_and_the_input_kept(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "Keep me."}\n')
    result = run_cli(source, "-o", source, "--simulate")
    assert result.exit_code == 2 and "is the input file" in result.output
    assert source.read_text() == '{"text": "Keep me."}\n'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rpm", "0"], "--rpm must be greater than 0"),
        (["--tpm", "-1"], "--tpm must be greater than 0"),
        (["--concurrency", "0"], "--concurrency must be greater than 0"),
        (["--attempts", "0"], "--attempts must be greater than 0"),
        (["--timeout", "0"], "--timeout must be greater than 0"),
        (["--simulate-faults", "2"], "--simulate-faults is a share"),
        (["--rate-window", "0"], "--rate-window must be greater than 0"),
        (["--rate-window", "61"], "--rate-window is the seconds an RPM limit is enforced over, in (0, 60]"),
    ],
)
def test_impossible_numbers_are_usage_errors_that_keep_the_old_output(tmp_path, args, message):
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    result = run_cli(DATA / "oracle_sample.jsonl", "-o", out, "--simulate", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert out.read_text() == "previous results\n"


def test_missing_output_folder_is_a_clear_error(tmp_path):
    result = run_cli(DATA / "oracle_sample.jsonl", "-o", tmp_path / "no" / "such" / "out.jsonl", "--simulate")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_missing_text_field_is_named(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "txt": "typo"}\n')
    result = run_cli(source, "-o", tmp_path / "o.jsonl", "--simulate", "-t", "sentiment")
    assert result.exit_code == 1 and "line 1: field 'text' is missing" in result.output


def test_insufficient_quota_stops_and_still_writes_every_line(tmp_path, monkeypatch):
    import polytask.cli._options as cli
    from polytask.testing import SimulatorConfig

    monkeypatch.setattr(cli, "simulator_config", lambda *a: SimulatorConfig(faults={"insufficient_quota": 1.0}))
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "d{i}", "text": "Doc {i}. Two sentences."}}\n' for i in range(300)))
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--concurrency", "2")
    assert result.exit_code == 2 and "stopped:" in result.output and "quota" in result.output.lower()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"d{i}" for i in range(300)]  # every input line has its output line
    assert any(r.get("error", {}).get("type") == "RunStopped" for r in lines)  # never started
    assert any(r.get("partial") for r in lines)  # taken in, then stopped


def test_awkward_input_lines_each_get_a_clear_error_and_keep_the_rest(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        b'\xef\xbb\xbf{"id": "bom", "text": "A byte order mark first.", "line": "user field"}\n'
        b'{"id": "sur", "text": "a b. c\\ud800d."}\n'
        b'{"id": "latin1", "text": "caf\xe9"}\n'
        b'{"id": null, "text": "No id."}\n'
        b'{"id": {"x": 1}, "text": "Odd id."}\n'
        b"\xc2\xa0\n"
        b'{"id": 7, "text": "Last."}\n'
    )
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment")
    assert result.exit_code == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 7  # one output line per input line, in order
    assert lines[0]["id"] == "bom" and "results" in lines[0] and lines[0]["metadata"] == {"line": "user field"}
    assert lines[0]["line"] == 1
    assert lines[1]["line"] == 2 and "unpaired surrogate" in lines[1]["error"]["message"]
    assert "line 3: not UTF-8 text (byte 0xe9" in lines[2]["error"]["message"]
    assert lines[3]["id"] == "4" and "results" in lines[3]  # null id: the line number, as for a missing one
    assert "field 'id' must be a string or an integer" in lines[4]["error"]["message"]
    assert lines[5]["line"] == 6 and "invalid JSON" in lines[5]["error"]["message"]
    assert lines[6]["id"] == "7" and "results" in lines[6]
    assert "invalid input lines" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "classify=a,a"], "differ only in"),
        (["-t", "sentiment", "-t", "sentiment"], "unique"),
        (["--simulate-oracle", "/nonexistent/gold.jsonl"], "does not exist"),
        (["--timeout", "inf"], "finite"),
        (["--rpm", "nan"], "finite"),
        (["--backend", "local", "--rpm", "100", "--simulate"], "--rpm, --simulate do not apply to --backend local"),
    ],
)
def test_settings_that_cannot_work_exit_2_without_a_traceback_or_files(tmp_path, args, message):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "text": "Fine."}\n')
    result = run_cli(source, "-o", tmp_path / "out.jsonl", "--simulate", *args)
    assert result.exit_code == 2 and "error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_output_that_is_a_folder_is_refused_before_the_run(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "text": "Fine."}\n')
    (tmp_path / "adir").mkdir()
    result = run_cli(source, "-o", tmp_path / "adir", "--simulate")
    assert result.exit_code == 2 and "is a folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "in.jsonl"]


def test_interrupted_run_keeps_finished_documents_and_says_where(tmp_path, monkeypatch):
    import polytask.cli._jsonl as cli

    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "d{i}", "text": "Doc {i}."}}\n' for i in range(20)))
    real = cli.result_record
    seen = []

    def interrupt_after_five(result):  # Ctrl-C arrives while the sixth finished document is handled
        seen.append(result.id)
        if len(seen) == 6:
            raise KeyboardInterrupt
        return real(result)

    monkeypatch.setattr(cli, "result_record", interrupt_after_five)
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--concurrency", "1")
    assert result.exit_code == 130 and "interrupted:" in result.output
    assert not out.exists()
    (kept,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert kept.name in result.output.replace("\n", "") and "rerun the same command" in result.output
    assert summary_value(result.output, "lines written") == "5"  # the summary, on Ctrl-C too
    assert "5 finished document(s) kept" in " ".join(result.output.split())  # counted once, not twice
    lines = partial_records(kept)
    assert len(lines) == 5 and all("results" in r for r in lines)

    monkeypatch.setattr(cli, "result_record", real)  # the same command again: it resumes
    again = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--concurrency", "1")
    assert again.exit_code == 0, again.output
    assert summary_value(again.output, "documents finished by an earlier run") == "5"
    # the sixth document's answer reached the cache before the interruption: 14 calls are left, not 15
    assert summary_value(again.output, "requests").split()[0] == "14"
    assert summary_value(again.output, "answers from the cache") == "1"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"d{i}" for i in range(20)]  # every line once, in input order
    assert records[:5] == lines  # the earlier run's records, as they were
    assert not kept.exists()  # the output is complete: the partial file has done its job


def test_surrogate_id_reserved_fields_and_a_bom_before_a_blank_line(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        b"\xef\xbb\xbf\n"
        b'{"id": "\\ud800", "text": "Good."}\n'
        b'{"id": "r", "text": "Good.", "_polytask_seq": 1}\n'
        b'{"id": "ok", "text": "Good."}'  # no newline at the end
    )
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in lines] == [2, 3, 4]
    assert lines[0]["id"] is None and "unpaired surrogate" in lines[0]["error"]["message"]
    assert "reserved: _polytask_seq" in lines[1]["error"]["message"]
    assert lines[2]["id"] == "ok" and "results" in lines[2]


def test_a_clean_file_with_a_bom_and_a_blank_line_exits_0(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'\xef\xbb\xbf\n{"id": "a", "text": "Good day."}\n\n')
    result = run_cli(source, "-o", tmp_path / "out.jsonl", "--simulate", "-t", "sentiment")
    assert result.exit_code == 0, result.output


def test_input_read_from_a_pipe(tmp_path):
    import os
    import threading

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "w") as f:
            f.write('{"id": "a", "text": "One."}\n{"id": "b", "text": "Two."}\n')

    threading.Thread(target=feed, daemon=True).start()
    out = tmp_path / "out.jsonl"
    result = run_cli(fifo, "-o", out, "--simulate", "-t", "sentiment")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]


def test_output_dash_writes_the_lines_to_stdout_and_nothing_else(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "text": "One. Two."}\nnot json\n{"id": "b", "text": "Three."}\n')
    result = run_cli(source, "-o", "-", "--simulate", "-t", "sentiment")
    assert result.exit_code == 1  # the invalid line
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in lines] == [1, 2, 3] and [r["id"] for r in lines] == ["a", None, "b"]
    assert lines[0]["results"]["sentiment"]["coverage"] == 1.0 and "error" in lines[1]
    assert "lines written" in result.stderr
    assert not list(Path.cwd().glob(".-.*.partial")) and not Path("-").exists()


def test_sigterm_keeps_finished_documents_like_ctrl_c_and_exits_143(tmp_path, monkeypatch):
    import os
    import signal

    import polytask.cli._jsonl as cli

    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "d{i}", "text": "Doc {i}."}}\n' for i in range(20)))
    real = cli.result_record
    seen = []

    def terminate_after_five(result):  # `kill` arrives while the sixth finished document is handled
        seen.append(result.id)
        if len(seen) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(result)

    monkeypatch.setattr(cli, "result_record", terminate_after_five)
    from polytask.cli._exits import signals

    monkeypatch.setattr(signals, "terminated", False)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--concurrency", "1")
    assert result.exit_code == 143 and "terminated:" in result.output
    (kept,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    lines = partial_records(kept)
    assert 5 <= len(lines) < 20 and all("results" in r for r in lines)  # stops at the event loop's next turn
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_input_dash_is_stdin_and_dot_dash_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        ["run", "-", "-o", "./-", "--simulate", "-t", "sentiment", "--no-progress"],
        input='{"id": "a", "text": "One."}\n\n{"id": "b", "text": "Two.", "_polytask_x": 1}\n',
        catch_exceptions=False,
    )
    assert result.exit_code == 1, result.output  # the reserved field
    lines = [json.loads(line) for line in (tmp_path / "-").read_text().splitlines()]
    assert [(r["id"], r["line"]) for r in lines] == [("a", 1), ("b", 3)]  # the blank line 2 is skipped
    assert "reserved" in lines[1]["error"]["message"]  # and the readable id is kept


@pytest.mark.parametrize(("max_outage", "code"), [("300", 2), ("0", 1)])
def test_a_server_down_for_max_outage_exits_2_and_0_never_stops(tmp_path, monkeypatch, max_outage, code):
    import polytask.cli._options as cli
    from polytask.backends.function import FunctionBackend
    from polytask.concurrency import CircuitBreaker

    def dead(request):
        raise pt.ServerError("boom", status_code=500)

    monkeypatch.setattr(cli, "make_backend", lambda *args, **kwargs: FunctionBackend(dead))
    monkeypatch.setattr(CircuitBreaker, "outage", lambda self: 1000.0)  # down for 1,000 s already
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "d{i}", "text": "Doc {i}."}}\n' for i in range(5)))
    out = tmp_path / "out.jsonl"
    args = ["-t", "sentiment", "--concurrency", "1", "--attempts", "1", "--max-outage", max_outage]
    result = run_cli(source, "-o", out, *args)
    assert result.exit_code == code, result.output
    assert ("stopped:" in result.output and "failed every call" in result.output) == (code == 2)
    assert len(out.read_text().splitlines()) == 5  # every line written, stopped or not


def test_a_slow_pipe_does_not_hold_back_the_documents_already_read(tmp_path):
    # the second line is written only once the first document's result is on disk: reading the pipe must not
    # block the event loop (before, the first result waited for the second line)
    import os
    import threading

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    saw_first = threading.Event()

    def feed():
        with open(fifo, "w") as f:
            f.write('{"id": "a", "text": "One."}\n')
            f.flush()
            for _ in range(1000):  # up to 10 s
                if any(p.name.endswith(".partial") and p.read_text().count("\n") > 1 for p in tmp_path.iterdir()):
                    saw_first.set()
                    break
                threading.Event().wait(0.01)
            f.write('{"id": "b", "text": "Two."}\n')

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    result = run_cli(fifo, "-o", out, "--simulate", "-t", "sentiment")
    feeder.join()
    assert result.exit_code == 0, result.output
    assert saw_first.is_set()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]


def test_a_line_cut_off_mid_string_is_named_as_such_whatever_its_line_ending(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"id": "a", "text": "Fine."}\n{"id": "b", "text": "broken\r\n{"id": "c", "text": "cut\n')
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment")
    assert result.exit_code == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("error", {}).get("message", "")[:30] for line in lines][1:] == [
        "line 2: invalid JSON: Untermin",
        "line 3: invalid JSON: Untermin",
    ]


def test_the_same_command_twice_pays_once_and_writes_the_same_lines(tmp_path):
    source = DATA / "oracle_sample.jsonl"
    outs = [tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "three.jsonl"]
    first = run_cli(source, "-o", outs[0], "--simulate-oracle", source, "-t", "sentiment", "-t", "entities")
    second = run_cli(source, "-o", outs[1], "--simulate-oracle", source, "-t", "sentiment", "-t", "entities")
    assert first.exit_code == second.exit_code == 0
    assert summary_value(first.output, "answers from the cache") == "0"
    assert summary_value(second.output, "requests").split()[0] == "0"  # not one call the second time
    pairs_ok = summary_value(first.output, "pairs ok / failed").split(" / ")[0]
    assert summary_value(second.output, "answers from the cache") == pairs_ok

    def answers(path):  # what the documents say (not what they cost: attempts, usage and time differ)
        records = [json.loads(line) for line in path.open()]
        return [(r["id"], r["results"], [(p["task"], p["answer"], p["error"]) for p in r["pairs"]]) for r in records]

    assert answers(outs[0]) == answers(outs[1])
    third = run_cli(source, "-o", outs[2], "--simulate-oracle", source, "-t", "sentiment", "--no-cache")
    assert third.exit_code == 0 and summary_value(third.output, "answers from the cache") == "0"
    both = run_cli(source, "-o", outs[2], "--simulate", "--no-cache", "--cache", tmp_path / "c.sqlite")
    assert both.exit_code == 2 and "contradict" in both.output


def test_off_a_terminal_a_progress_line_comes_every_interval(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "d{i}", "text": "Doc {i}."}}\n' for i in range(6)))
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--simulate", "-t", "sentiment"]
    every_document = runner.invoke(app, [*argv, "--progress-every", "0"], catch_exceptions=False)
    assert every_document.exit_code == 0, every_document.output
    lines = [line for line in every_document.output.splitlines() if line.startswith("progress: ")]
    assert len(lines) == 6 + 1  # one per document, and one at the end
    assert lines[-1].startswith("progress: 6 / 6 documents (100.0%) · ") and "429s 0" in lines[-1]
    assert "ETA" in lines[0]
    quiet = runner.invoke(app, [*argv, "--no-progress"], catch_exceptions=False)
    assert "progress: " not in quiet.output and "polytask run" in quiet.output  # the summary all the same


def test_progress_lines_follow_the_clock_and_say_what_is_left():
    from polytask.cli._progress import Reporter, duration
    from polytask.orchestrator import RunStats

    now = [0.0]
    stats = RunStats(requests=40, prompt_tokens=900, completion_tokens=100, rate_limited=2, pairs_failed=1)
    reporter = Reporter(stats, total=100, done_before=20, bar=False, every=10.0, clock=lambda: now[0])
    import polytask.cli._progress as progress

    printed = []
    real = progress.err.print
    progress.err.print = lambda text, **kw: printed.append(text)
    try:
        now[0] = 5.0
        reporter.update(10)  # 5 s after the start: too soon
        now[0] = 10.0
        reporter.update(20)
        now[0] = 15.0
        reporter.update(30)  # 5 s after the last line
    finally:
        progress.err.print = real
    assert printed == [
        "progress: 40 / 100 documents (40.0%) · 4.0 req/s · 1,000 tok · 429s 2 · retries 0 · errors 1 · ETA 30s"
    ]
    assert [duration(s) for s in (0, 59.6, 61, 3600 * 3 + 125)] == ["0s", "1m00s", "1m01s", "3h02m"]


def test_a_spent_daily_quota_stops_the_run_says_when_to_resume_and_the_rerun_pays_only_the_rest(
    tmp_path, monkeypatch, simulator
):
    # every call after the first 20 meets a 429 asking to wait a day: the run stops at the first (exit 2, saying
    # when to resume) instead of failing the other 180 calls one by one against the server
    sim = simulator(daily_quota=20, latency=0.02)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-123456")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "d{i}", "text": "Doc {i}. Its sentence {i}."}}\n' for i in range(100)))
    out = tmp_path / "out.jsonl"
    args = [source, "-o", out, "--base-url", sim.base_url, "--model", "sim-model", "-t", "sentiment"]
    result = run_cli(*args, "--concurrency", "4")
    assert result.exit_code == 2, result.output
    assert "stopped: HTTP 429: the server asks to wait 86400 s (Retry-After), longer than max_retry_after=300" in (
        result.output
    )
    assert "resume after " in result.output and " UTC (rerun the same command)" in result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"d{i}" for i in range(100)]  # every input line has its output line
    answered = sum(p["error"] is None for r in lines for p in r.get("pairs", []))
    assert answered == sim.stats.outcomes["ok"] == 20  # every answer the server gave is written
    assert sim.stats.outcomes["daily_quota"] <= 4  # the first 429, and at most the 3 other calls then in flight
    assert sim.stats.received == 20 + sim.stats.outcomes["daily_quota"]

    sim.config = sim.config.model_copy(update={"daily_quota": None})  # the next day
    rerun = run_cli(*args)
    assert rerun.exit_code == 0, rerun.output
    # the 20 paid for are not paid again: whole documents from the partial file, the other answers from the cache
    from_cache = int(summary_value(rerun.output, "answers from the cache"))
    assert from_cache + 2 * int(summary_value(rerun.output, "documents finished by an earlier run")) == 20
    assert summary_value(rerun.output, "requests").split()[0] == "180"


def test_version_and_a_busy_port_say_one_line():
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"polytask {pt.__version__}"
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["simulate", "--port", str(port)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "--port" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rpm-window", "0"], "--rpm-window must be greater than 0"),
        (["--rpm-window", "90"], "--rpm-window is the seconds an RPM limit is enforced over"),
        (["--faults", "2"], "--faults is a share of calls"),
        (["--rpm", "-5"], "--rpm must be greater than 0"),
        (["--serve-at-once", "0"], "--serve-at-once must be greater than 0"),
    ],
)
def test_simulate_refuses_impossible_numbers_in_one_line(args, message):
    result = runner.invoke(app, ["simulate", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"id": 1, "text": "One."}]\n', "holds a JSON array; polytask expects JSON Lines"),
        ("id,text\n1,One.\n", "looks like CSV"),
        ("id\ttext\n1\tOne.\n", "looks like TSV"),
    ],
)
def test_an_input_that_is_plainly_not_json_lines_is_refused_before_the_run(tmp_path, content, message):
    source, out = tmp_path / "in.data", tmp_path / "out.jsonl"
    source.write_text(content)
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment")
    assert result.exit_code == 2 and message in result.output and not out.exists()


def test_an_empty_input_says_so(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n\n")
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment")
    assert result.exit_code == 0 and "holds no documents" in result.output and out.read_text() == ""


def test_run_sync_inside_a_running_event_loop_says_to_await():
    import asyncio

    async def in_a_notebook():
        pt.run_sync(pt.FunctionBackend(lambda request: {}), [pt.Sentiment()], ["One."])

    with pytest.raises(RuntimeError, match=r"await orch\.run"):
        asyncio.run(in_a_notebook())


def test_the_bar_moves_with_pairs_and_fits_80_columns():
    import io
    import re

    from rich.console import Console

    import polytask.cli._progress as progress
    from polytask.orchestrator import RunStats

    now = [0.0]
    stats = RunStats(requests=45_678, pairs_done=45_678, rate_limited=3)
    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    real = progress.err
    progress.err = console
    try:
        reporter = progress.Reporter(stats, total=318_000, bar=True, every=None, clock=lambda: now[0])
    finally:
        progress.err = real
    now[0] = 100.0
    reporter.update(12_345)
    console.print(reporter.bar.get_renderable())
    (line,) = [re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", x) for x in console.file.getvalue().splitlines() if x.strip()]
    assert len(line) <= 80 and "12345/318000" in line and "45,678 pairs" in line and "…" not in line


def test_structured_outputs_and_the_cap_field_can_be_fixed_from_the_cli(tmp_path, monkeypatch):
    import polytask.backends.openai as openai_backend

    made = []

    class Spy(openai_backend.OpenAIBackend):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(openai_backend, "OpenAIBackend", Spy)
    out = tmp_path / "out.jsonl"
    args = [DATA / "oracle_sample.jsonl", "-o", out, "--simulate", "-t", "sentiment"]
    fixed = run_cli(*args, "--structured-outputs", "json_object", "--max-tokens-param", "max_tokens")
    assert fixed.exit_code == 0, fixed.output
    assert [(b.mode, b.max_tokens_field) for b in made] == [("json_object", "max_tokens")]
    bad = run_cli(*args, "--max-tokens-param", "max_new_tokens")
    assert (
        bad.exit_code == 2 and "--max-tokens-param must be one of auto, max_completion_tokens, max_tokens" in bad.output
    )
    local = run_cli(*args[:3], "--backend", "local", "--structured-outputs", "none")
    assert local.exit_code == 2 and "--structured-outputs" in local.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "{source}"], "--trace {source} is the same file as the input"),
        (["--trace", "{out}"], "--trace {out} is the same file as --output"),
        (["--cache", "{out}"], "--cache {out} is the same file as --output"),
        (["--cache", "{source}"], "--cache {source} is the same file as the input"),
    ],
)
def test_the_trace_and_the_cache_never_overwrite_the_input_or_the_output(tmp_path, args, message):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"text": "Keep me."}\n')
    out.write_text("previous results\n")
    args = [a.format(source=source, out=out) for a in args]
    result = run_cli(source, "-o", out, "--simulate", *args)
    assert result.exit_code == 2 and message.format(source=source, out=out) in result.output
    assert source.read_text() == '{"text": "Keep me."}\n' and out.read_text() == "previous results\n"
