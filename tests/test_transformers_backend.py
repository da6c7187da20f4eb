"""The local transformers backend on a tiny random-weight Llama built from a config (CPU, seconds, no download).

The tokenizer is a byte-level BPE with no merges built with the ``tokenizers`` library (every byte one token), so
nothing is fetched from the hub.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import threading
import time
import weakref
from typing import Literal

import pytest
from pydantic import BaseModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("xgrammar")

import anyio  # noqa: E402

from local_models import build, make_tokenizer  # noqa: E402
from polytask.backends.base import ChatRequest  # noqa: E402
from polytask.backends.transformers import TransformersBackend  # noqa: E402
from polytask.exceptions import BackendClosedError, BackendError, BadRequestError, ConfigurationError  # noqa: E402
from polytask.local.engine import Engine, GenRequest  # noqa: E402
from polytask.local.model import ModelNotFoundError  # noqa: E402
from polytask.tasks.base import strict_json_schema  # noqa: E402


class Entity(BaseModel):
    text: str
    label: Literal["PER", "ORG", "LOC", "MISC"]


class Entities(BaseModel):
    entities: list[Entity]


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confident: bool


def request(sentence: str, schema: type[BaseModel], max_tokens: int = 200) -> ChatRequest:
    return ChatRequest(
        messages=[
            {"role": "system", "content": "You are a careful annotator. Answer with JSON. " * 3},
            {"role": "user", "content": json.dumps({"sentence": sentence})},
        ],
        schema_name=schema.__name__,
        json_schema=strict_json_schema(schema),
        max_tokens=max_tokens,
    )


SENTENCES = [f"Sentence {i}: " + "word " * (i % 7) + "end." for i in range(24)]


async def gather(backend: TransformersBackend, requests: list[ChatRequest]) -> list:
    out: list = [None] * len(requests)
    async with anyio.create_task_group() as tg:
        for i, r in enumerate(requests):

            async def one(i: int = i, r: ChatRequest = r) -> None:
                out[i] = await backend.complete(r)

            tg.start_soon(one)
    return out


def test_every_answer_validates_and_calls_are_batched(tiny) -> None:
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=8, max_wait=0.05)
    requests = [request(s, Sentiment) for s in SENTENCES] + [request(s, Entities) for s in SENTENCES[:8]]
    answers = anyio.run(gather, backend, requests)
    for r, a in zip(requests, answers, strict=True):
        assert a.prompt_tokens > 0 and a.completion_tokens > 0
        if a.finish_reason == "stop":
            (Sentiment if r.schema_name == "Sentiment" else Entities).model_validate_json(a.content)
            assert " " not in a.content.replace(" ", "") or ", " not in a.content  # compact JSON
        else:
            assert a.finish_reason == "length" and r.schema_name == "Entities"  # only free strings can run on
    sentiments = [a for r, a in zip(requests, answers, strict=True) if r.schema_name == "Sentiment"]
    assert all(a.finish_reason == "stop" for a in sentiments)
    stats = backend.stats
    assert stats["rows"] == len(requests)
    assert stats["batches"] <= 6  # 32 concurrent calls, batches of ≤ 8
    assert stats["prefix_tokens_saved"] > 0  # the shared system prompt ran once per batch
    assert backend.grammars.compiles == 2  # one grammar per schema, reused
    anyio.run(backend.aclose)


def test_finish_reason_length(tiny) -> None:
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu")
    assert backend.max_batch_size == 32 and backend.preferred_concurrency == 64  # the CPU defaults
    assert backend.repetition_penalty == 1.0  # off for a model the user passes (the embedded one's is 1.1)
    (answer,) = anyio.run(gather, backend, [request("Anna went to Rome.", Entities, max_tokens=3)])
    assert answer.finish_reason == "length"
    assert answer.completion_tokens == 3
    assert answer.content == '{"e'


def test_engine_matches_greedy_generate(tiny) -> None:
    model, tok = tiny
    prompts = [tok(("shared prefix " * 4) + s)["input_ids"] for s in ("a", "bb cc dd", "e f")]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    results = engine.generate([GenRequest(p, max_new_tokens=6, ignore_eos=True) for p in prompts])
    assert engine.stats["prefix_tokens_saved"] > 0
    for p, res in zip(prompts, results, strict=True):
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(p) :].tolist()
        assert res.token_ids == ref
        assert res.finish_reason == "length"


def test_loads_from_a_directory(tiny, tmp_path) -> None:
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    backend = TransformersBackend(tmp_path / "m", device="cpu")
    assert backend.name == "local:m"
    (answer,) = anyio.run(gather, backend, [request("Hi.", Sentiment)])
    Sentiment.model_validate_json(answer.content)


def test_missing_model_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model") as info:
        TransformersBackend(str(missing), device="cpu")
    assert isinstance(info.value, ConfigurationError)
    with pytest.raises(ModelNotFoundError, match=r"never downloads"):
        TransformersBackend("polytask-test/not-a-cached-model", device="cpu")
    with pytest.raises(ModelNotFoundError, match="no such GGUF"):
        TransformersBackend(tmp_path / "x.gguf", device="cpu")


def test_same_job_through_the_simulator_and_the_local_backend(tiny, simulator) -> None:
    """One argument swaps the hosted API for the local model; the merged documents have the same shape."""
    import polytask as pt

    model, tok = tiny
    texts = ["Ann lives in Rome. She loves it!", "这是一段文本。它描述了人工智能的应用场景。"]

    def tasks() -> list:
        return [pt.Sentiment(), pt.Classify(["billing", "delivery"]), pt.Entities(max_tokens=24)]

    async def run(backend) -> list:
        async with pt.Orchestrator(backend, tasks(), max_concurrency=16) as orch:
            return await orch.run(texts)

    sim = simulator()
    hosted = anyio.run(run, pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="test-key-0000"))
    local = anyio.run(run, pt.TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=16))
    for h, loc in zip(hosted, local, strict=True):
        assert [s.text for s in h.sentences] == [s.text for s in loc.sentences]
        assert set(h.results) == set(loc.results) == {"sentiment", "classify", "entities"}
        for name in h.results:
            assert type(h.results[name]) is type(loc.results[name])
        assert len(h.pairs) == len(loc.pairs) == 3 * len(h.sentences)
        for pair in loc.pairs:  # random weights: enum answers always finish; free strings may hit the cap
            assert pair.ok or (pair.task == "entities" and pair.error.type == "LengthLimitError")
        assert all(p.ok for p in loc.pairs if p.task in ("sentiment", "classify"))
        assert loc.results["sentiment"].coverage == 1.0 and loc.results["classify"].coverage == 1.0


class Note(BaseModel):
    text: str


def endless_strings():
    """A tiny model that never closes a JSON string: string answers always run to ``max_tokens``."""
    model, tok = build()
    quote = tok.convert_tokens_to_ids('"')

    def hook(module, args, output):
        output[..., quote] = -1e9  # still above the grammar's -inf, so a required quote is taken
        return output

    model.lm_head.register_forward_hook(hook)
    return model, tok


async def until(condition) -> None:
    """Wait for the engine thread's progress (it has no event to await)."""
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(0.005)


