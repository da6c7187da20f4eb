"""The engine's key/value cache and attention: a preallocated per-row cache (:class:`SlotCache`), a view of some of
its rows for prefills (:class:`RowView`), and grouped-query attention without repeated keys / values."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.attention

__all__ = ["RowView", "SlotCache", "engine_attention"]


class SlotCache:
    """A preallocated key/value cache (duck-types transformers' ``Cache.update``; works on transformers 5.17 and
    5.23, whose own static caches differ).

    Writes go to the columns :attr:`write_pos` names (the same for every row: prefixes), or, when
    :attr:`write_cols` is set, to one column per row (decode steps: ``write_cols[r]`` for row r).

    Args:
        layers, rows, heads, slots, head_dim: the cache shape per layer is ``(rows, heads, slots, head_dim)``.
    """

    is_compileable = False

    def __init__(self, layers: int, rows: int, heads: int, slots: int, head_dim: int, *, dtype: Any, device: Any):
        shape = (rows, heads, slots, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.write_cols: torch.Tensor | None = None
        self.rows, self.slots = rows, slots

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write_cols is not None:
            index = self.write_cols.view(-1, 1, 1, 1).expand_as(key)
            self.keys[layer_idx].scatter_(2, index, key)
            self.values[layer_idx].scatter_(2, index, value)
        else:
            self.keys[layer_idx].index_copy_(2, self.write_pos, key)
            self.values[layer_idx].index_copy_(2, self.write_pos, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.slots, 0


class RowView:
    """Rows ``rows`` (a slice or an index tensor) of a :class:`SlotCache`, columns ``[0, width)``; a prefill writes
    columns ``[start, width)`` and attends to all of them."""

    is_compileable = False

    def __init__(self, cache: SlotCache, rows: slice | torch.Tensor, start: int, width: int) -> None:
        self.cache, self.rows, self.start, self.width = cache, rows, start, width

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for store, new in ((self.cache.keys[layer_idx], key), (self.cache.values[layer_idx], value)):
            if isinstance(self.rows, slice):
                view = store[self.rows, :, : self.width]
                view[:, :, self.start :] = new
                out.append(view)
            else:
                store[:, :, self.start : self.width].index_copy_(0, self.rows, new)
                out.append(store[:, :, : self.width].index_select(0, self.rows))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.width, 0


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
    causal = mask is None and q > 1 and g == 1
    if q > 1 and qf.is_cuda:  # a prefill: not cuDNN (see _PREFILL_BACKENDS)
        with torch.nn.attention.sdpa_kernel(_PREFILL_BACKENDS):
            out = torch.nn.functional.scaled_dot_product_attention(
                qf, key, value, attn_mask=mask, scale=scaling, is_causal=causal
            )
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            qf, key, value, attn_mask=mask, scale=scaling, is_causal=causal
        )
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous(), None


_PREFILL_BACKENDS = [
    torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    torch.nn.attention.SDPBackend.MATH,
]
"""SDPA kernels for prefills (masked, new shapes every admission). On the H200 (torch 2.11 + cu130) SDPA picked cuDNN,
whose host side took ≈ 2 ms per layer call (0.9 s of the engine thread's 4.2 s for 4,096 constrained answers,
``benchmarks/local_throughput.py`` under cProfile): a new plan for every new shape. Decode steps keep SDPA's own
choice (their shapes are fixed and replayed as CUDA graphs)."""


def register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(_ATTN, _gqa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN, sdpa_mask)
        return True
    except (ImportError, AttributeError):  # pragma: no cover - older transformers: keep sdpa
        return False


class engine_attention:
    """Switch the engine's model to :func:`_gqa_attention` for the calls inside (when ``engine.gqa``)."""

    def __init__(self, engine: Any) -> None:
        self.config = engine.config
        self.on = engine.gqa

    def __enter__(self) -> None:
        if self.on:
            self.saved = self.config._attn_implementation
            self.config._attn_implementation = _ATTN

    def __exit__(self, *exc: object) -> None:
        if self.on:
            self.config._attn_implementation = self.saved
