"""Shared plumbing of the network benchmarks (overhead, rate_fidelity, tail, hidden_cap).

- :class:`SimProcess`: the simulator in its own process (``_simserver.py``), pinned to core 0 when ``taskset``
  exists and the machine has two cores or more; its ``/stats`` and its CPU time.
- :class:`Contender`: one client program (``_contenders.py``) in its own process, pinned to core 1; it sets up,
  prints ``READY``, waits for ``GO`` on stdin (so parallel contenders start together and set-up is not timed), runs,
  and prints one JSON line with its result.
- The workloads every contender sends (the same messages, built with :func:`polytask._prompts.build_messages`),
  the ideal-schedule bounds, a table printer and the ``--json`` writer.

Not a public module: the scripts import it as ``_bench`` (they put their own folder first on ``sys.path``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIM_SCRIPT = HERE / "_simserver.py"
CONTENDER_SCRIPT = HERE / "_contenders.py"
MODEL = "sim-model"

# -- pinning ---------------------------------------------------------------------------------------------------


def _pinning() -> tuple[list[str], list[str]]:
    """``taskset`` prefixes for the server and the clients ([] when taskset is missing or there is one core)."""
    if os.environ.get("POLYTASK_BENCH_NO_PIN") or not shutil.which("taskset"):
        return [], []
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return [], []
    if len(cores) < 2:
        return [], []
    return ["taskset", "-c", str(cores[0])], ["taskset", "-c", str(cores[1])]


SERVER_PIN, CLIENT_PIN = _pinning()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    from importlib import metadata

    for dist in ("polytask", "openai", "httpx2", "aiohttp", "anyio", "litellm", "aiolimiter"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "pinning": {"server": " ".join(SERVER_PIN) or None, "client": " ".join(CLIENT_PIN) or None},
        "versions": versions,
    }


# -- the simulator process -------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


class SimProcess:
    """``polytask.testing.serve`` in a child process, configured by a dict of :class:`SimulatorConfig` fields.

    Use as a context manager; ``base_url`` is set once it listens.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.base_url = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> SimProcess:
        cmd = [*SERVER_PIN, sys.executable, str(SIM_SCRIPT), json.dumps(self.config)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if "http" not in line:
            self.__exit__()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.base_url = line.strip().rsplit(" ", 1)[-1]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def stats(self) -> dict[str, Any]:
        """The simulator's ``/stats`` (received, outcomes, in_flight, max_in_flight)."""
        root = self.base_url.removesuffix("/v1")
        with urllib.request.urlopen(root + "/stats", timeout=10) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data

    def cpu_seconds(self) -> float:
        assert self._proc is not None
        return _cpu_seconds(self._proc.pid)


# -- contender processes ---------------------------------------------------------------------------------------


class Contender:
    """One contender run in a child process; ``start`` → ``wait_ready`` → ``go`` → ``result``."""

    def __init__(self, spec: dict[str, Any], base_url: str, timeout: float) -> None:
        self.name = spec.get("label", spec["contender"])
        self.spec = {**spec, "base_url": base_url}
        self.timeout = timeout
        self._proc: subprocess.Popen[str] | None = None
        self._started = 0.0

    def start(self) -> Contender:
        python = self.spec.get("python") or sys.executable  # another interpreter, for a library not installed here
        cmd = [*CLIENT_PIN, python, str(CONTENDER_SCRIPT), json.dumps(self.spec)]
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        return self

    def wait_ready(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != "READY":
            rest = line + self._proc.stdout.read()
            err = self._proc.stderr.read() if self._proc.stderr else ""
            raise RuntimeError(f"contender {self.name} failed to start: {rest.strip()[-500:]} {err.strip()[-2000:]}")

    def go(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._started = time.monotonic()
        self._proc.stdin.write("GO\n")
        self._proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        """The contender's JSON result; ``{"error": ...}`` when it crashed or ran past its timeout."""
        assert self._proc is not None
        left = max(1.0, self.timeout - (time.monotonic() - self._started))
        try:
            out, err = self._proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, err = self._proc.communicate()
            return {"error": f"timed out after {self.timeout:.0f} s (stalled?)", "stderr": err[-2000:]}
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self._proc.returncode != 0 or not lines:
            return {"error": f"exit {self._proc.returncode}", "stderr": err[-3000:]}
        data: dict[str, Any] = json.loads(lines[-1])
        return data


def run_contenders(specs: Sequence[dict[str, Any]], base_urls: Sequence[str], timeout: float) -> list[dict[str, Any]]:
    """Run the contenders side by side (``specs[i]`` against ``base_urls[i]``), all released at the same moment.

    A spec holds ``contender`` (the program, see ``_contenders.py``), ``label`` and that program's options.
    """
    contenders = [Contender(s, u, timeout).start() for s, u in zip(specs, base_urls, strict=True)]
    results: list[dict[str, Any] | None] = [None] * len(contenders)
    ready = []
    for i, c in enumerate(contenders):
        try:
            c.wait_ready()
            ready.append(i)
        except RuntimeError as error:
            results[i] = {"error": str(error)}
    for i in ready:
        contenders[i].go()
    for i in ready:
        results[i] = contenders[i].result()
    out = [r if r is not None else {"error": "no result"} for r in results]
    for spec, r in zip(specs, out, strict=True):
        r.setdefault("label", spec.get("label", spec["contender"]))
    return out


def run_one(spec: dict[str, Any], base_url: str, timeout: float) -> dict[str, Any]:
    return run_contenders([spec], [base_url], timeout)[0]


def available(module: str) -> bool:
    """Whether ``module`` can be imported by the interpreter running the contenders (this one)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- workloads -------------------------------------------------------------------------------------------------

_WORDS = (
    "the service was quick and friendly but the room felt small and a little noisy at night while breakfast "
    "offered fresh bread good coffee and plenty of fruit staff answered every question with patience location "
    "close to the station made trips easy though parking cost more than expected overall we would come back"
).split()


def overhead_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct short one-sentence documents (about 70 characters each)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(9))
        out.append(f"Review {i}: {words}.")
    return out


def fidelity_prompts(n: int, seed: int = 0, low: int = 100, high: int = 2000) -> list[str]:
    """``n`` texts of uniformly random length in [low, high] characters, no sentence punctuation."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(low, high)
        parts = [f"item {i}"]
        size = len(parts[0])
        while size < length:
            word = rng.choice(_WORDS)
            parts.append(word)
            size += len(word) + 1
        out.append(" ".join(parts)[:length].rstrip() or "x")
    return out


def request_charges(texts: Sequence[str], max_tokens: int) -> list[int]:
    """Tokens the simulator charges each call: its prompt estimate of polytask's messages + ``max_tokens``.

    Uses the estimate the simulator itself imports (``polytask.testing.simulator.estimate_tokens``), on the
    messages every contender sends (``build_messages(Sentiment(), text)``).
    """
    from polytask import Sentiment
    from polytask._prompts import build_messages
    from polytask.testing import simulator

    task = Sentiment()
    return [simulator.estimate_tokens(build_messages(task, t)) + max_tokens for t in texts]


# -- bounds ----------------------------------------------------------------------------------------------------


def latency_draws(n: int, latency: float, sigma: float, seed: int) -> list[float]:
    """The simulator's first ``n`` latency draws (one per admitted call, in admission order)."""
    rng = random.Random(seed + 1)
    return [latency * math.exp(sigma * rng.gauss(0.0, 1.0)) if latency > 0 else 0.0 for _ in range(n)]


def ideal_rate_schedule(
    charges: Sequence[int], rpm: float | None, tpm: float | None, latencies: Sequence[float]
) -> dict[str, float]:
    """The best makespan the server's buckets allow (both start full, refill continuously at limit / 60 s).

    An ideal client sends call k (in order) at the first instant both buckets hold its charge (1 request,
    ``charges[k]`` tokens); the server gives the k-th admitted call the k-th latency draw. Returns the last
    admission time, the makespan ``max_k(t_k + latency_k)``, the order-free lower bound on the last admission,
    ``max((N - rpm) / (rpm / 60), (sum(charges) - tpm) / (tpm / 60))``, and ``finish_times``: every call's
    ``t_k + latency_k``, sorted (entry j-1 is the earliest an ideal client can have j answers).
    """
    t = 0.0
    req = float(rpm) if rpm else math.inf
    tok = float(tpm) if tpm else math.inf
    rr = rpm / 60.0 if rpm else math.inf
    tr = tpm / 60.0 if tpm else math.inf
    at = 0.0
    makespan = 0.0
    finish: list[float] = []
    for c, lat in zip(charges, latencies, strict=True):
        wait = 0.0
        if rpm and req < 1:
            wait = max(wait, (1 - req) / rr)
        if tpm and tok < c:
            wait = max(wait, (c - tok) / tr)
        t += wait
        if rpm:
            req = min(float(rpm), req + (t - at) * rr) - 1
        if tpm:
            tok = min(float(tpm), tok + (t - at) * tr) - c
        at = t
        makespan = max(makespan, t + lat)
        finish.append(t + lat)
    lower = 0.0
    if rpm:
        lower = max(lower, (len(charges) - rpm) / rr)
    if tpm:
        lower = max(lower, (sum(charges) - tpm) / tr)
    return {
        "last_admission_s": t,
        "makespan_s": makespan,
        "order_free_last_admission_s": lower,
        "finish_times": sorted(finish),
    }


def fault_draws(n_ok: int, config: dict[str, Any]) -> list[tuple[str | None, float]]:
    """The simulator's (fault, latency) draws for the requests needed to get ``n_ok`` answers without a fault.

    Valid for a simulator with no RPM/TPM limits and no injected 429s: then every request draws one fault number
    and one latency, in arrival order, whoever sends it.
    """
    from polytask.testing import FAULT_KINDS

    rates = config.get("faults", {})
    seed = config.get("seed", 0)
    fault_rng = random.Random(seed)
    lat_rng = random.Random(seed + 1)
    latency, sigma = config.get("latency", 0.0), config.get("latency_sigma", 0.0)
    out: list[tuple[str | None, float]] = []
    ok = 0
    while ok < n_ok:
        draw = fault_rng.random()
        acc, fault = 0.0, None
        for kind in FAULT_KINDS:
            rate = rates.get(kind, 0.0)
            acc += rate
            if rate > 0 and draw < acc:
                fault = kind
                break
        lat = latency * math.exp(sigma * lat_rng.gauss(0.0, 1.0)) if latency > 0 else 0.0
        out.append((fault, lat))
        ok += fault is None
    return out


def ideal_concurrency_schedule(draws: Sequence[tuple[str | None, float]], n_calls: int, slots: int) -> float:
    """Makespan of an ideal client with ``slots`` calls in flight, no overhead and no backoff.

    Request k (in sending order) gets draw k; a faulted call is re-sent at once (to the back of the queue).
    """
    import heapq

    pending = n_calls
    in_flight: list[tuple[float, bool]] = []  # (finish time, faulted)
    t = 0.0
    k = 0
    while pending or in_flight:
        while pending and len(in_flight) < slots and k < len(draws):
            fault, lat = draws[k]
            k += 1
            pending -= 1
            heapq.heappush(in_flight, (t + lat, fault is not None))
        if not in_flight:
            break
        t, faulted = heapq.heappop(in_flight)
        if faulted:
            pending += 1
    return t


# -- output ----------------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(cells[0], widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in cells[1:]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    sys.stdout.flush()


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def median(values: Sequence[float]) -> float:
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