def test_a_cancelled_call_frees_its_row_at_the_next_step() -> None:
    model, tok = endless_strings()

    async def main() -> tuple[int, object]:
        backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=2, max_wait=0)
        with anyio.CancelScope() as scope:

            async def cancel_soon() -> None:
                await until(lambda: backend.stats["steps"] >= 3)
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_soon)
                await backend.complete(request("Anna went to Rome.", Note, max_tokens=500))
        assert scope.cancelled_caught
        answer = await backend.complete(request("Hi.", Sentiment))
        steps = backend.stats["steps"]
        await backend.aclose()
        return steps, answer

    steps, answer = anyio.run(main)
    Sentiment.model_validate_json(answer.content)
    assert steps < 100  # the cancelled answer (500 tokens) stopped decoding


def test_aclose_answers_every_waiting_call_and_refuses_new_ones() -> None:
    model, tok = endless_strings()

    async def main() -> list:
        backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=1, max_wait=0)
        outcomes: list = []

        async def call() -> None:
            try:
                outcomes.append(await backend.complete(request("Anna went to Rome.", Note, max_tokens=500)))
            except Exception as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
            await until(lambda: backend.stats["steps"] >= 2)
            await backend.aclose()
        with pytest.raises(BackendError, match="closed"):
            await backend.complete(request("Hi.", Sentiment))
        return outcomes

    outcomes = anyio.run(main)
    assert len(outcomes) == 3 and all(isinstance(o, BackendClosedError) for o in outcomes), outcomes
    assert sum("before this call ran" in str(o) for o in outcomes) == 2  # the two still waiting
    assert sum("before this call's answer was done" in str(o) for o in outcomes) == 1  # the one being decoded


