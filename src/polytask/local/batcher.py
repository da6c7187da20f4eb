"""Continuous batching for the local engine: which rows decode, which prompts join, when the bucket grows.

One :class:`Batcher` is one pass of :meth:`Engine.serve <polytask.local.engine.Engine.serve>`. Each loop turn it
admits waiting jobs into free rows (grouped by shared prefix, prefilled straight into their rows), then runs one
decode step for every row: pick the tokens (grammar masks applied), launch the next step on the device, and while
it runs record the tokens, finish rows whose answers are done, and fill the next grammar bitmasks.

The rows' state is a :class:`~polytask.local.rows.RowState` (every per-row array declared once, in
:data:`~polytask.local.rows.ROW_ARRAYS`); a bucket grown or compacted is copied by
:func:`~polytask.local.bucket.copy_rows`. The engine is reached only through :class:`BatchEngine` (what this module
uses of :class:`~polytask.local.engine.Engine`), so this module does not import :mod:`polytask.local.engine`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import numpy as np
import torch

from .bucket import Bucket, copy_rows
from .cache import RowView
from .grammar import accept_tokens
from .jobs import GenResult, Job, JobSource
from .rows import RowState

__all__ = ["BatchEngine", "Batcher", "bucket_rows"]


class BatchEngine(Protocol):
    """What a :class:`Batcher` uses of its engine (:class:`polytask.local.engine.Engine` is one): its settings,
    its buckets and kept prefixes, one forward pass, and its counters."""

    device: torch.device
    vocab_size: int
    grammar_vocab: int
    pad_id: int
    stop_ids: np.ndarray
    answer_ends: np.ndarray | None
    min_prefix: int
    admit_every: int
    admit_fraction: float
    shrink_below: int

    def bucket(self, rows: int, slots: int) -> Bucket: ...
    def drop_bucket(self, rows: int, slots: int) -> None: ...
    def prefix_kv(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]: ...
    def cached_prefix(self, prompts: list[list[int]]) -> int: ...
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor: ...
    def to_device(self, data: Any) -> torch.Tensor: ...
    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None: ...
    def add_time(self, what: str, seconds: float) -> None: ...
    def count(self, what: str, n: int = 1) -> None: ...


def bucket_rows(n: int) -> int:
    """Rows for n sequences: a power of two up to 64, then a multiple of 64."""
    return 1 << max(0, math.ceil(math.log2(n))) if n <= 64 else 64 * math.ceil(n / 64)


def round_up(n: int, k: int) -> int:
    return k * math.ceil(n / k)


class Batcher(RowState):
    """One pass of :meth:`Engine.serve`: the bucket in use and the state of every row (:class:`RowState`)."""

    def __init__(self, engine: BatchEngine, source: JobSource, max_rows: int, grammar_matcher: Any) -> None:
        self.words = math.ceil(engine.grammar_vocab / 32)
        self.pin = engine.device.type == "cuda"
        super().__init__(
            device=engine.device, pin=self.pin, vocab=engine.vocab_size, words=self.words, pad_id=engine.pad_id
        )
        self.e, self.source, self.max_rows, self.grammar_matcher = engine, source, max(1, max_rows), grammar_matcher
        self.bucket: Bucket | None = None
        self.joining: list[Job] = []
        self._batch_matcher: Any = None
        self._stop_only: np.ndarray | None = None  # every bit but the stop tokens' (uint32 words)
        self.since_admit = 0
        self.event = torch.cuda.Event() if self.pin else None  # type: ignore[no-untyped-call]

    def _move_to(self, rows: int, slots: int) -> None:
        """Use a ``(rows, slots)`` bucket, copying the rows in use into it (never shrinks)."""
        old = self.bucket
        if old is not None:
            rows, slots = max(rows, old.rows), max(slots, old.slots)
            if (rows, slots) == (old.rows, old.slots):
                return
            self.e.drop_bucket(old.rows, old.slots)  # its memory goes once the copy is done
        new = self.e.bucket(rows, slots)
        if old is not None:
            copy_rows(old, new)
            self.e.count("grown")
        else:  # a bucket kept from an earlier pass: free every row
            new.free_rows()
        self.bucket = new
        self.resize(rows, slots)

    def _compact(self) -> None:
        """Move the busy rows into the smallest bucket that holds them: when a batch has thinned out (long answers
        finishing after the short ones, nothing waiting), each step then computes only those rows."""
        old = self.bucket
        assert old is not None
        busy = [r for r in range(self.rows) if self.jobs[r] is not None]
        rows = bucket_rows(len(busy))
        if rows >= self.rows:  # only ever into a strictly smaller bucket (never copy a bucket onto itself)
            return
        new = self.e.bucket(rows, old.slots)  # the big bucket stays kept, for the next full batch
        index = self.e.to_device(busy)
        copy_rows(old, new, index)
        self.keep(busy, index, rows)
        self.bucket = new
        self.e.count("shrunk")

    # ---------------------------------------------------------------- admission
    def _want_admission(self, active: int) -> bool:
        free = self.rows - active
        if self.rows < self.max_rows and self.source.waiting() > free:
            return True
        if free == 0:
            return False
        return (
            active == 0 or free >= max(1, self.rows * self.e.admit_fraction) or self.since_admit >= self.e.admit_every
        )

    def _admit(self, active: int) -> None:
        e = self.e
        rows = max(self.rows, min(self.max_rows, bucket_rows(active + self.source.waiting())))
        jobs = []
        t_take = time.perf_counter()
        taken = self.source.take(rows - active)
        e.add_time("take", time.perf_counter() - t_take)
        for job in taken:
            if job.cancelled:  # cancelled between the queue and a row (e.g. the backend is closing)
                job.finish(GenResult([], "cancelled", len(job.request.prompt_ids)))
            else:
                jobs.append(job)
        if not jobs:
            return
        t0 = time.perf_counter()
        self.joining = jobs
        prompts = [j.request.prompt_ids for j in jobs]
        groups = self._groups(prompts)
        need = max(
            p + max(len(prompts[i]) - p for i in g) + max(max(1, jobs[i].request.max_new_tokens) for i in g)
            for p, g in groups
        )
        self._move_to(rows, round_up(need, 64))
        free = [r for r in range(self.rows) if self.jobs[r] is None]
        at = 0
        for prefix, members in groups:
            self._prefill(prefix, [jobs[i] for i in members], free[at : at + len(members)])
            at += len(members)
        self.joining = []
        self.since_admit = 0
        if self.pin:
            t_wait = time.perf_counter()
            torch.cuda.synchronize()
            e.add_time("prefill_wait", time.perf_counter() - t_wait)
        e.add_time("prefill", time.perf_counter() - t0)

    def _groups(self, prompts: list[list[int]]) -> list[tuple[int, list[int]]]:
        """Split the prompts into groups that share a prefix worth computing once: ``(prefix length, indices)``."""
        e = self.e
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        groups: list[tuple[int, list[int]]] = []
        members: list[int] = []
        shared = 0
        for i in order:
            if members:
                common = min(shared, _common_prefix([prompts[members[-1]], prompts[i]]))
                if common >= e.min_prefix:
                    members.append(i)
                    shared = common
                    continue
                groups.append((shared, members))
            members, shared = [i], len(prompts[i])
        groups.append((shared, members))
        out = []
        for shared, members in groups:
            group = [prompts[i] for i in members]
            cached = e.cached_prefix(group)
            if len(members) > 1:
                prefix = min(shared, min(len(p) for p in group) - 1)
                # a kept prefix that covers most of it is reused instead of computing a slightly longer one
                prefix = cached if cached >= e.min_prefix and cached >= 0.75 * prefix else prefix
            else:
                prefix = cached
            out.append((prefix if prefix >= e.min_prefix else 0, members))
        return out

    def _prefill(self, prefix_len: int, jobs: list[Job], rows: list[int]) -> None:
        e, bucket = self.e, self.bucket
        assert bucket is not None
        dev, n = e.device, len(jobs)
        prompts = [j.request.prompt_ids for j in jobs]
        lens = np.array([len(p) for p in prompts])
        suffix = int(lens.max()) - prefix_len
        width = prefix_len + suffix
        contiguous = rows == list(range(rows[0], rows[0] + n))
        index = e.to_device(rows)
        where: slice | torch.Tensor = slice(rows[0], rows[0] + n) if contiguous else index
        e.count("batches")
        e.count("rows", n)
        if prefix_len:
            e.count("prefix_tokens_saved", prefix_len * (n - 1))
            for layer, (k, v) in enumerate(e.prefix_kv(tuple(prompts[0][:prefix_len]))):
                for store, part in ((bucket.cache.keys[layer], k), (bucket.cache.values[layer], v)):
                    if contiguous:
                        store[where, :, :prefix_len] = part
                    else:
                        store[:, :, :prefix_len].index_copy_(0, index, part.expand(n, -1, -1, -1).contiguous())
        pads = suffix - (lens - prefix_len)
        ids = np.full((n, suffix), e.pad_id, dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, pads[i] :] = p[prefix_len:]
        pads_t = e.to_device(pads)
        q = torch.arange(suffix, device=dev)
        pos = (prefix_len + q[None, :] - pads_t[:, None]).clamp_(min=0)
        k = torch.arange(width, device=dev)
        kk = (k - prefix_len)[None, None, :]  # key index within the suffix
        real_key = (kk >= pads_t[:, None, None]) & (kk <= q[None, :, None])
        own = kk == q[None, :, None]  # a pad query sees itself, so no softmax row is empty
        mask = (k[None, None, :] < prefix_len) | ((kk >= 0) & (real_key | own))
        logits = e.forward(e.to_device(ids), pos, mask[:, None], RowView(bucket.cache, where, prefix_len, width))
        # decode state of the new rows
        row_mask = torch.zeros((n, 1, 1, bucket.slots), dtype=torch.bool, device=dev)
        row_mask[:, 0, 0, :width] = mask[:, -1, :]
        bucket.mask.index_copy_(0, index, row_mask)
        bucket.cols.index_fill_(0, index, width)
        bucket.pos.index_copy_(0, index, pos[:, -1:] + 1)
        self.logits.index_copy_(0, index, logits.float())
        if self.seen is None and any(j.request.repetition_penalty != 1 for j in jobs):
            self.make("seen")
        self.join(rows, index, jobs, e.to_device)
        constrained = []
        t_grammar = time.perf_counter()
        for r, j in zip(rows, jobs, strict=True):
            if j.request.grammar is not None:
                if self.grammar_matcher is None:
                    raise ValueError("a request has a grammar but no grammar_matcher was given")
                self.matchers[r] = self.grammar_matcher(j.request.grammar)
                constrained.append(r)
        if constrained:
            self._fill(constrained)
        e.add_time("grammar", time.perf_counter() - t_grammar)

    # ---------------------------------------------------------------- grammar
    def _fill(self, rows: list[int]) -> None:
        import xgrammar as xgr

        if self.bitmask is None:
            self.make("bitmask")
            assert self.bitmask is not None
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher()
        self._batch_matcher.batch_fill_next_token_bitmask([self.matchers[r] for r in rows], self.bitmask, indices=rows)

    # ---------------------------------------------------------------- the loop
    def loop(self) -> None:
        while True:
            active = sum(j is not None for j in self.jobs)
            if self.source.waiting() and self._want_admission(active):
                self._admit(active)
                active = sum(j is not None for j in self.jobs)
            if active == 0:
                if self.source.waiting() == 0 and self.source.idle():
                    return
                continue
            shrink = self.e.shrink_below
            if shrink and bucket_rows(active) * shrink <= self.rows and not self.source.waiting():
                self._compact()
            t0 = time.perf_counter()
            self._step()
            self.e.add_time("decode", time.perf_counter() - t0)

    def _step(self) -> None:
        """Pick every busy row's next token, launch the next decode step, then (while it runs) record the tokens,
        finish rows and fill the next bitmasks."""
        e, bucket, logits = self.e, self.bucket, self.logits
        assert bucket is not None
        dev = e.device
        jobs = self.jobs
        busy = np.array([j is not None for j in jobs])
        constrained = [r for r in range(self.rows) if busy[r] and self.matchers[r] is not None]
        if self.seen is not None and (self.penalties[busy] != 1).any():
            pen = self.penalty_t
            logits = torch.where(self.seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
        if constrained:
            assert self.bitmask is not None
            e.apply_bitmask(logits, self.bitmask.to(dev, non_blocking=True), constrained)
        if (self.temps[busy] > 0).any():
            # max-shifted, so a tiny temperature cannot overflow; rows not sampled get a harmless uniform row
            scaled = (logits - logits.amax(-1, keepdim=True)) / self.temps_t
            scaled = torch.where(self.sampled_t[:, None], scaled, 0.0)
            drawn = torch.multinomial(torch.softmax(scaled, dim=-1), 1)[:, 0]
            tokens = torch.where(self.sampled_t, drawn, logits.argmax(-1))
        else:
            tokens = logits.argmax(-1)
        bucket.ids.copy_(tokens[:, None])
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        self.host.copy_(tokens, non_blocking=True)
        if self.event is not None:
            self.event.record()
        next_logits = bucket.step()  # runs on the device while the host does the rest
        if self.event is not None:
            t_wait = time.perf_counter()
            self.event.synchronize()
            e.add_time("wait", time.perf_counter() - t_wait)
        e.count("steps")
        self.since_admit += 1
        tok = self.host.numpy()
        rows = np.flatnonzero(busy)
        self.out[rows, self.count[rows]] = tok[rows]
        self.count[rows] += 1
        hit_stop = busy & np.isin(tok, e.stop_ids) & ~self.ignore
        for r in rows.tolist():
            job = jobs[r]
            if job is not None and job.cancelled:
                job.finish(self._result(r, "cancelled"))
                jobs[r] = None
                self.matchers[r] = None
        going = [r for r in constrained if jobs[r] is not None and not hit_stop[r]]
        complete = np.zeros_like(hit_stop)
        if going:
            t_grammar = time.perf_counter()
            accept_tokens([self.matchers[r] for r in going], tok[going].tolist())
            self._fill(going)
            complete[self._completed(going, tok)] = True
            e.add_time("grammar", time.perf_counter() - t_grammar)
        done = busy & (hit_stop | complete | (self.count >= self.caps))
        for r in np.flatnonzero(done).tolist():
            job = jobs[r]
            if job is None:  # cancelled above
                continue
            if hit_stop[r]:
                job.finish(self._result(r, "stop", drop_last=True))
            else:
                job.finish(self._result(r, "stop" if complete[r] else "length"))
            jobs[r] = None
            self.matchers[r] = None
        self.logits = next_logits.float()

    def _completed(self, rows: list[int], tok: np.ndarray) -> list[int]:
        """The constrained rows whose answer is complete: the grammar is matched and allows nothing but a stop
        token next. They finish now instead of spending a decode step on the stop token, and an answer that
        completes on its last allowed token is whole ("stop"), not cut off ("length").

        Only rows whose last token could close an answer (``Engine.answer_ends``, when known) are asked."""
        ends = self.e.answer_ends
        candidates = [r for r in rows if ends is None or (tok[r] < len(ends) and ends[tok[r]])]
        if not candidates:
            return []
        assert self.bitmask is not None
        if self._stop_only is None:
            only = np.zeros(self.words, dtype=np.uint32)
            for t in self.e.stop_ids.tolist():
                if t < self.words * 32:
                    only[t // 32] |= np.uint32(1 << (t % 32))
            self._stop_only = ~only
        masks = self.bitmask.numpy().view(np.uint32)
        return [
            r
            for r in candidates
            if self.matchers[r].is_completed() and not (masks[r] & self._stop_only).any() and not self.ignore[r]
        ]

    def _result(self, r: int, reason: str, drop_last: bool = False) -> GenResult:
        """Row ``r``'s answer; ``drop_last``: its last token is the stop token, not part of the answer."""
        kept = int(self.count[r]) - (1 if drop_last else 0)
        return GenResult(
            token_ids=self.out[r, :kept].tolist(),
            finish_reason=reason,
            prompt_tokens=int(self.prompt_len[r]),
            completion_tokens=int(self.count[r]),
        )

    def fail(self, exc: BaseException) -> None:
        """Hand ``exc`` to every job in a row or being admitted."""
        jobs = {id(j): j for j in [*self.jobs, *self.joining] if j is not None}
        for job in jobs.values():
            job.finish(exc)
        self.jobs = [None] * self.rows
        self.joining = []


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
