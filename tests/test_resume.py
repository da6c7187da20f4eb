"""``polytask run -o FILE`` resumes: a rerun of the same command after any death finishes the job without paying
twice for what was finished, with one line per input line in input order (issue 11)."""

import json

import polytask as pt
from cli_helpers import own_cache_dir, run_cli, runner, summary_value  # noqa: F401 (the fixture)
from polytask.backends.function import FunctionBackend
from polytask.cli import app
from polytask.cli._journal import Journal, redo


def sentiment_of(request):
    """The answer of a sentiment call: what the sentence says, so a wrong document's answer would show."""
    sentence = request.messages[-1]["content"]
    return {"label": "positive", "score": 0.8} if "good" in sentence else {"label": "neutral", "score": 0.0}


class Server:
    """A FunctionBackend maker that answers ``budget`` calls, then says the quota is spent (a stop, exit 2)."""

    def __init__(self, budget: float = float("inf")) -> None:
        self.budget = budget
        self.calls = 0

    def __call__(self, *args, **kwargs):
        def answer(request):
            self.calls += 1
            if self.calls > self.budget:
                raise pt.QuotaExceededError("You exceeded your current quota", status_code=429)
            return sentiment_of(request)

        return FunctionBackend(answer, name="fn-server")


def write_input(path, n):
    path.write_text(
        "".join(f'{{"id": "d{i}", "text": "Doc {i} is {"good" if i % 3 else "here"}."}}\n' for i in range(n))
    )


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_stopped_by_its_quota_resumes_paying_only_for_what_was_left(tmp_path, monkeypatch):
    import polytask.cli._options as options

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 40)
    first = Server(budget=15)
    monkeypatch.setattr(options, "make_backend", first)
    stopped = run_cli(source, "-o", out, "-t", "sentiment", "--concurrency", "1")
    assert stopped.exit_code == 2 and "rerun the same command" in stopped.output
    assert [r["id"] for r in records(out)] == [f"d{i}" for i in range(40)]  # every line, saying why
    partial = tmp_path / ".out.jsonl.partial"
    assert partial.exists()  # kept for the rerun

    second = Server()
    monkeypatch.setattr(options, "make_backend", second)
    resumed = run_cli(source, "-o", out, "-t", "sentiment", "--concurrency", "1")
    assert resumed.exit_code == 0, resumed.output
    assert second.calls == 40 - 15  # the 15 answered calls are not paid again
    assert summary_value(resumed.output, "documents finished by an earlier run") == "15"
    lines = records(out)
    assert [r["id"] for r in lines] == [f"d{i}" for i in range(40)] and not any(r["partial"] for r in lines)
    labels = [r["pairs"][0]["answer"]["label"] for r in lines]  # each line is its own document's answer
    assert labels == ["positive" if i % 3 else "neutral" for i in range(40)]
    assert not partial.exists()

    again = Server()  # the job is done: the same command once more costs nothing
    monkeypatch.setattr(options, "make_backend", again)
    assert run_cli(source, "-o", out, "-t", "sentiment").exit_code == 0 and again.calls == 0
    assert [r["results"] for r in records(out)] == [r["results"] for r in lines]


def test_a_torn_last_line_is_dropped_and_its_document_redone(tmp_path, monkeypatch):
    import polytask.cli._options as options

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 12)
    monkeypatch.setattr(options, "make_backend", Server(budget=6))
    assert run_cli(source, "-o", out, "-t", "sentiment", "--concurrency", "1", "--no-cache").exit_code == 2
    partial = tmp_path / ".out.jsonl.partial"
    header, *lines = partial.read_bytes().splitlines(keepends=True)
    finished = [json.loads(line) for line in lines if not redo(json.loads(line))]
    assert len(finished) == 6
    # the process died while writing the sixth document: only the first half of its line reached the disk
    partial.write_bytes(header + b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])

    server = Server()
    monkeypatch.setattr(options, "make_backend", server)
    result = run_cli(source, "-o", out, "-t", "sentiment", "--concurrency", "1", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "cut off" in result.output and server.calls == 12 - 5
    assert [r["id"] for r in records(out)] == [f"d{i}" for i in range(12)]  # none lost, none twice


def test_another_job_on_the_same_output_is_refused_until_restart(tmp_path, monkeypatch):
    import polytask.cli._options as options

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 8)
    monkeypatch.setattr(options, "make_backend", Server(budget=3))
    assert run_cli(source, "-o", out, "-t", "sentiment", "--concurrency", "1").exit_code == 2
    old_output = out.read_text()

    monkeypatch.setattr(options, "make_backend", Server())
    other_task = run_cli(source, "-o", out, "-t", "classify=a,b", "--concurrency", "1")
    assert other_task.exit_code == 2 and "different job" in other_task.output and "--restart" in other_task.output
    write_input(source, 9)  # the input changed
    changed = run_cli(source, "-o", out, "-t", "sentiment")
    assert changed.exit_code == 2 and "different job" in changed.output
    assert out.read_text() == old_output  # refused before anything was written

    server = Server()
    monkeypatch.setattr(options, "make_backend", server)
    restarted = run_cli(source, "-o", out, "-t", "sentiment", "--restart", "--no-cache")
    assert restarted.exit_code == 0 and server.calls == 9  # earlier work ignored on purpose
    assert len(records(out)) == 9 and not (tmp_path / ".out.jsonl.partial").exists()


