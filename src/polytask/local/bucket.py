"""A ``(rows, slots)`` bucket of the local engine: its key/value cache, the per-row decode state on the device and (on
CUDA) the captured decode step; and :func:`copy_rows`, the one copy of a bucket's rows into another (a bucket grown,
or the busy rows compacted into a smaller one).

A bucket asks its engine only for what :class:`BucketEngine` names (the model, its shape, the graph memory pool), so
this module imports nothing of :mod:`polytask.local.engine`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .cache import SlotCache, engine_attention

__all__ = ["Bucket", "BucketEngine", "copy_rows"]


class BucketEngine(Protocol):
    """What a :class:`Bucket` uses of its engine (:class:`polytask.local.engine.Engine` is one)."""

    model: Any
    config: Any
    device: torch.device
    dtype: torch.dtype
    kv_heads: int
    head_dim: int
    max_position: int
    takes_cache_position: bool
    gqa: bool
    graph_pool: Any
    """The memory pool every captured decode graph shares (None until the first capture)."""


class Bucket:
    """A ``(rows, slots)`` bucket: its cache, the per-row step state and (on CUDA) the captured decode graph.

    Per-row state on the device: ``ids`` (the token fed next), ``pos`` (its position id), ``cols`` (the cache
    column it is written to) and ``mask`` (which columns the row attends to).
    """

    def __init__(self, engine: BucketEngine, rows: int, slots: int) -> None:
        cfg, dev = engine.config, engine.device
        self.rows, self.slots = rows, slots
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
        self.cols = torch.zeros(rows, dtype=torch.long, device=dev)
        self.mask = torch.zeros((rows, 1, 1, slots), dtype=torch.bool, device=dev)
        self.mask[..., 0] = True  # never an all-hidden row (a softmax over nothing is NaN)
        self.logits: torch.Tensor | None = None
        self.graph: Any = None
        self.engine = engine

    def free_rows(self, start: int = 0) -> None:
        """Mark rows ``start`` and after free: they attend to column 0 only, and feed token 0 at position 0 into
        column 0 (their keys / values stay; the mask hides them)."""
        self.mask[start:].zero_()
        self.mask[start:, ..., 0] = True
        for buf in (self.ids, self.pos, self.cols):
            buf[start:].zero_()

    def forward(self) -> torch.Tensor:
        with engine_attention(self.engine):
            return self._forward()

    def _forward(self) -> torch.Tensor:
        e = self.engine
        self.mask.scatter_(3, self.cols.view(-1, 1, 1, 1), True)
        self.cache.write_cols = self.cols
        kwargs: dict[str, Any] = {}
        if e.takes_cache_position:
            kwargs["cache_position"] = self.cols[:1]
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
        """Capture the decode step as a CUDA graph (before any row is in use: it writes column 0 of every row)."""
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
        """One decode step for every row; then advances ``pos`` and ``cols``. Returns ``(rows, vocab)`` logits
        (on CUDA a buffer the next step overwrites)."""
        if self.graph is not None:
            self.graph.replay()
            assert self.logits is not None
            logits = self.logits
        else:
            logits = self.forward()
        self.pos.add_(1).clamp_(max=self.engine.max_position - 1)  # free rows stay within learned position tables
        self.cols.add_(1).clamp_(max=self.slots - 1)  # free rows keep writing their last column
        return logits


def copy_rows(src: Bucket, dst: Bucket, index: torch.Tensor | None = None) -> None:
    """Copy rows of ``src`` into the first rows of ``dst``: all of them (a bucket grown: ``dst`` has at least as
    many rows and slots), or those ``index`` names, in its order (the busy rows compacted into a smaller bucket).
    Copies each row's keys / values (into ``dst``'s first ``src.slots`` columns), mask, next token, position and
    write column; ``dst``'s other rows are made free (:meth:`Bucket.free_rows`)."""

    def rows_of(t: torch.Tensor) -> torch.Tensor:
        return t if index is None else t.index_select(0, index)

    n, s = (src.rows if index is None else len(index)), src.slots
    for store_dst, store_src in zip(dst.cache.keys + dst.cache.values, src.cache.keys + src.cache.values, strict=True):
        store_dst[:n, :, :s].copy_(rows_of(store_src))
    dst.free_rows()
    dst.mask[:n, :, :, :s].copy_(rows_of(src.mask))
    for buf_dst, buf_src in ((dst.ids, src.ids), (dst.pos, src.pos), (dst.cols, src.cols)):
        buf_dst[:n].copy_(rows_of(buf_src))
