"""The decode loop: one batch of prompts in, one answer per prompt out, greedy or sampled, grammar-constrained.

Why not ``model.generate``: on a GPU every decode step of a small model is launch-overhead-bound (the issue's
H200 probe: 1.7k-7.6k tokens/s for plain batched ``generate``). This loop keeps every step at a fixed shape so it
can be replayed as one CUDA graph, and does the per-step CPU work (grammar bitmasks) while the GPU runs the next
forward pass:

1. **Shared prefix once.** The longest common token prefix of the batch (system prompt + task instructions +
   few-shot examples) is run once at batch size 1 and its keys / values are broadcast into every row's cache
   (kept between batches, keyed by the prefix tokens).
2. **Suffix prefill.** The per-row rest, left-padded to the batch's longest, in one forward pass with an explicit
   4-D mask (pad keys hidden; each pad query sees itself so no softmax row is empty).
3. **Decode steps** at a fixed shape ``(rows, 1)`` writing slot ``c`` of a preallocated ``(rows, heads,
   slots, head_dim)`` cache (:class:`SlotCache`); on CUDA, captured once per ``(rows, slots)`` bucket as a CUDA
   graph and replayed.
4. **Grammar, overlapped.** After step t's token is picked on the device, step t+1's forward is launched
   *before* the CPU waits for the token; xgrammar then accepts the tokens and fills the next bitmask for the
   whole batch in one C++ call while the GPU computes.

Shapes: ``rows`` = the batch rounded up to a bucket (powers of two to 64, then multiples of 64); ``slots`` =
prefix + suffix + new tokens, rounded up to a multiple of 64.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# The engine passes ``past_key_values=``, the argument transformers 5.17 (the GPU image's) knows; 5.2x renamed it
# ``cache`` and warns on every forward call. Same behaviour on both; the warning says nothing to a polytask user.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

__all__ = ["Engine", "GenRequest", "GenResult", "SlotCache"]


@dataclass
class GenRequest:
    """One prompt to answer.

    Attributes:
        prompt_ids: the prompt's token ids (chat template applied).
        grammar: an ``xgrammar.CompiledGrammar`` the answer must match, or None for free text.
        max_new_tokens: the most tokens to generate (≥ 1).
        temperature: 0 for greedy, else the sampling temperature.
        ignore_eos: keep generating through stop tokens until ``max_new_tokens`` (benchmarks only).
    """

    prompt_ids: list[int]
    grammar: Any = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    ignore_eos: bool = False


@dataclass
class GenResult:
    """One answer: ``token_ids`` (without the stop token), ``finish_reason`` (``"stop"`` or ``"length"``)."""

    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int = field(default=0)


class SlotCache:
    """A preallocated key/value cache that writes where :attr:`write_pos` says (duck-types transformers'
    ``Cache.update``; works on transformers 5.17 and 5.23, whose own static caches differ).

    Args:
        layers, rows, heads, slots, head_dim: the cache shape per layer is ``(rows, heads, slots, head_dim)``.
    """

    is_compileable = False

    def __init__(self, layers: int, rows: int, heads: int, slots: int, head_dim: int, *, dtype: Any, device: Any):
        shape = (rows, heads, slots, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.rows, self.slots = rows, slots

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.write_pos, key)
        self.values[layer_idx].index_copy_(2, self.write_pos, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.slots, 0


_ATTN = "polytask_gqa"


def _gqa_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for grouped-query attention without materialising repeated keys / values.

    transformers' sdpa path repeats each key/value head ``heads / kv_heads`` times whenever a mask is given
    (``(rows, heads, slots, head_dim)`` written and read per layer per step); here the query heads that share a
    key/value head are folded into the query-length axis instead. Shapes: query ``(B, H, Q, D)``, key/value
    ``(B, Hkv, L, D)``, mask ``(B, 1, Q, L)`` bool; returns ``(B, Q, H, D)``.
    """
    b, h, q, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    qf = query.reshape(b, hkv, g * q, d)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[2]]
        if g > 1 and q > 1:
            mask = mask[:, :, None].expand(b, mask.shape[1], g, q, mask.shape[-1]).reshape(b, mask.shape[1], g * q, -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        qf, key, value, attn_mask=mask, scale=scaling, is_causal=mask is None and q > 1 and g == 1
    )
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(_ATTN, _gqa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN, sdpa_mask)
        return True
    except (ImportError, AttributeError):  # pragma: no cover - older transformers: keep sdpa
        return False


