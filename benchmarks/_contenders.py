"""The client programs the benchmarks compare, each run in its own process: ``python _contenders.py '<spec JSON>'``.

Protocol (driven by ``_bench.Contender``): set up (imports, client, warm-up calls), print ``READY``, wait for a line
on stdin, run every call, print one JSON line with the result. Timing and CPU time (``time.process_time``, the
whole process) cover only the run after ``GO``.

Every contender sends the same requests: the messages ``polytask._prompts.build_messages(Sentiment(), text)``, a
strict ``json_schema`` response format, ``temperature`` 0 and ``max_completion_tokens``, one call per text, at most
``concurrency`` in flight. Programs (``spec["contender"]``):

    raw-httpx2    httpx2.AsyncClient posting JSON, ``concurrency`` worker coroutines, json.loads
    raw-aiohttp   aiohttp.ClientSession, the same loop (the ceiling)
    naive         openai.AsyncOpenAI + asyncio.gather + asyncio.Semaphore, answer validated with pydantic;
                  ``transport`` "httpx2" (the SDK's default) or "aiohttp" (``openai.DefaultAioHttpClient``);
                  ``max_retries`` the SDK's (default 2)
    parse         the same with ``client.chat.completions.parse(response_format=SentimentAnswer)``
    aiolimiter    naive + ``aiolimiter.AsyncLimiter`` for RPM (and TPM, weighted by the exact charge, if ``tpm``)
    litellm       ``litellm.Router`` with the deployment's rpm / tpm set, ``routing_strategy`` usage-based-routing-v2
    polytask      ``polytask.Orchestrator`` over ``OpenAIBackend`` (rpm / tpm given or None)

Spec keys: contender, label, base_url, workload ("short" | "fidelity" | "ewt": documents of examples/ewt_dev.jsonl,
polytask only), calls (documents for polytask), seed, max_tokens (None: the task's), concurrency, warmup (calls before
READY), rpm, tpm, max_retries, transport, probe (sample polytask's concurrency), profile (polytask only: write a
cProfile of the timed part to this path), tasks ("sentiment,entities": both, polytask only), orchestrator (more
Orchestrator options, e.g. {"fuse": true, "pack": 8}).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import MODEL, fidelity_prompts, overhead_sentences

from polytask import Sentence, Sentiment
from polytask._prompts import build_messages
from polytask.tasks.sentiment import SentimentAnswer

API_KEY = "sk-bench-not-a-real-key"


EWT = Path(__file__).resolve().parents[1] / "examples" / "ewt_dev.jsonl"


def _texts(spec: dict[str, Any], n: int, seed: int) -> list[str]:
    if spec.get("workload", "short") == "fidelity":
        return fidelity_prompts(n, seed)
    if spec.get("workload") == "ewt":  # real documents of several sentences (polytask only: it segments them)
        texts = [json.loads(line)["text"] for line in EWT.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [texts[(seed + i) % len(texts)] for i in range(n)]
    return overhead_sentences(n, seed)


def _task(spec: dict[str, Any]) -> Sentiment:
    task = Sentiment()
    if spec.get("max_tokens"):
        task.max_tokens = int(spec["max_tokens"])
    return task


def _one_sentence(text: str, *, max_chars: int = 0) -> list[Sentence]:
    """A segmenter that keeps the whole text as one sentence (so polytask sends exactly the contenders' prompt)."""
    return [Sentence(index=0, start=0, end=len(text), text=text)]


def _error_name(error: BaseException) -> str:
    status = getattr(error, "status_code", None)
    return f"{type(error).__name__}({status})" if status else type(error).__name__


async def _wait_go() -> None:
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


class Run:
    """Counts one run's outcomes and times it."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.ok = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.extra: dict[str, Any] = {}
        self.t0 = self.c0 = 0.0
        self.wall = self.cpu = 0.0
        self.profile_path: str | None = None
        self._profiler: Any = None

    def start(self) -> None:
        if self.profile_path:
            import cProfile

            self._profiler = cProfile.Profile(time.process_time)  # CPU time: waiting on the server is not a cost
            self._profiler.enable()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        if self._profiler is not None:
            self._profiler.disable()
            self._profiler.dump_stats(self.profile_path)
            self._profiler = None

    def result(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "ok": self.ok,
            "failed": self.calls - self.ok,
            "errors": dict(self.errors),
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "ok_per_s": self.ok / self.wall if self.wall else math.nan,
            "cpu_ms_per_call": 1000 * self.cpu / self.calls if self.calls else math.nan,
            **self.extra,
        }


def _body(task: Sentiment, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": messages,
        "response_format": _response_format(task),
        "temperature": 0.0,
        "max_completion_tokens": task.max_tokens,
    }


def _response_format(task: Sentiment) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": task.name, "schema": task.json_schema(), "strict": True}}


# -- raw loops -------------------------------------------------------------------------------------------------


async def raw(spec: dict[str, Any], lib: str) -> dict[str, Any]:
    task = _task(spec)
    conc = spec["concurrency"]
    url = spec["base_url"] + "/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    warm = [build_messages(task, t) for t in _texts(spec, spec.get("warmup", 0), spec.get("seed", 0) + 1000)]
    texts = _texts(spec, spec["calls"], spec.get("seed", 0))
    if spec.get("slice"):
        i, n = spec["slice"]
        texts = texts[i::n]
    msgs = [build_messages(task, t) for t in texts]
    run = Run(len(msgs))

    if lib == "httpx2":
        import httpx2

        client: Any = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=conc, max_keepalive_connections=conc), timeout=60
        )

        async def post(body: bytes) -> tuple[int, bytes]:
            r = await client.post(url, content=body, headers=headers)
            return r.status_code, r.content

        async def close() -> None:
            await client.aclose()

    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc))

        async def post(body: bytes) -> tuple[int, bytes]:
            async with session.post(url, data=body, headers=headers) as r:
                return r.status, await r.read()

        async def close() -> None:
            await session.close()

    async def loop(batch: list[list[dict[str, str]]], count: bool) -> None:
        it = iter(batch)

        async def worker() -> None:
            for m in it:
                try:
                    status, content = await post(json.dumps(_body(task, m)).encode())
                    if status == 200:
                        data = json.loads(content)
                        json.loads(data["choices"][0]["message"]["content"])
                        run.ok += count
                    elif count:
                        run.errors[f"HTTP {status}"] += 1
                except Exception as error:
                    if count:
                        run.errors[_error_name(error)] += 1

        await asyncio.gather(*(worker() for _ in range(conc)))

    await loop(warm, False)
    await _wait_go()
    run.start()
    await loop(msgs, True)
    run.stop()
    await close()
    return run.result()


# -- the openai SDK, as users write it -------------------------------------------------------------------------


async def naive(spec: dict[str, Any], mode: str = "create") -> dict[str, Any]:
    import openai

    task = _task(spec)
    kwargs: dict[str, Any] = {"base_url": spec["base_url"], "api_key": API_KEY}
    if spec.get("max_retries") is not None:
        kwargs["max_retries"] = spec["max_retries"]
    if spec.get("transport") == "aiohttp":
        kwargs["http_client"] = openai.DefaultAioHttpClient()
    client = openai.AsyncOpenAI(**kwargs)
    sem = asyncio.Semaphore(spec["concurrency"])
    rpm_limiter = tpm_limiter = None
    charges: dict[int, int] = {}
    if mode == "aiolimiter":
        from aiolimiter import AsyncLimiter

        from polytask.testing import simulator

        rpm_limiter = AsyncLimiter(spec["rpm"], 60)
        if spec.get("tpm"):
            tpm_limiter = AsyncLimiter(spec["tpm"], 60)
    warm = [build_messages(task, t) for t in _texts(spec, spec.get("warmup", 0), spec.get("seed", 0) + 1000)]
    msgs = [build_messages(task, t) for t in _texts(spec, spec["calls"], spec.get("seed", 0))]
    if tpm_limiter is not None:
        charges = {i: simulator.estimate_tokens(m) + task.max_tokens for i, m in enumerate(msgs)}
    run = Run(len(msgs))
    rf = _response_format(task)

    async def call(m: list[dict[str, str]]) -> None:
        if mode == "parse":
            r = await client.chat.completions.parse(
                model=MODEL,
                messages=m,  # type: ignore[arg-type]
                response_format=SentimentAnswer,
                temperature=0,
                max_completion_tokens=task.max_tokens,
            )
            if r.choices[0].message.parsed is None:
                raise ValueError("no parsed answer")
            return
        r = await client.chat.completions.create(
            model=MODEL,
            messages=m,  # type: ignore[arg-type]
            response_format=rf,  # type: ignore[arg-type]
            temperature=0,
            max_completion_tokens=task.max_tokens,
        )
        SentimentAnswer.model_validate_json(r.choices[0].message.content or "")

    async def one(i: int, m: list[dict[str, str]], count: bool) -> None:
        async with sem:
            try:
                if rpm_limiter is not None:
                    async with rpm_limiter:
                        if tpm_limiter is not None:
                            await tpm_limiter.acquire(charges[i])
                        await call(m)
                else:
                    await call(m)
                run.ok += count
            except Exception as error:
                if count:
                    run.errors[_error_name(error)] += 1

    await asyncio.gather(*(one(i, m, False) for i, m in enumerate(warm)))
    await _wait_go()
    run.start()
    await asyncio.gather(*(one(i, m, True) for i, m in enumerate(msgs)))
    run.stop()
    await client.close()
    return run.result()


async def litellm_router(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    import litellm
    from litellm import Router

    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
    logging.getLogger("LiteLLM Router").setLevel(logging.CRITICAL)
    task = _task(spec)
    params: dict[str, Any] = {"model": f"openai/{MODEL}", "api_base": spec["base_url"], "api_key": API_KEY}
    if spec.get("rpm"):
        params["rpm"] = spec["rpm"]
    if spec.get("tpm"):
        params["tpm"] = spec["tpm"]
    kwargs: dict[str, Any] = {"routing_strategy": spec.get("routing_strategy", "usage-based-routing-v2")}
    if spec.get("redis"):  # LiteLLM's own way to share usage between routers: its Redis cache
        from urllib.parse import urlsplit

        where = urlsplit(spec["redis"])
        kwargs.update(redis_host=where.hostname, redis_port=where.port)
    if spec.get("max_retries") is not None:
        kwargs["num_retries"] = spec["max_retries"]
    router = Router(model_list=[{"model_name": "sim", "litellm_params": params}], **kwargs)
    sem = asyncio.Semaphore(spec["concurrency"])
    texts = _texts(spec, spec["calls"], spec.get("seed", 0))
    if spec.get("slice"):
        i, n = spec["slice"]
        texts = texts[i::n]
    msgs = [build_messages(task, t) for t in texts]
    run = Run(len(msgs))
    run.extra["num_retries"] = getattr(router, "num_retries", None)
    rf = _response_format(task)

    async def one(m: list[dict[str, str]]) -> None:
        async with sem:
            try:
                r = await router.acompletion(
                    model="sim", messages=m, response_format=rf, temperature=0, max_completion_tokens=task.max_tokens
                )
                SentimentAnswer.model_validate_json(r.choices[0].message.content or "")
                run.ok += 1
            except Exception as error:
                run.errors[_error_name(error)] += 1

    await _wait_go()
    run.start()
    await asyncio.gather(*(one(m) for m in msgs))
    run.stop()
    return run.result()


# -- polytask --------------------------------------------------------------------------------------------------

_LIMIT_PROBES = (
    "concurrency",
    "stats.concurrency",
    "concurrency_limit",
    "limiter.concurrency",
    "backend.concurrency",
    "_concurrency",
    "_slots.total_tokens",
)


def _probe(orch: Any) -> tuple[str, float] | None:
    """The first adaptive-concurrency reading found on the orchestrator (name, value), else None.

    The lead may add adaptive concurrency under a name not known here; these are the likely ones. An object found
    under a name is read through ``limit`` / ``current`` / ``value`` / ``total_tokens`` / ``target``.
    """
    for path in _LIMIT_PROBES:
        obj: Any = orch
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if callable(obj):
            continue
        if isinstance(obj, int | float) and not isinstance(obj, bool):
            return path, float(obj)
        for attr in ("limit", "current", "value", "total_tokens", "target", "window"):
            value = getattr(obj, attr, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return f"{path}.{attr}", float(value)
    return None


async def polytask_run(spec: dict[str, Any]) -> dict[str, Any]:
    import polytask as pt

    task = _task(spec)
    fidelity = spec.get("workload") == "fidelity"
    backend = pt.OpenAIBackend(MODEL, base_url=spec["base_url"], api_key=API_KEY, **spec.get("backend", {}))
    options: dict[str, Any] = {"max_concurrency": spec["concurrency"]}
    if spec.get("redis"):  # one limit shared by every client of the key (benchmarks/shared_limit.py)
        options["limiter"] = pt.RedisRateLimiter(
            spec["redis"], key=spec.get("redis_key", "bench"), rpm=spec.get("rpm"), tpm=spec.get("tpm")
        )
    else:
        if spec.get("rpm"):
            options["rpm"] = spec["rpm"]
        if spec.get("tpm"):
            options["tpm"] = spec["tpm"]
    if fidelity:
        options["segmenter"] = _one_sentence
    options.update(spec.get("orchestrator", {}))
    tasks = [task, pt.Entities()] if spec.get("tasks") == "sentiment,entities" else [task]
    orch = pt.Orchestrator(backend, tasks=tasks, **options)
    charges: dict[str, int] = {}  # call text → the charge of its last answered attempt, in order of first answer
    max_tokens_sent: collections.Counter[int] = collections.Counter()
    if spec.get("record_charges"):
        # polytask may send less than the task's max_tokens (a learned completion cap), so the server charges it
        # less than the other contenders: record what each answered call was charged, for its own bound.
        from polytask.testing import simulator

        complete = backend.complete

        async def recording(request: Any, /) -> Any:
            response = await complete(request)
            key = request.messages[-1]["content"]
            charges[key] = simulator.estimate_tokens(request.messages) + request.max_tokens
            max_tokens_sent[request.max_tokens] += 1
            return response

        backend.complete = recording  # type: ignore[method-assign]
    warm = _texts(spec, spec.get("warmup", 0), spec.get("seed", 0) + 1000)
    texts = _texts(spec, spec["calls"], spec.get("seed", 0))
    if spec.get("slice"):  # this client's share of a workload split between several: every n-th call from i
        i, n = spec["slice"]
        texts = texts[i::n]
    run = Run(len(texts))
    run.profile_path = spec.get("profile")
    if warm:
        await orch.run(warm)
    stats0 = _stats(orch)
    samples: list[tuple[float, int, float | None]] = []
    probe_name: list[str] = []

    async def sample() -> None:
        slots = getattr(orch, "_slots", None) or getattr(getattr(orch, "concurrency", None), "limiter", None)
        while True:
            found = _probe(orch)
            if found and not probe_name:
                probe_name.append(found[0])
            in_flight = int(getattr(slots, "borrowed_tokens", -1)) if slots is not None else -1
            samples.append((time.perf_counter() - run.t0, in_flight, found[1] if found else None))
            await asyncio.sleep(0.1)

    await _wait_go()
    run.start()
    sampler = asyncio.create_task(sample()) if spec.get("probe") else None
    try:
        results = await orch.run(texts)
    finally:
        run.stop()
        if sampler is not None:
            sampler.cancel()
    run.calls = sum(len(doc.pairs) for doc in results)  # pairs (one per call unless fused or packed)
    for doc in results:
        for pair in doc.pairs:
            if pair.error is None:
                run.ok += 1
            else:
                name = pair.error.type + (f"({pair.error.status_code})" if pair.error.status_code else "")
                run.errors[name] += 1
    if charges:
        run.extra["charges"] = list(charges.values())
        run.extra["max_tokens_sent"] = dict(sorted(max_tokens_sent.items()))
    stats1 = _stats(orch)
    run.extra["stats"] = {k: v - stats0.get(k, 0) if isinstance(v, int | float) else v for k, v in stats1.items()}
    if spec.get("probe"):
        run.extra["concurrency"] = _summarize(samples, probe_name[0] if probe_name else None, run.wall)
    await backend.aclose()
    return run.result()


def _stats(orch: Any) -> dict[str, Any]:
    stats = getattr(orch, "stats", None)
    if stats is None:
        return {}
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    if hasattr(stats, "model_dump"):
        return dict(stats.model_dump())
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")}


def _summarize(samples: list[tuple[float, int, float | None]], name: str | None, wall: float) -> dict[str, Any]:
    """In-flight calls and the adaptive limit over the second half of the run (the converged state)."""
    late = [s for s in samples if s[0] >= wall / 2] or samples
    in_flight = sorted(s[1] for s in late)
    limits = sorted(s[2] for s in late if s[2] is not None)
    return {
        "limit_attribute": name,
        "in_flight_median": in_flight[len(in_flight) // 2] if in_flight else None,
        "in_flight_max": max((s[1] for s in samples), default=None),
        "limit_median": limits[len(limits) // 2] if limits else None,
        "limit_last": samples[-1][2] if samples else None,
        "trace": [(round(t, 2), f, lim) for t, f, lim in samples[:: max(1, len(samples) // 40)]],
    }


# -- entry point -----------------------------------------------------------------------------------------------


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec["contender"]
    if kind == "raw-httpx2":
        return await raw(spec, "httpx2")
    if kind == "raw-aiohttp":
        return await raw(spec, "aiohttp")
    if kind == "naive":
        return await naive(spec)
    if kind == "parse":
        return await naive(spec, "parse")
    if kind == "aiolimiter":
        return await naive(spec, "aiolimiter")
    if kind == "litellm":
        return await litellm_router(spec)
    if kind == "polytask":
        return await polytask_run(spec)
    raise SystemExit(f"unknown contender {kind!r}")


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = asyncio.run(main(spec))
    result["contender"] = spec["contender"]
    print(json.dumps(result, default=str), flush=True)