def test_continuous_batching_refills_rows_as_answers_finish(tiny) -> None:
    """More calls than rows: finished rows take waiting calls, the answers equal a one-at-a-time run."""
    model, tok = tiny

    async def main(max_batch_size: int) -> tuple[list, dict]:
        backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=max_batch_size, max_wait=0)
        answers = await gather(backend, [request(s, Sentiment, max_tokens=30) for s in SENTENCES[:10]])
        stats = backend.stats
        await backend.aclose()
        return answers, stats

    import polytask as pt

    orch = pt.Orchestrator(TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=4), [pt.Sentiment()])
    assert orch.max_concurrency == 8 and orch.concurrency.decrease == 1.0  # rows refill from a full queue; no AIMD
    together, stats = anyio.run(main, 4)
    alone, _ = anyio.run(main, 1)
    assert stats["rows"] == 10 and stats["batches"] >= 3  # rows were refilled (≤ 4 at once)
    assert [a.content for a in together] == [a.content for a in alone]


FREE = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"], "additionalProperties": False}


def free_request(text: str, *, max_tokens: int = 20, role: str = "user", temperature: float = 0.0) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": role, "content": text}],
        schema_name="S",
        json_schema=FREE,
        max_tokens=max_tokens,
        temperature=temperature,
    )


async def settle(backend: TransformersBackend, requests: list[ChatRequest]) -> list:
    """Every call's answer or exception, failing the test (not hanging it) if any caller is never woken."""
    out: list = [None] * len(requests)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i, r in enumerate(requests):

                async def one(i: int = i, r: ChatRequest = r) -> None:
                    try:
                        out[i] = await backend.complete(r)
                    except Exception as exc:
                        out[i] = exc

                tg.start_soon(one)
    return out


def test_a_conversation_the_chat_template_refuses_fails_alone() -> None:
    model, tok = build()
    tok.chat_template = (  # as Gemma's template refuses a system role, or others refuse roles that do not alternate
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{{ m['content'] }}\n{% endfor %}"
    )
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=4, max_wait=0.05)
    out = anyio.run(settle, backend, [free_request("good"), free_request("bad", role="bad"), free_request("good 2")])
    assert isinstance(out[1], BadRequestError) and "bad role" in str(out[1])
    assert not isinstance(out[0], Exception) and not isinstance(out[2], Exception)


