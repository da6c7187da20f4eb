"""The decode loop: prompts in, one answer per prompt out, greedy or sampled, grammar-constrained, continuously batched.

Why not ``model.generate``: on a GPU every decode step of a small model is launch-overhead-bound (the issue's H200
probe: 1.7k-7.6k tokens/s for plain batched ``generate``), and a static batch runs until its longest answer is done
while the rows whose answers finished early idle. This loop keeps every step at a fixed shape so it can be replayed as
one CUDA graph, refills finished rows with waiting prompts (continuous batching, as in Orca, Yu et al., OSDI 2022),
and does the per-step CPU work (grammar bitmasks) while the GPU runs the next forward pass:

1. **Rows are independent sequences.** A bucket (:class:`~polytask.local.bucket.Bucket`) holds ``rows`` sequences
   in a preallocated ``(rows, kv_heads, slots, head_dim)`` cache (:class:`SlotCache`). Each row has its own
   attention mask over the slots, its own position ids and its own write column, so a row can be refilled with a
   new prompt while the others keep decoding.
2. **Admission.** When rows are free and prompts wait (and enough rows are free, or a few steps passed), the waiting
   prompts are taken, grouped by shared token prefix (system prompt + task instructions + few-shot examples), and
   each group is prefilled in one forward pass straight into its rows: the shared prefix is computed once at batch
   size 1 (kept between admissions, keyed by its tokens) and copied in; the rest is left-padded to the group's
   longest, with an explicit 4-D mask (pad keys hidden).
3. **Decode steps** at the fixed shape ``(rows, 1)``; on CUDA captured once per ``(rows, slots)`` bucket as a CUDA
   graph and replayed. The bucket grows (rows and slots copied into a bigger one) when more prompts wait than rows
   are free, or a prompt needs more slots.
4. **Grammar, overlapped.** After step t's tokens are picked on the device, step t+1's forward is launched *before*
   the CPU waits for the tokens; xgrammar then accepts the tokens and fills the next bitmasks for all constrained
   rows in one C++ call while the GPU computes.

Shapes: ``rows`` = a power of two up to 64, then a multiple of 64, at most the caller's ``max_rows``; ``slots`` =
the longest prompt + its answer cap, rounded up to a multiple of 64.

Where the parts live: this module's :class:`Engine` owns the model, the kept buckets and prefixes, the prefill
forward pass and the counters, and runs the loop; :mod:`.batcher` is one pass of the loop (admission, decode steps,
grow / compact), reaching the engine only through the :class:`~polytask.local.batcher.BatchEngine` protocol;
:mod:`.bucket` is a bucket (cache, per-row device state, captured graph) and the copy of rows between buckets;
:mod:`.rows` the table of per-row arrays; :mod:`.cache` the cache and attention; :mod:`.jobs` requests, answers
and the job protocols.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batcher import Batcher, bucket_rows
from .bucket import Bucket
from .cache import SlotCache, engine_attention, register_attention
from .grammar import unpack_bits
from .jobs import GenRequest, GenResult, Job, JobSource

# The engine passes ``past_key_values=``, the argument transformers 5.17 (the GPU image's) knows; 5.2x renamed it
# ``cache`` and warns on every forward call. Same behaviour on both; the warning says nothing to a polytask user.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

__all__ = ["Engine", "GenRequest", "GenResult", "Job", "JobSource", "SlotCache"]


class Engine:
    """Runs prompts through a causal LM with the loop described in the module docstring.

    Args:
        model: a transformers ``*ForCausalLM`` in eval mode, on its device.
        stop_token_ids: token ids that end an answer.
        pad_token_id: the id fed to padding positions.
        cuda_graphs: capture decode steps (default: on CUDA devices).
        min_prefix: the fewest shared tokens worth computing once (else every row runs its whole prompt).
        max_buckets: how many ``(rows, slots)`` caches / graphs to keep (each holds ``rows × slots`` keys/values).
        fused_gqa: use grouped-query attention without repeated keys / values (:mod:`polytask.local.cache`) in
            the engine's own forward passes (the model's configured attention is restored after each call, so
            ``model.generate`` elsewhere is unaffected).
        grammar_vocab: how many leading token ids grammars can allow (the tokenizer's size; default: the logits
            width). Ids past it (a model's padded vocabulary) are never picked for a constrained row.
        answer_ends: a bool per token id: whether the token can end a constrained answer (its text holds a ``}``
            or ``]``). A constrained row whose grammar is then complete and allows only a stop token finishes at
            once (one decode step saved per answer, and an answer completed on its last allowed token counts as
            whole). Default None: every constrained row is checked each step (≈ 0.5 µs a row).
        admit_every: with rows free and prompts waiting, admit at the latest after this many decode steps …
        admit_fraction: … or as soon as this fraction of the rows is free (admitting costs one prefill pass).
        shrink_below: with nothing waiting, move the busy rows into a smaller bucket once they fill less than
            1 / ``shrink_below`` of it (the long answers left at the end of a run then decode alone); 0 never
            shrinks.

    Raises:
        ValueError: ``shrink_below`` is 1 or negative (it must be 0 or ≥ 2).

    Thread-safety: one :meth:`serve` / :meth:`generate` at a time (the backend runs it on one worker thread).
    """

    def __init__(
        self,
        model: Any,
        *,
        stop_token_ids: list[int],
        pad_token_id: int,
        cuda_graphs: bool | None = None,
        min_prefix: int = 16,
        max_buckets: int = 8,
        fused_gqa: bool = True,
        grammar_vocab: int | None = None,
        answer_ends: np.ndarray | None = None,
        admit_every: int = 8,
        admit_fraction: float = 0.125,
        shrink_below: int = 4,
    ) -> None:
        self.model = model
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = self.config
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = int(cfg.vocab_size)
        self.max_position = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        self.grammar_vocab = min(self.vocab_size, grammar_vocab or self.vocab_size)
        self.stop_ids = np.array(sorted(set(stop_token_ids)), dtype=np.int64)
        self.answer_ends = answer_ends
        self.pad_id = pad_token_id
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.min_prefix = min_prefix
        self.max_buckets = max_buckets
        self.admit_every = admit_every
        self.admit_fraction = admit_fraction
        if shrink_below != 0 and shrink_below < 2:
            raise ValueError(f"shrink_below must be 0 (never shrink) or ≥ 2, got {shrink_below}")
        self.shrink_below = shrink_below
        inner = getattr(model, "model", model)
        self.takes_cache_position = "cache_position" in inspect.signature(inner.forward).parameters
        self.graph_pool: Any = None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._head = head if isinstance(head, torch.nn.Module) else None
        self.gqa = fused_gqa and register_attention()
        self._buckets: OrderedDict[tuple[int, int], Bucket] = OrderedDict()
        self._prefix: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._mask_backend: str | None = None
        self._seconds: dict[str, float] = {}
        self.stats = {
            "batches": 0,
            "rows": 0,
            "steps": 0,
            "prefix_tokens_saved": 0,
            "graphs": 0,
            "grown": 0,
            "shrunk": 0,
            "prefill_ms": 0,
            "decode_ms": 0,
            "take_ms": 0,
            "prefill_wait_ms": 0,
            "wait_ms": 0,
            "grammar_ms": 0,
        }
        """Counters: prefill passes (``batches``), prompts admitted (``rows``), decode ``steps``,
        ``prefix_tokens_saved``, CUDA ``graphs`` captured, buckets ``grown`` / ``shrunk``, and milliseconds of the
        engine thread's wall time: ``prefill_ms`` (admissions), ``decode_ms`` (steps), and inside them
        ``take_ms`` (taking jobs from the source), ``prefill_wait_ms`` / ``wait_ms`` (blocked on the device after a
        prefill / in a step) and ``grammar_ms`` (xgrammar's host work: matchers, token accept, bitmask fill)."""

    def add_time(self, what: str, seconds: float) -> None:
        """Add ``seconds`` to the ``<what>_ms`` counter."""
        self._seconds[what] = self._seconds.get(what, 0.0) + seconds
        self.stats[f"{what}_ms"] = int(self._seconds[what] * 1000)

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to the ``what`` counter of :attr:`stats`."""
        self.stats[what] += n

    def close(self) -> None:
        """Drop the buckets (caches, captured graphs), the kept prefixes, the graph memory pool and the model
        reference, so their memory can go; :attr:`stats` stay readable. The engine cannot serve afterwards."""
        self._buckets.clear()
        self._prefix.clear()
        self.graph_pool = None
        self.model = None
        self._head = None

    # ---------------------------------------------------------------- buckets and prefixes
    def bucket(self, rows: int, slots: int) -> Bucket:
        """The kept ``(rows, slots)`` bucket, or a new one (its decode step captured on CUDA; the least recently
        used bucket dropped beyond ``max_buckets``). Its rows' state is whatever the last user left."""
        key = (rows, slots)
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_buckets:
                self._buckets.popitem(last=False)
            bucket = Bucket(self, rows, slots)
            if self.cuda_graphs:
                try:
                    bucket.capture()
                    self.stats["graphs"] += 1
                except Exception as exc:
                    warnings.warn(f"CUDA graph capture failed, decoding eagerly: {exc!r}", stacklevel=2)
                    bucket.graph = None
                    self.cuda_graphs = False
            self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        return bucket

    def drop_bucket(self, rows: int, slots: int) -> None:
        """Stop keeping the ``(rows, slots)`` bucket (its memory goes once nothing else holds it)."""
        self._buckets.pop((rows, slots), None)

    def prefix_kv(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys / values of ``prefix`` (token ids) per layer, ``(1, kv_heads, len(prefix), head_dim)`` each:
        kept from an earlier call (the last 8 prefixes are kept) or computed now at batch size 1."""
        kv = self._prefix.get(prefix)
        if kv is None:
            cache = SlotCache(
                self.config.num_hidden_layers,
                1,
                self.kv_heads,
                len(prefix),
                self.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
            cache.write_pos = torch.arange(len(prefix), device=self.device)
            ids = self.to_device([prefix])
            mask = torch.ones((len(prefix), len(prefix)), dtype=torch.bool, device=self.device).tril()[None, None]
            self.forward(ids, ids.new_tensor([list(range(len(prefix)))]), mask, cache)
            kv = list(zip(cache.keys, cache.values, strict=True))
            while len(self._prefix) >= 8:
                self._prefix.popitem(last=False)
            self._prefix[prefix] = kv
        self._prefix.move_to_end(prefix)
        return kv

    def cached_prefix(self, prompts: list[list[int]]) -> int:
        """The longest kept prefix that starts every prompt (and leaves each at least one token), or 0."""
        best = 0
        for key in self._prefix:
            n = len(key)
            if n > best and all(len(p) > n and tuple(p[:n]) == key for p in prompts):
                best = n
        return best

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """One forward pass of the model (a prefill): token ``ids`` ``(n, length)`` at position ids ``pos``, attending
        as the 4-D bool ``mask`` says, keys / values written to ``cache``. Returns the last position's logits,
        ``(n, vocab)``."""
        kwargs: dict[str, Any] = {}
        if self.takes_cache_position:
            kwargs["cache_position"] = torch.arange(ids.shape[1], device=self.device)
        # The model slices the last position's hidden state, (n, 1, hidden) with a row stride of the whole prompt,
        # and hands it to its output layer. On the H200 (torch 2.11 + cu130) that product ran as one cuBLAS kernel
        # of 26.6 ms per prefill for Qwen2.5-1.5B's 151,936-wide head (425 ms of a 5.3 s run, torch.profiler); with
        # the input made contiguous by this hook it left the profile (a 400-row product takes ≈ 0.27 ms).
        hook = self._head.register_forward_pre_hook(_contiguous_input) if self._head is not None else None
        try:
            with engine_attention(self):
                logits: torch.Tensor = self.model(
                    input_ids=ids,
                    position_ids=pos,
                    attention_mask=mask,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **kwargs,
                ).logits[:, -1, :]
        finally:
            if hook is not None:
                hook.remove()
        return logits

    def to_device(self, data: Any) -> torch.Tensor:
        """``data`` (a list or numpy array) as a tensor on the engine's device. On CUDA the copy goes through pinned
        memory without blocking the host: a plain ``torch.tensor(..., device="cuda")`` waits for every kernel
        queued before it, which would stall the host behind the GPU at every decode step and prefill."""
        tensor = torch.as_tensor(data)
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set ``logits[r, t] = -inf`` for every row r in ``rows`` and token t its ``bitmask`` row (xgrammar's packed
        int32 layout, ``(rows, ceil(grammar_vocab / 32))``, on ``logits``' device) forbids, and for every t past
        :attr:`grammar_vocab`. Uses xgrammar's kernel (Triton on CUDA, C++ on CPU), else a torch fallback."""
        index = self.to_device(rows)
        if self.grammar_vocab < logits.shape[-1]:
            logits[index, self.grammar_vocab :] = float("-inf")
        if self._mask_backend != "torch":
            try:
                import xgrammar as xgr

                # a device tensor on CUDA (a list would be uploaded with a blocking copy); its CPU kernel takes a list
                which: Any = index if logits.is_cuda else rows
                xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.grammar_vocab, indices=which)
                self._mask_backend = "xgrammar"
                return
            except Exception as exc:  # e.g. no Triton / no compiler on this machine
                if self._mask_backend == "xgrammar":
                    raise
                warnings.warn(f"xgrammar's bitmask kernel failed ({exc!r}); using torch ops", stacklevel=2)
                self._mask_backend = "torch"
        bits = unpack_bits(bitmask.index_select(0, index), self.grammar_vocab)
        part = logits[index, : self.grammar_vocab]
        logits[index, : self.grammar_vocab] = part.masked_fill_(~bits, float("-inf"))

    # ---------------------------------------------------------------- the loops
    def generate(self, requests: list[GenRequest], grammar_matcher: Any = None) -> list[GenResult]:
        """Answer ``requests`` together (all rows admitted at once; finished rows are not refilled) and return one
        :class:`GenResult` per request, in order.

        Args:
            requests: the prompts (any lengths).
            grammar_matcher: a callable ``compiled_grammar -> xgrammar.GrammarMatcher`` (needed when any request
                has a grammar).

        Raises:
            Exception: whatever the model raised (out of memory, …).
        """
        source = _ListSource(requests)
        if requests:
            self.serve(source, max_rows=bucket_rows(len(requests)), grammar_matcher=grammar_matcher)
        for outcome in source.outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [o for o in source.outcomes if isinstance(o, GenResult)]

    @torch.inference_mode()
    def serve(self, source: JobSource, *, max_rows: int, grammar_matcher: Any = None) -> None:
        """Answer jobs from ``source`` until it is :meth:`~JobSource.idle`, refilling finished rows with waiting
        jobs (continuous batching), at most ``max_rows`` rows at once.

        A failure inside a step (out of memory, …) is handed to the jobs then in rows (``job.finish(exc)``); the
        loop then starts afresh with the jobs still waiting.
        """
        while True:
            run = Batcher(self, source, max_rows, grammar_matcher)
            try:
                run.loop()
                return
            except Exception as exc:
                run.fail(exc)
                self._buckets.clear()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if source.waiting() == 0 and source.idle():
                    return


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A forward pre-hook: the module's first argument made contiguous."""
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


class _ListSource:
    """The jobs of one :meth:`Engine.generate` call."""

    def __init__(self, requests: list[GenRequest]) -> None:
        self.outcomes: list[GenResult | BaseException | None] = [None] * len(requests)
        self.jobs = [_ListJob(self, i, r) for i, r in enumerate(requests)]

    def waiting(self) -> int:
        return len(self.jobs)

    def take(self, n: int) -> list[Job]:
        taken, self.jobs = self.jobs[:n], self.jobs[n:]
        return list(taken)

    def idle(self) -> bool:
        return not self.jobs


@dataclass
class _ListJob:
    source: _ListSource
    index: int
    request: GenRequest
    cancelled: bool = False

    def finish(self, outcome: GenResult | BaseException) -> None:
        self.source.outcomes[self.index] = outcome