class _attention:
    """Switch the model's attention implementation to :func:`_gqa_attention` for the calls inside."""

    def __init__(self, engine: Engine) -> None:
        self.config = engine.config
        self.on = engine.gqa

    def __enter__(self) -> None:
        if self.on:
            self.saved = self.config._attn_implementation
            self.config._attn_implementation = _ATTN

    def __exit__(self, *exc: object) -> None:
        if self.on:
            self.config._attn_implementation = self.saved


def _bucket_rows(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n))) if n <= 64 else 64 * math.ceil(n / 64)


def _round_up(n: int, k: int) -> int:
    return k * math.ceil(n / k)


class _Slot:
    """A (rows, slots) bucket: its cache, fixed-shape step buffers and (on CUDA) the captured graph."""

    def __init__(self, engine: Engine, rows: int, slots: int) -> None:
        cfg, dev = engine.config, engine.device
        self.cache = SlotCache(
            cfg.num_hidden_layers,
            rows,
            engine.kv_heads,
            slots,
            engine.head_dim,
            dtype=engine.dtype,
            device=dev,
        )
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.mask = torch.ones((rows, 1, 1, slots), dtype=torch.bool, device=dev)
        self.step_pos = torch.zeros(1, dtype=torch.long, device=dev)  # the slot a decode step writes
        self.logits: torch.Tensor | None = None
        self.graph: Any = None
        self.engine = engine

    def forward(self) -> torch.Tensor:
        with _attention(self.engine):
            return self._forward()

    def _forward(self) -> torch.Tensor:
        e = self.engine
        self.cache.write_pos = self.step_pos
        kwargs: dict[str, Any] = {}
        if e.takes_cache_position:
            kwargs["cache_position"] = self.step_pos
        out = e.model(
            input_ids=self.ids,
            position_ids=self.pos,
            attention_mask=self.mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def capture(self) -> None:
        """Capture the decode step as a CUDA graph (writes only the last slot, later overwritten before use)."""
        self.step_pos.fill_(self.cache.slots - 1)
        self.mask.fill_(True)
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.engine.graph_pool):
            self.logits = self.forward()
        self.engine.graph_pool = graph.pool()
        self.graph = graph

    def step(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            assert self.logits is not None
            return self.logits
        return self.forward()


class Engine:
    """Runs batches through a causal LM with the loop described in the module docstring.

    Args:
        model: a transformers ``*ForCausalLM`` in eval mode, on its device.
        stop_token_ids: token ids that end an answer.
        pad_token_id: the id fed to padded / finished rows.
        cuda_graphs: capture decode steps (default: on CUDA devices).
        min_prefix: the fewest shared tokens worth computing once (else every row runs its whole prompt).
        max_buckets: how many ``(rows, slots)`` caches / graphs to keep (each holds ``rows × slots`` keys/values).
        fused_gqa: use :func:`_gqa_attention` inside the engine's own forward passes (the model's configured
            attention is restored after each call, so ``model.generate`` elsewhere is unaffected).

    Thread-safety: one batch at a time (the backend calls it from one worker thread).
    """

    def __init__(
        self,
        model: Any,
        *,
        stop_token_ids: list[int],
        pad_token_id: int,
        cuda_graphs: bool | None = None,
        min_prefix: int = 16,
        max_buckets: int = 4,
        fused_gqa: bool = True,
    ) -> None:
        self.model = model
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = self.config
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = int(cfg.vocab_size)
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
        self.pad_id = pad_token_id
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.min_prefix = min_prefix
        self.max_buckets = max_buckets
        inner = getattr(model, "model", model)
        self.takes_cache_position = "cache_position" in inspect.signature(inner.forward).parameters
        self.graph_pool: Any = None
        self.gqa = fused_gqa and _register_attention()
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._prefix: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._shifts = torch.arange(32, dtype=torch.int32, device=self.device)
        self.stats = {
            "batches": 0,
            "rows": 0,
            "steps": 0,
            "prefix_tokens_saved": 0,
            "graphs": 0,
            "prefill_ms": 0,
            "decode_ms": 0,
        }

    # ---------------------------------------------------------------- buckets and prefix
    def _slot(self, rows: int, slots: int) -> _Slot:
        key = (rows, slots)
        slot = self._slots.get(key)
        if slot is None:
            while len(self._slots) >= self.max_buckets:
                self._slots.popitem(last=False)
            slot = _Slot(self, rows, slots)
            if self.cuda_graphs:
                try:
                    slot.capture()
                    self.stats["graphs"] += 1
                except Exception as exc:
                    warnings.warn(f"CUDA graph capture failed, decoding eagerly: {exc!r}", stacklevel=2)
                    slot.graph = None
                    self.cuda_graphs = False
            self._slots[key] = slot
        self._slots.move_to_end(key)
        return slot

    def _prefix_kv(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
            ids = torch.tensor([prefix], device=self.device)
            self._forward(ids, ids.new_tensor([list(range(len(prefix)))]), None, cache)
            kv = list(zip(cache.keys, cache.values, strict=True))
            while len(self._prefix) >= 8:
                self._prefix.popitem(last=False)
            self._prefix[prefix] = kv
        self._prefix.move_to_end(prefix)
        return kv

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache: SlotCache) -> Any:
        kwargs: dict[str, Any] = {}
        if self.takes_cache_position:
            kwargs["cache_position"] = cache.write_pos
        if mask is None:  # a causal prefix at batch 1
            n = ids.shape[1]
            mask = torch.ones((n, n), dtype=torch.bool, device=self.device).tril()[None, None]
        return self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        ).logits[:, -1, :]

    # ---------------------------------------------------------------- the loop
    @torch.inference_mode()
    def generate(self, requests: list[GenRequest], grammar_matcher: Any = None) -> list[GenResult]:
        """Answer one batch.

        Args:
            requests: the prompts (any lengths; best grouped by length by the caller).
            grammar_matcher: a callable ``compiled_grammar -> xgrammar.GrammarMatcher`` (needed when any request
                has a grammar).

        Returns:
            One :class:`GenResult` per request, in order.
        """
        t_start = time.perf_counter()
        n = len(requests)
        prompts = [r.prompt_ids for r in requests]
        lens = np.array([len(p) for p in prompts])
        prefix_len = _common_prefix(prompts) if n > 1 else 0
        prefix_len = min(prefix_len, int(lens.min()) - 1)
        if prefix_len < self.min_prefix:
            prefix_len = 0
        suffix = int(lens.max()) - prefix_len
        caps = np.array([max(1, r.max_new_tokens) for r in requests])
        steps = int(caps.max())
        rows = _bucket_rows(n)
        slots = _round_up(prefix_len + suffix + steps, 64)
        slot = self._slot(rows, slots)
        cache, dev = slot.cache, self.device
        self.stats["batches"] += 1
        self.stats["rows"] += n
        self.stats["prefix_tokens_saved"] += prefix_len * (n - 1)

        # 1. shared prefix, broadcast into every row
        if prefix_len:
            kv = self._prefix_kv(tuple(prompts[0][:prefix_len]))
            for layer, (k, v) in enumerate(kv):
                cache.keys[layer][:, :, :prefix_len].copy_(k.expand(rows, -1, -1, -1))
                cache.values[layer][:, :, :prefix_len].copy_(v.expand(rows, -1, -1, -1))

        # 2. suffix prefill, left-padded; padded rows (beyond n) repeat row 0
        pads = np.zeros(rows, dtype=np.int64)
        pads[:n] = suffix - (lens - prefix_len)
        pads[n:] = pads[0]
        ids = np.full((rows, suffix), self.pad_id, dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, pads[i] :] = p[prefix_len:]
        ids[n:] = ids[0]
        ids_t = torch.from_numpy(ids).to(dev)
        pads_t = torch.from_numpy(pads).to(dev)
        q = torch.arange(suffix, device=dev)
        pos = (prefix_len + q[None, :] - pads_t[:, None]).clamp_(min=0)
        k = torch.arange(slots, device=dev)
        kk = (k - prefix_len)[None, None, :]  # key index within the suffix
        real_key = (kk >= pads_t[:, None, None]) & (kk <= q[None, :, None])
        own = kk == q[None, :, None]
        mask = (k[None, None, :] < prefix_len) | ((kk >= 0) & (kk < suffix) & (real_key | own))
        cache.write_pos = torch.arange(prefix_len, prefix_len + suffix, device=dev)
        logits = self._forward(ids_t, pos, mask[:, None], cache).float()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_decode = time.perf_counter()
        self.stats["prefill_ms"] += int((t_decode - t_start) * 1000)

        # decode-state buffers
        slot.mask.copy_(mask[:, -1:, :][:, None])
        slot.pos.copy_(pos[:, -1:] + 1)
        cur = prefix_len + suffix

        grammars = [r.grammar for r in requests]
        constrained = [i for i, g in enumerate(grammars) if g is not None]
        matchers: list[Any] = [None] * n
        bitmask = bitmask_dev = None
        if constrained:
            import xgrammar as xgr

            for i in constrained:
                matchers[i] = grammar_matcher(grammars[i])
            words = math.ceil(self.vocab_size / 32)
            bitmask = torch.full((rows, words), -1, dtype=torch.int32)
            if dev.type == "cuda":
                bitmask = bitmask.pin_memory()
            batch = xgr.BatchGrammarMatcher()
            batch.batch_fill_next_token_bitmask([matchers[i] for i in constrained], bitmask, indices=constrained)
        temps = np.array([r.temperature for r in requests] + [0.0] * (rows - n))
        sample = bool((temps > 0).any())
        temps_t = torch.from_numpy(np.where(temps > 0, temps, 1.0)).to(dev, torch.float32)[:, None]
        ignore_eos = np.array([r.ignore_eos for r in requests])
        stop_np = self.stop_ids.numpy()

        out = np.full((n, steps), self.pad_id, dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        stopped = np.zeros(n, dtype=bool)
        count = np.zeros(n, dtype=np.int64)
        done_t = torch.zeros(rows, dtype=torch.bool, device=dev)
        host = torch.empty(rows, dtype=torch.long, pin_memory=dev.type == "cuda")
        done_host = torch.zeros(rows, dtype=torch.bool, pin_memory=dev.type == "cuda")
        event = torch.cuda.Event() if dev.type == "cuda" else None  # type: ignore[no-untyped-call]
        for t in range(steps):
            if bitmask is not None:
                bitmask_dev = bitmask.to(dev, non_blocking=True)
                allowed = ((bitmask_dev[:, :, None] >> self._shifts) & 1).view(rows, -1)[:, : logits.shape[-1]]
                logits.masked_fill_(allowed == 0, float("-inf"))
            if sample:
                probs = torch.softmax(logits / temps_t, dim=-1)
                drawn = torch.multinomial(probs, 1)[:, 0]
                greedy = logits.argmax(-1)
                tokens = torch.where(torch.from_numpy(temps > 0).to(dev), drawn, greedy)
            else:
                tokens = logits.argmax(-1)
            tokens = tokens.masked_fill_(done_t, self.pad_id)
            # state for step t+1, then launch it before waiting for the tokens on the host
            slot.ids.copy_(tokens[:, None])
            host.copy_(tokens, non_blocking=True)
            if event is not None:
                event.record()
            more = t + 1 < steps
            if more:
                slot.mask[:, :, :, cur] = True
                slot.step_pos.fill_(cur)
                next_logits = slot.step()
                slot.pos += 1
                cur += 1
            if event is not None:
                event.synchronize()
            tok = host.numpy()[:n].copy()
            live = ~done
            out[live, t] = tok[live]
            count[live] += 1
            hit_stop = live & np.isin(tok, stop_np) & ~ignore_eos
            if constrained:
                idx = [i for i in constrained if live[i] and not hit_stop[i]]
                if idx:
                    batch.batch_accept_token([matchers[i] for i in idx], tok[idx].tolist())
            stopped |= hit_stop
            done |= hit_stop | (count >= caps)
            self.stats["steps"] += 1
            if done.all() or not more:
                break
            done_host[:n] = torch.from_numpy(done)
            done_t = done_host.to(dev, non_blocking=True)
            if constrained:
                assert bitmask is not None
                bitmask.fill_(-1)
                idx = [i for i in constrained if not done[i]]
                if idx:
                    batch.batch_fill_next_token_bitmask([matchers[i] for i in idx], bitmask, indices=idx)
            logits = next_logits.float()
        self.stats["decode_ms"] += int((time.perf_counter() - t_decode) * 1000)
        results = []
        for i in range(n):
            kept = int(count[i]) - (1 if stopped[i] else 0)
            results.append(
                GenResult(
                    token_ids=out[i, :kept].tolist(),
                    finish_reason="stop" if stopped[i] else "length",
                    prompt_tokens=int(lens[i]),
                    completion_tokens=int(count[i]),
                )
            )
        return results


def _common_prefix(prompts: list[list[int]]) -> int:
    first = np.asarray(prompts[0])
    best = len(first)
    for p in prompts[1:]:
        m = min(best, len(p))
        if m == 0:
            return 0
        diff = np.nonzero(first[:m] != np.asarray(p[:m]))[0]
        best = int(diff[0]) if diff.size else m
    return best