def test_bad_numbers_are_rejected_per_call_and_neighbours_are_answered() -> None:
    model, tok = build()
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=8, max_wait=0.05)
    calls = [
        free_request("greedy"),
        free_request("tiny temperature", temperature=1e-39),  # allowed: must not overflow the batch's softmax
        free_request("no tokens", max_tokens=0),
        free_request("negative", temperature=-1.0),
        free_request("nan", temperature=float("nan")),
        free_request("greedy 2"),
    ]
    out = anyio.run(settle, backend, calls)
    assert [type(o).__name__ for o in out] == [
        "ChatResponse",
        "ChatResponse",
        "BadRequestError",
        "BadRequestError",
        "BadRequestError",
        "ChatResponse",
    ]
    assert "max_tokens" in str(out[2]) and "temperature" in str(out[3])


def test_aclose_cancels_calls_still_being_prepared() -> None:
    model, tok = build()
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=4, max_wait=0.0)
    template = tok.apply_chat_template
    started = threading.Event()

    def slow(*args, **kwargs):  # a slow template, or a first-time schema compile
        started.set()
        time.sleep(0.3)
        return template(*args, **kwargs)

    tok.apply_chat_template = slow

    async def main() -> list:
        out: list = []

        async def one(i: int) -> None:
            try:
                out.append(await backend.complete(free_request(f"call {i}", max_tokens=500)))
            except Exception as exc:
                out.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(one, i)
            await anyio.to_thread.run_sync(started.wait)
            await backend.aclose()
        return out

    out = anyio.run(main)
    assert len(out) == 2 and all(isinstance(o, BackendError) for o in out), out  # not 500-token answers


def test_aclose_drops_the_model() -> None:
    model, tok = build()
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=2)
    anyio.run(settle, backend, [free_request("x", max_tokens=3)])
    ref = weakref.ref(model)
    del model
    anyio.run(backend.aclose)
    gc.collect()
    assert ref() is None


