"""Continuous batching for the local engine: which rows decode, which prompts join, when the bucket grows.

One :class:`Batcher` is one pass of :meth:`Engine.serve <polytask.local.engine.Engine.serve>`. Each loop turn it
admits waiting jobs into free rows (grouped by shared prefix, prefilled straight into their rows), then runs one
decode step for every row: pick the tokens (grammar masks applied), launch the next step on the device, and while
it runs record the tokens, finish rows whose answers are done, and fill the next grammar bitmasks.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .cache import RowView
from .grammar import accept_tokens
from .jobs import GenResult, Job, JobSource

if TYPE_CHECKING:
    from .engine import Engine, _Bucket

__all__ = ["Batcher"]


def bucket_rows(n: int) -> int:
    """Rows for n sequences: a power of two up to 64, then a multiple of 64."""
    return 1 << max(0, math.ceil(math.log2(n))) if n <= 64 else 64 * math.ceil(n / 64)


def round_up(n: int, k: int) -> int:
    return k * math.ceil(n / k)


class Batcher:
    """One pass of :meth:`Engine.serve`: the bucket in use and the host-side state of every row."""

    def __init__(self, engine: Engine, source: JobSource, max_rows: int, grammar_matcher: Any) -> None:
        self.e, self.source, self.max_rows, self.grammar_matcher = engine, source, max(1, max_rows), grammar_matcher
        self.bucket: _Bucket | None = None
        self.rows = 0
        self.jobs: list[Job | None] = []
        self.matchers: list[Any] = []  # xgrammar matchers of constrained rows
        self.joining: list[Job] = []
        self.words = math.ceil(engine.grammar_vocab / 32)
        self._batch_matcher: Any = None
        self._stop_only: np.ndarray | None = None  # every bit but the stop tokens' (uint32 words)
        self.since_admit = 0
        self.pin = engine.device.type == "cuda"
        self.event = torch.cuda.Event() if self.pin else None  # type: ignore[no-untyped-call]
        # per-row host state
        self.count = np.zeros(0, dtype=np.int64)  # tokens generated
        self.caps = np.zeros(0, dtype=np.int64)  # max_new_tokens
        self.prompt_len = np.zeros(0, dtype=np.int64)
        self.ignore = np.zeros(0, dtype=bool)  # ignore_eos
        self.temps = np.zeros(0, dtype=np.float64)
        self.penalties = np.ones(0, dtype=np.float64)  # repetition penalties (1 = off)
        self.out = np.zeros((0, 0), dtype=np.int64)  # the tokens so far
        self.host = torch.empty(0, dtype=torch.long)  # where each step's tokens land (pinned on CUDA)
        # per-row device state
        dev = engine.device
        self.temps_t = torch.ones((0, 1), dtype=torch.float32, device=dev)  # temperatures (1 for greedy rows)
        self.sampled_t = torch.zeros(0, dtype=torch.bool, device=dev)  # temperature > 0
        self.logits = torch.zeros((0, engine.vocab_size), dtype=torch.float32, device=dev)  # the next token's
        self.bitmask: torch.Tensor | None = None  # (rows, words) int32 grammar masks, host (pinned on CUDA)
        self.penalty_t = torch.ones((0, 1), dtype=torch.float32, device=dev)
        self.seen: torch.Tensor | None = None  # (rows, vocab) bool: tokens each answer generated, once penalised

    def _resize(self, rows: int, slots: int) -> None:
        """Grow the per-row state to ``rows`` rows (and the token buffer to ``slots`` columns), keeping it."""
        grow = rows - self.rows

        def grown(a: Any, fill: Any, width: int | None = None, **kw: Any) -> Any:
            shape = (rows, *a.shape[1:]) if width is None else (rows, width)
            if isinstance(a, np.ndarray):
                new: Any = np.full(shape, fill, dtype=a.dtype)
            else:
                new = torch.full(shape, fill, dtype=a.dtype, device=a.device, **kw)
            new[tuple(slice(0, n) for n in a.shape)] = a
            return new

        self.count, self.caps, self.prompt_len = grown(self.count, 0), grown(self.caps, 0), grown(self.prompt_len, 0)
        self.ignore, self.temps = grown(self.ignore, False), grown(self.temps, 0.0)
        self.penalties, self.penalty_t = grown(self.penalties, 1.0), grown(self.penalty_t, 1.0)
        if self.seen is not None:
            self.seen = grown(self.seen, False)
        self.out = grown(self.out, self.e.pad_id, width=slots)
        self.jobs += [None] * grow
        self.matchers += [None] * grow
        self.host = torch.empty(rows, dtype=torch.long, pin_memory=self.pin)
        self.temps_t, self.sampled_t = grown(self.temps_t, 1.0), grown(self.sampled_t, False)
        self.logits = grown(self.logits, 0.0)
        if self.bitmask is not None:
            self.bitmask = grown(self.bitmask, -1, pin_memory=self.pin)
        self.rows = rows

    def _move_to(self, rows: int, slots: int) -> None:
        """Use a ``(rows, slots)`` bucket, copying the rows in use into it (never shrinks)."""
        old = self.bucket
        if old is not None:
            rows, slots = max(rows, old.rows), max(slots, old.slots)
            if (rows, slots) == (old.rows, old.slots):
                return
            self.e._buckets.pop((old.rows, old.slots), None)  # its memory goes once the copy is done
        new = self.e._bucket(rows, slots)
        if old is not None:
            r, s = old.rows, old.slots
            for store_new, store_old in zip(
                new.cache.keys + new.cache.values, old.cache.keys + old.cache.values, strict=True
            ):
                store_new[:r, :, :s].copy_(store_old)
            new.mask.zero_()
            new.mask[:r, :, :, :s].copy_(old.mask)
            new.mask[r:, ..., 0] = True
            new.ids[:r].copy_(old.ids)
            new.pos[:r].copy_(old.pos)
            new.cols[:r].copy_(old.cols)
            new.cols[r:] = 0
            self.e.stats["grown"] += 1
        else:  # a bucket kept from an earlier pass: free every row
            new.mask.zero_()
            new.mask[..., 0] = True
            new.cols.zero_()
            new.pos.zero_()
        self.bucket = new
        self._resize(rows, slots)

    def _compact(self) -> None:
        """Move the busy rows into the smallest bucket that holds them: when a batch has thinned out (long answers
        finishing after the short ones, nothing waiting), each step then computes only those rows."""
        old = self.bucket
        assert old is not None
        busy = [r for r in range(self.rows) if self.jobs[r] is not None]
        n, rows = len(busy), bucket_rows(len(busy))
        if rows >= self.rows:  # only ever into a strictly smaller bucket (never copy a bucket onto itself)
            return
        new = self.e._bucket(rows, old.slots)  # the big bucket stays kept, for the next full batch
        index = self.e.to_device(busy)
        for store_new, store_old in zip(
            new.cache.keys + new.cache.values, old.cache.keys + old.cache.values, strict=True
        ):
            store_new[:n].copy_(store_old.index_select(0, index))
        new.mask.zero_()
        new.mask[..., 0] = True
        new.mask[:n].copy_(old.mask.index_select(0, index))
        for buf in ("ids", "pos", "cols"):
            getattr(new, buf).zero_()
            getattr(new, buf)[:n].copy_(getattr(old, buf).index_select(0, index))

        def pick(a: Any, fill: Any, **kw: Any) -> Any:
            if isinstance(a, np.ndarray):
                out: Any = np.full((rows, *a.shape[1:]), fill, dtype=a.dtype)
                out[:n] = a[busy]
            else:
                out = torch.full((rows, *a.shape[1:]), fill, dtype=a.dtype, device=a.device, **kw)
                out[:n] = a.index_select(0, index.to(a.device))
            return out

        self.count, self.caps, self.prompt_len = pick(self.count, 0), pick(self.caps, 0), pick(self.prompt_len, 0)
        self.ignore, self.temps, self.out = pick(self.ignore, False), pick(self.temps, 0.0), pick(self.out, 0)
        self.penalties, self.penalty_t = pick(self.penalties, 1.0), pick(self.penalty_t, 1.0)
        if self.seen is not None:
            self.seen = pick(self.seen, False)
        self.temps_t, self.sampled_t, self.logits = (
            pick(self.temps_t, 1.0),
            pick(self.sampled_t, False),
            pick(self.logits, 0.0),
        )
        if self.bitmask is not None:
            self.bitmask = pick(self.bitmask, -1, pin_memory=self.pin)
        self.jobs = [self.jobs[r] for r in busy] + [None] * (rows - n)
        self.matchers = [self.matchers[r] for r in busy] + [None] * (rows - n)
        self.host = torch.empty(rows, dtype=torch.long, pin_memory=self.pin)
        self.bucket, self.rows = new, rows
        self.e.stats["shrunk"] += 1

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
            cached = e._cached_prefix(group)
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
        e.stats["batches"] += 1
        e.stats["rows"] += n
        if prefix_len:
            e.stats["prefix_tokens_saved"] += prefix_len * (n - 1)
            for layer, (k, v) in enumerate(e._prefix_kv(tuple(prompts[0][:prefix_len]))):
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
        logits = e._call(e.to_device(ids), pos, mask[:, None], RowView(bucket.cache, where, prefix_len, width))
        # decode state of the new rows
        row_mask = torch.zeros((n, 1, 1, bucket.slots), dtype=torch.bool, device=dev)
        row_mask[:, 0, 0, :width] = mask[:, -1, :]
        bucket.mask.index_copy_(0, index, row_mask)
        bucket.cols.index_fill_(0, index, width)
        bucket.pos.index_copy_(0, index, pos[:, -1:] + 1)
        self.logits.index_copy_(0, index, logits.float())
        temps = np.array([j.request.temperature for j in jobs], dtype=np.float64)
        self.temps_t.index_copy_(0, index, e.to_device(np.where(temps > 0, temps, 1.0).astype(np.float32))[:, None])
        self.sampled_t.index_copy_(0, index, e.to_device(temps > 0))
        penalties = np.array([j.request.repetition_penalty for j in jobs], dtype=np.float64)
        self.penalties[rows] = penalties
        self.penalty_t.index_copy_(0, index, e.to_device(penalties.astype(np.float32))[:, None])
        if self.seen is None and (penalties != 1).any():
            self.seen = torch.zeros((self.rows, e.vocab_size), dtype=torch.bool, device=dev)
        if self.seen is not None:
            self.seen.index_fill_(0, index, False)
        constrained = []
        t_grammar = time.perf_counter()
        for r, j, length in zip(rows, jobs, lens, strict=True):
            req = j.request
            self.jobs[r] = j
            self.count[r] = 0
            self.caps[r] = max(1, req.max_new_tokens)
            self.prompt_len[r] = length
            self.ignore[r] = req.ignore_eos
            self.temps[r] = req.temperature
            self.matchers[r] = None
            if req.grammar is not None:
                if self.grammar_matcher is None:
                    raise ValueError("a request has a grammar but no grammar_matcher was given")
                self.matchers[r] = self.grammar_matcher(req.grammar)
                constrained.append(r)
            elif self.bitmask is not None:
                self.bitmask[r] = -1
        if constrained:
            self._fill(constrained)
        e.add_time("grammar", time.perf_counter() - t_grammar)

    # ---------------------------------------------------------------- grammar
    def _fill(self, rows: list[int]) -> None:
        import xgrammar as xgr

        if self.bitmask is None:
            self.bitmask = torch.full((self.rows, self.words), -1, dtype=torch.int32, pin_memory=self.pin)
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
        e.stats["steps"] += 1
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
