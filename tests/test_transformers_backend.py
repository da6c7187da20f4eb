"""The local transformers backend on a tiny random-weight Llama built from a config (CPU, seconds, no download).

The tokenizer is a byte-level BPE with no merges built with the ``tokenizers`` library (every byte one token), so
nothing is fetched from the hub.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Literal

import pytest
from pydantic import BaseModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("xgrammar")

import anyio  # noqa: E402

from polytask.backends.base import ChatRequest  # noqa: E402
from polytask.backends.transformers import TransformersBackend  # noqa: E402
from polytask.exceptions import ConfigurationError  # noqa: E402
from polytask.local.engine import Engine, GenRequest  # noqa: E402
from polytask.local.model import ModelNotFoundError  # noqa: E402
from polytask.tasks.base import strict_json_schema  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Entity(BaseModel):
    text: str
    label: Literal["PER", "ORG", "LOC", "MISC"]


class Entities(BaseModel):
    entities: list[Entity]


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confident: bool


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return model, tok


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


def test_import_polytask_does_not_import_torch() -> None:
    code = (
        "import sys, polytask, polytask.backends.base, polytask.local;"
        "bad = [m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