def test_learned_position_models_survive_long_runs() -> None:
    """Rows without a call keep stepping; their position ids must stay inside a learned position table (GPT-2)."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=4, max_wait=0.05)
    for round_ in range(35):  # 3 calls in 4 rows: the spare row steps ~9 times a round, 300+ in all
        out = anyio.run(settle, backend, [free_request(f"r{round_} c{i}", max_tokens=30) for i in range(3)])
        assert not any(isinstance(o, Exception) for o in out), (round_, out)
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    long, short = tok("a" * 240)["input_ids"], tok("short")["input_ids"]
    results = engine.generate(
        [GenRequest(long, max_new_tokens=4, ignore_eos=True), GenRequest(short, max_new_tokens=150, ignore_eos=True)]
    )
    assert [r.completion_tokens for r in results] == [4, 150]


@pytest.mark.parametrize("penalty", [0, -1.0, float("nan"), float("inf"), 1e-45, 1e6])
def test_bad_repetition_penalty_names_itself(tiny, penalty) -> None:
    model, tok = tiny
    with pytest.raises(ConfigurationError, match="repetition_penalty"):
        TransformersBackend(model, tokenizer=tok, device="cpu", repetition_penalty=penalty)


def test_repetition_penalty_reaches_every_request(tiny) -> None:
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", repetition_penalty=2.0, max_wait=0)
    seen = []
    real = backend.engine.serve

    def spy(source, **kwargs):
        class Spy:
            def waiting(self):
                return source.waiting()

            def take(self, n):
                jobs = source.take(n)
                seen.extend(j.request.repetition_penalty for j in jobs)
                return jobs

            def idle(self):
                return source.idle()

        return real(Spy(), **kwargs)

    backend.engine.serve = spy
    anyio.run(gather, backend, [request("Anna went to Rome.", Entities, max_tokens=4)] * 2)
    assert seen == [2.0, 2.0]
    anyio.run(backend.aclose)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"max_wait": float("inf")}, "max_wait"),
        ({"max_wait": float("nan")}, "max_wait"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"cpu_threads": -1}, "cpu_threads"),
        ({"dtype": "notadtype"}, "not a torch dtype"),
        ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
    ],
)
def test_settings_that_cannot_work_fail_at_construction(tiny, setting, words) -> None:
    model, tok = tiny
    with pytest.raises(ConfigurationError, match=words):
        TransformersBackend(model, tokenizer=tok, **{"device": "cpu", **setting})


def test_a_tokenizer_without_a_chat_template_fails_at_construction(tiny) -> None:
    model, _ = tiny
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigurationError, match="no chat template"):
        TransformersBackend(model, tokenizer=tok, device="cpu")


def test_a_schema_that_does_not_compile_fails_once_with_a_clean_message(tiny) -> None:
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_wait=0)
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^\\bfoo\\b$"}}}
    bad = dataclasses.replace(request("Hi.", Sentiment), json_schema=schema, schema_name="bad")
    before = backend.grammars.compiles
    out = anyio.run(settle, backend, [bad, bad, request("Hi.", Sentiment), bad])
    assert [type(o).__name__ for o in out] == ["BadRequestError", "BadRequestError", "ChatResponse", "BadRequestError"]
    message = str(out[0])
    assert "cannot compile schema 'bad'" in message and not message.startswith("HTTP 400: [") and "\n" not in message
    assert "cc:" not in message  # no C++ log prefix
    assert backend.grammars.compiles - before == 2  # the bad schema once, Sentiment once


def test_a_slow_compile_does_not_stop_other_calls(tiny, monkeypatch) -> None:
    # compiling happens on the calling thread's side, not on the engine thread: a call whose grammar is ready
    # is answered while another schema still compiles
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_wait=0)
    anyio.run(settle, backend, [request("warm up", Sentiment)])
    release = threading.Event()
    real = backend.grammars._compiler.compile_json_schema

    def slow(*args, **kwargs):
        assert release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.grammars._compiler, "compile_json_schema", slow)
    order = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def compiling() -> None:
                await backend.complete(request("Slow.", Entities))
                order.append("entities")

            tg.start_soon(compiling)
            await anyio.sleep(0.05)
            await backend.complete(request("Fast.", Sentiment))
            order.append("sentiment")
            release.set()

    anyio.run(main)
    assert order == ["sentiment", "entities"]


def test_stats_and_repr_after_aclose(tiny) -> None:
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_wait=0)
    anyio.run(settle, backend, [request("Hi.", Sentiment)])
    anyio.run(backend.aclose)
    assert backend.stats["rows"] == 1 and "closed" in repr(backend)


def test_a_damaged_cached_conversion_is_converted_again(tmp_path, monkeypatch) -> None:
    from polytask.local import model as model_module

    model, tok = build()
    converted = tmp_path / "cache" / "models" / "tiny-conv"
    conversions = []

    def convert(gguf, dest=None):
        if not (converted / "config.json").is_file():
            conversions.append(gguf)
            model.save_pretrained(converted)
            tok.save_pretrained(converted)
        return converted

    monkeypatch.setattr(model_module, "convert_gguf", convert)
    gguf = tmp_path / "tiny.gguf"
    model_module.load_model(gguf, device="cpu", dtype=torch.float32)
    weights = converted / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    net, _ = model_module.load_model(gguf, device="cpu", dtype=torch.float32)
    assert len(conversions) == 2 and net.config.vocab_size == model.config.vocab_size


def test_a_directory_that_cannot_load_names_itself(tiny, tmp_path) -> None:
    model, _ = tiny
    model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ConfigurationError, match=r"cannot load the model in .*no-tokenizer") as info:
        TransformersBackend(tmp_path / "no-tokenizer", device="cpu")
    assert "hf download" not in str(info.value)


def test_an_unwritable_cache_names_polytask_cache_dir(tmp_path, monkeypatch) -> None:
    from polytask.local.model import convert_gguf

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("POLYTASK_CACHE_DIR", str(blocker / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigurationError, match="POLYTASK_CACHE_DIR"):
        convert_gguf(gguf)


def test_closed_while_a_schema_compiles_is_a_closed_error(tiny, monkeypatch) -> None:
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_wait=0)
    real = backend.grammars.get

    def compile_then_close(schema):
        out = real(schema)
        backend._closed = True  # aclose() ran while this schema compiled
        return out

    monkeypatch.setattr(backend.grammars, "get", compile_then_close)
    (outcome,) = anyio.run(settle, backend, [request("Hi.", Entities)])
    assert isinstance(outcome, BackendClosedError), outcome
    anyio.run(backend.aclose)
    monkeypatch.undo()
    queued = anyio.run(backend._queue.submit, request("Hi.", Sentiment))  # after close: answered at once
    assert isinstance(queued, BackendClosedError)


def test_calls_are_tokenized_off_the_engine_thread_in_batches(tiny) -> None:
    """The engine thread's host time is the GPU's critical path: the chat template runs on the prepare thread, a
    batch at a time, and the first batch holds every call that arrived while the engine gathered."""
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=8, max_wait=0.05)
    threads: list[str] = []
    sizes: list[int] = []
    real = backend._queue.prepare

    def spy(calls):
        threads.append(threading.current_thread().name)
        sizes.append(len(calls))
        return real(calls)

    backend._queue.prepare = spy
    answers = anyio.run(gather, backend, [request(s, Sentiment, max_tokens=20) for s in SENTENCES[:8]])
    assert all(a.finish_reason in ("stop", "length") for a in answers)
    assert set(threads) == {"polytask-local-prepare"}
    assert sizes[0] == 8 and sum(sizes) == 8
    assert backend.stats["batches"] == 1  # all eight decoded together
    anyio.run(backend.aclose)


def test_close_while_calls_are_being_prepared_answers_them(tiny) -> None:
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=4, max_wait=0)
    entered, release = threading.Event(), threading.Event()
    real = backend._queue.prepare

    def slow(calls):
        entered.set()
        release.wait(10)
        return real(calls)

    backend._queue.prepare = slow

    async def main() -> list:
        out: list = []

        async def one() -> None:
            try:
                out.append(await backend.complete(request("Anna went to Rome.", Sentiment)))
            except Exception as exc:
                out.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await anyio.to_thread.run_sync(entered.wait, 10)
            closing = backend.aclose()
            release.set()
            await closing
        return out

    out = anyio.run(main)
    assert len(out) == 1 and isinstance(out[0], BackendClosedError)


def test_a_call_prepared_after_the_engine_thread_died_still_gets_an_answer(tiny) -> None:
    """A bug outside a decode step ends the engine thread; a call still being tokenized then must not wait forever."""
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=4, max_wait=0.02)
    real_prepare = backend._queue.prepare
    died = threading.Event()

    def slow(calls):
        died.wait(5)  # prepared only once the engine thread has failed
        return real_prepare(calls)

    def broken(*args, **kwargs):
        died.set()
        raise RuntimeError("a bug outside a decode step")

    backend._queue.prepare = slow
    backend.engine.serve = broken

    async def main():
        with anyio.fail_after(10):
            with pytest.raises(BackendError, match="a bug outside a decode step"):
                await backend.complete(request("hello", Sentiment))

    anyio.run(main)


def test_aclose_under_trio_answers_the_calls_still_waiting(tiny) -> None:
    pytest.importorskip("trio")
    model, tok = tiny
    backend = TransformersBackend(model, tokenizer=tok, device="cpu", max_batch_size=4, max_wait=5.0)

    async def main() -> list:
        out: list = []

        async def one() -> None:
            try:
                out.append(await backend.complete(request("Anna went to Rome.", Sentiment)))
            except Exception as exc:
                out.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(one)
                await anyio.sleep(0.1)  # both queued; the engine is still gathering (max_wait 5 s)
                await backend.aclose()
        return out

    out = anyio.run(main, backend="trio")
    assert len(out) == 2 and all(isinstance(o, BackendClosedError) for o in out)