def test_a_second_run_on_the_same_output_while_one_runs_is_refused(tmp_path, monkeypatch):
    import polytask.cli._options as options

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 3)
    monkeypatch.setattr(options, "make_backend", Server())
    from polytask.cli._journal import job_fingerprint

    running = Journal(out, job_fingerprint([pt.Sentiment()], "fn-server", source, context=0))  # holds the lock
    try:
        result = run_cli(source, "-o", out, "-t", "sentiment")
        assert result.exit_code == 2 and "another polytask run is writing" in result.output
    finally:
        running.close(remove=True)
    assert run_cli(source, "-o", out, "-t", "sentiment").exit_code == 0


def test_standard_input_resumes_and_a_changed_document_is_caught(tmp_path, monkeypatch):
    import polytask.cli._options as options

    out = tmp_path / "out.jsonl"
    text = "".join(f'{{"id": "d{i}", "text": "Doc {i} is good."}}\n' for i in range(10))

    def run_stdin(data, *args):
        argv = ["run", "-", "-o", str(out), "-t", "sentiment", "--concurrency", "1", "--no-progress", *args]
        return runner.invoke(app, argv, input=data, catch_exceptions=False)

    monkeypatch.setattr(options, "make_backend", Server(budget=4))
    assert run_stdin(text).exit_code == 2
    server = Server()
    monkeypatch.setattr(options, "make_backend", server)
    renamed = text.replace('"d2"', '"other"')  # line 3 is now another document
    mismatch = run_stdin(renamed, "--no-cache")
    assert mismatch.exit_code == 2 and "input changed" in mismatch.output
    assert (tmp_path / ".out.jsonl.partial").exists()  # nothing assembled from the wrong input, nothing lost
    server.calls = 0
    resumed = run_stdin(text, "--no-cache")
    assert resumed.exit_code == 0, resumed.output
    assert server.calls == 10 - 4 and [r["id"] for r in records(out)] == [f"d{i}" for i in range(10)]


def test_which_records_a_resume_runs_again():
    ok = {"id": "a", "line": 1, "pairs": [{"error": None}], "partial": False}
    assert not redo(ok)
    invalid_answer = {"pairs": [{"error": {"type": "AnswerValidationError"}}], "partial": True}
    assert not redo(invalid_answer)  # asked twice already; a rerun would get the same answer
    assert not redo({"pairs": [{"error": {"type": "ValueError"}}]})  # a task's own code failed
    for kind in ("RunStopped", "QuotaExceededError", "ServerError", "APITimeoutError", "BudgetExceededError"):
        if hasattr(pt, kind):
            assert redo({"pairs": [{"error": {"type": kind}}]}), kind
    assert redo({"id": "b", "line": 2, "error": {"type": "RunStopped"}})  # never started
    assert redo({"id": None, "line": 3, "error": {"type": "InputError"}})  # read again from the input


def test_an_output_that_cannot_be_written_keeps_the_work_for_the_rerun(tmp_path, monkeypatch):
    import polytask.cli._options as options

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 5)
    monkeypatch.setattr(options, "make_backend", Server())

    def full_disk(self):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Journal, "assemble", full_disk)
        result = run_cli(source, "-o", out, "-t", "sentiment")
    assert result.exit_code == 2 and "No space left on device" in result.output and "rerun" in result.output
    assert not out.exists() and (tmp_path / ".out.jsonl.partial").exists()
    server = Server()
    monkeypatch.setattr(options, "make_backend", server)
    assert run_cli(source, "-o", out, "-t", "sentiment", "--no-cache").exit_code == 0
    assert server.calls == 0 and len(records(out)) == 5  # every document came from the partial file
