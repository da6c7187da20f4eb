"""Smoke runs of the network benchmarks in ``benchmarks/``: each script runs end to end at a tiny size.

Not timed tests: they only prove the scripts work (simulator process, contender processes, bounds, table, JSON).
The five scripts run at once (each starts its own simulator and contender processes) to keep the total short.
Contenders whose library is not installed (litellm, aiolimiter) are skipped by the scripts themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

SMOKE = {
    "overhead": ["--calls", "30", "--reps", "1", "--warmup", "2", "--concurrency", "8"],
    # the naive program is exercised by overhead; here the limiter paths (litellm and aiolimiter when installed)
    "rate_fidelity": [
        *("--calls", "24", "--latency", "0.02", "--concurrency", "8"),
        *("--contenders", "polytask (limits set),aiolimiter (RPM+TPM),LiteLLM Router"),
    ],
    "tail": ["--calls", "40", "--latency", "0.02", "--concurrency", "8", "--contenders", "polytask"],
    "hidden_cap": ["--calls", "60", "--latency", "0.02", "--cap", "4", "--no-references"],
    "serial_server": ["--calls", "30", "--latency", "0.02", "--at-once", "2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Any]]:
    out = tmp_path_factory.mktemp("bench")
    procs = {}
    for name, args in SMOKE.items():
        cmd = [sys.executable, str(BENCH / f"{name}.py"), *args, "--json", str(out / f"{name}.json")]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        path = out / f"{name}.json"
        results[name] = (done, json.loads(path.read_text()) if path.exists() else None)
    return results


def _ok(runs: dict[str, Any], name: str, title: str) -> Any:
    done, data = runs[name]
    assert done.returncode == 0, done.stderr[-3000:]
    assert title in done.stdout, done.stdout
    assert data is not None
    assert data["benchmark"] == name
    assert {"nproc", "cpu", "versions"} <= set(data["machine"])
    return data


def test_overhead(runs: dict[str, Any]) -> None:
    data = _ok(runs, "overhead", "Overhead:")
    assert {"summary", "ratios", "runs", "targets", "config"} <= set(data)
    labels = {"raw aiohttp", "raw httpx2", "polytask", "AsyncOpenAI (httpx2)", "AsyncOpenAI (aiohttp)"}
    assert labels <= set(data["summary"])
    for label, s in data["summary"].items():
        assert not s["errors"], (label, s["errors"])
        assert s["ok_per_s"] > 0 and s["cpu_ms_per_call"] > 0
    assert {"polytask/raw_aiohttp", "polytask/naive"} <= set(data["ratios"])


def test_rate_fidelity(runs: dict[str, Any]) -> None:
    data = _ok(runs, "rate_fidelity", "Rate fidelity:")
    assert {"bound", "results", "skipped", "config"} <= set(data)
    assert data["bound"]["makespan_s"] > 0
    seen = {r["label"] for r in data["results"]} | set(data["skipped"])
    assert seen == {"polytask (limits set)", "aiolimiter (RPM+TPM)", "LiteLLM Router"}
    for r in data["results"]:
        assert "error" not in r, r
        assert {"ok", "failed", "wall_s", "fraction_of_bound", "http_429", "share_429"} <= set(r)


def test_tail(runs: dict[str, Any]) -> None:
    data = _ok(runs, "tail", "Tail:")
    assert {"lower_bound_s", "ideal_client_s", "requests_needed"} <= set(data["bound"])
    assert data["bound"]["lower_bound_s"] <= data["bound"]["ideal_client_s"]
    labels = {r["label"] for r in data["results"]}
    assert "polytask" in labels
    for r in data["results"]:
        assert "error" not in r, r
        assert {"x_bound", "x_ideal", "wall_s"} <= set(r)


def test_hidden_cap(runs: dict[str, Any]) -> None:
    data = _ok(runs, "hidden_cap", "Hidden cap:")
    assert data["ideal"]["makespan_s"] > 0
    assert data["results"]
    for r in data["results"]:
        assert "error" not in r, r
        assert {"ok", "http_503", "of_ideal", "server_max_in_flight"} <= set(r)
    assert data["results"][0]["server_max_in_flight"] >= 1


def test_serial_server(runs: dict[str, Any]) -> None:
    data = _ok(runs, "serial_server", "Serial server:")
    labels = [(r["at_once"], r["label"]) for r in data["results"]]
    assert labels == [(2, "polytask (adaptive)"), (2, "polytask (fixed 64)")]
    for r in data["results"]:
        assert "error" not in r, r
        assert r["ok"] == 30 and r["timeouts"] == 0 and r["http_429"] == r["http_503"] == 0
        assert {"of_capacity", "server_max_queued", "server_queue_median_2nd_half", "concurrency"} <= set(r)
        assert r["server_max_queued"] >= 1  # the server queued calls past the 2 it works on


def test_ideal_schedules() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import _bench
    finally:
        sys.path.remove(str(BENCH))
    # RPM 60 (1 per second), bucket of 60 full at the start: 61 calls → the 61st waits 1 s.
    ideal = _bench.ideal_rate_schedule([1] * 61, 60, None, [0.0] * 61)
    assert ideal["last_admission_s"] == pytest.approx(1.0)
    # TPM 600 (10 per second): three calls of 400 → 0 s, 20 s (200 left + 20 s × 10), 60 s (0 left + 40 s × 10).
    ideal = _bench.ideal_rate_schedule([400, 400, 400], None, 600, [0.5, 0.5, 0.5])
    assert ideal["last_admission_s"] == pytest.approx(60.0)
    assert ideal["makespan_s"] == pytest.approx(60.5)
    assert ideal["order_free_last_admission_s"] == pytest.approx(60.0)
    assert ideal["finish_times"] == pytest.approx([0.5, 20.5, 60.5])
    # Two slots, latencies 1, 1, 2 and one fault (re-sent at once): list scheduling.
    draws = [(None, 1.0), ("server_error", 1.0), (None, 2.0), (None, 1.0)]
    assert _bench.ideal_concurrency_schedule(draws, 3, 2) == pytest.approx(3.0)


def test_pause_wave_and_agent_turns_run_in_process() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import agent_calls
        import pause_wave

        rows = pause_wave.main(["--calls", "20", "--rpm", "6000", "--latency", "0.01"])
        assert len(rows) == 8 and all(row[1] + row[2] == 20 for row in rows)  # every call answered or failed
        # (the count of 429s after the pause is the benchmark's figure, not a smoke check: at this tiny size calls sent
        # before the pause can arrive after it; tests/test_rate_limit_waves.py checks it by the time each call was sent)
        shared, own = agent_calls.turns(10, 6000)
        assert shared[:3] == ["one shared orchestrator", 10, 0] and own[1] == 10
    finally:
        sys.path.remove(str(BENCH))
