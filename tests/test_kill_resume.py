"""A real ``polytask run`` process killed with SIGKILL mid-job, then the same command again (issue 11): no line lost,
none duplicated, input order kept, and the only calls paid twice are those in flight at the death.

The benchmark ``benchmarks/kill_resume.py`` does the same at five points of a 1,000-document job."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polytask.testing import SimulatorConfig, run_in_thread

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_kill_9_mid_run_then_the_same_command_finishes_the_job_paying_only_for_what_was_in_flight(tmp_path):
    source, out, cache = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    partial = tmp_path / ".out.jsonl.partial"
    n, concurrency = 60, 4
    source.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "text": f"Order {i} was late. Order {i} was fine."}) + "\n" for i in range(n)
        )
    )
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-kill", "PYTHONPATH": str(SRC)}
    env.pop("POLYTASK_CACHE_DIR", None)
    with run_in_thread(SimulatorConfig(latency=0.02)) as sim:
        command = [
            sys.executable, "-m", "polytask", "run", str(source), "-o", str(out), "-t", "sentiment",
            "--base-url", sim.base_url, "--model", "sim-model", "--concurrency", str(concurrency),
            "--cache", str(cache), "--no-progress",
        ]  # fmt: skip
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # until 15 documents are finished
            if partial.exists() and partial.read_bytes().count(b"\n") > 15:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        while sim.stats.in_flight:  # the killed client's calls still end at the server
            time.sleep(0.005)
        sent_by_the_killed_run = sim.stats.received
        with sqlite3.connect(cache) as db:
            stored = db.execute("SELECT count(*) FROM answers").fetchone()[0]
        in_flight = sent_by_the_killed_run - stored  # sent, the answer not kept when it died
        assert 0 <= in_flight <= concurrency
        assert not out.exists()

        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        ids = [json.loads(line)["id"] for line in out.open()]
        assert ids == [f"d{i}" for i in range(n)]  # none lost, none twice, in input order
        assert not partial.exists()
        assert sim.stats.received - 2 * n <= in_flight  # 2 sentences each: the rest was paid once
