"""The per-row state of a batch, declared once: :data:`ROW_ARRAYS` lists every array that has one entry per row of
the bucket (its fill for a free row, where it lives, its dtype and width, and what a newly admitted row gets), and
:class:`RowState` makes, grows, compacts and admits into all of them from that table. Adding a per-row array is one
line in the table (plus its typed attribute on :class:`RowState`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .jobs import Job

__all__ = ["PAD", "ROW_ARRAYS", "RowArray", "RowState"]

PAD = "pad"
"""A :attr:`RowArray.fill` that stands for the engine's pad token id."""


@dataclass(frozen=True)
class RowArray:
    """One per-row array.

    Attributes:
        name: the :class:`RowState` attribute that holds it.
        where: ``"list"`` (a Python list), ``"host"`` (numpy), ``"pinned"`` (torch on the host, pinned memory on
            CUDA: device-to-host and host-to-device copies that do not block) or ``"device"`` (torch on the
            engine's device).
        dtype: numpy dtype (host) or torch dtype (pinned, device); None for lists.
        fill: a free row's value (:data:`PAD`: the engine's pad token id).
        width: None: one value a row; an int, or ``"slots"`` / ``"vocab"`` / ``"words"`` (the bucket's slots, the
            logits' width, the grammar bitmask's int32 words): that many values a row.
        lazy: None until :meth:`RowState.make` makes it (only batches that need it pay for it).
        joined: what a newly admitted row gets (:meth:`RowState.join`): a function of its job, ``"fill"`` (the
            free row's value), or None (the batcher sets it itself, or a stale value is never read).
    """

    name: str
    where: Literal["list", "host", "pinned", "device"]
    dtype: Any
    fill: Any
    width: int | str | None = None
    lazy: bool = False
    joined: Callable[[Job], Any] | Literal["fill"] | None = None


def _sampling_temperature(job: Job) -> float:
    t = job.request.temperature
    return t if t > 0 else 1.0  # greedy rows divide by 1 (their scaled logits are not used)


ROW_ARRAYS: tuple[RowArray, ...] = (
    RowArray("jobs", "list", None, None, joined=lambda j: j),  # the job in the row; None: the row is free
    RowArray("matchers", "list", None, None, joined="fill"),  # xgrammar matchers (constrained rows; set on admission)
    RowArray("count", "host", np.int64, 0, joined="fill"),  # tokens generated
    RowArray("caps", "host", np.int64, 0, joined=lambda j: max(1, j.request.max_new_tokens)),
    RowArray("prompt_len", "host", np.int64, 0, joined=lambda j: len(j.request.prompt_ids)),
    RowArray("ignore", "host", bool, False, joined=lambda j: j.request.ignore_eos),  # ignore_eos
    RowArray("temps", "host", np.float64, 0.0, joined=lambda j: j.request.temperature),
    RowArray("penalties", "host", np.float64, 1.0, joined=lambda j: j.request.repetition_penalty),  # 1 = off
    # The answer's tokens so far: only the first count[r] are ever read. Free and grown-into cells hold the pad id
    # (one fill everywhere, so a stale cell reads as padding, never as a real token).
    RowArray("out", "host", np.int64, PAD, width="slots"),
    RowArray("host", "pinned", torch.long, 0),  # where each step's tokens land (scratch: every step overwrites it)
    RowArray("bitmask", "pinned", torch.int32, -1, width="words", lazy=True, joined="fill"),  # grammar masks
    RowArray("temps_t", "device", torch.float32, 1.0, width=1, joined=_sampling_temperature),
    RowArray("sampled_t", "device", torch.bool, False, joined=lambda j: j.request.temperature > 0),
    RowArray("penalty_t", "device", torch.float32, 1.0, width=1, joined=lambda j: j.request.repetition_penalty),
    RowArray("logits", "device", torch.float32, 0.0, width="vocab"),  # the next token's (set by the prefill)
    RowArray("seen", "device", torch.bool, False, width="vocab", lazy=True, joined="fill"),  # tokens generated
)
"""Every per-row array of a batch (see :class:`RowArray`)."""


class RowState:
    """The arrays of :data:`ROW_ARRAYS` for ``rows`` rows, as attributes of the same names.

    Args:
        device: the engine's device (``"device"`` arrays).
        pin: pin ``"pinned"`` arrays (on CUDA).
        vocab: the logits' width.
        words: the grammar bitmask's width in int32 words.
        pad_id: the value :data:`PAD` stands for.
    """

    jobs: list[Job | None]
    matchers: list[Any]
    count: np.ndarray
    caps: np.ndarray
    prompt_len: np.ndarray
    ignore: np.ndarray
    temps: np.ndarray
    penalties: np.ndarray
    out: np.ndarray
    host: torch.Tensor
    bitmask: torch.Tensor | None
    temps_t: torch.Tensor
    sampled_t: torch.Tensor
    penalty_t: torch.Tensor
    logits: torch.Tensor
    seen: torch.Tensor | None

    def __init__(self, *, device: torch.device, pin: bool, vocab: int, words: int, pad_id: int) -> None:
        self.device, self.pin, self.pad_id = device, pin, pad_id
        self.widths = {"vocab": vocab, "words": words, "slots": 0}
        self.rows = 0
        for spec in ROW_ARRAYS:
            setattr(self, spec.name, None if spec.lazy else self._new(spec, 0))

    def _free_value(self, spec: RowArray) -> Any:
        return self.pad_id if spec.fill is PAD else spec.fill

    def _new(self, spec: RowArray, rows: int) -> Any:
        """``spec``'s array for ``rows`` free rows."""
        fill = self._free_value(spec)
        if spec.where == "list":
            return [fill] * rows
        width = self.widths[spec.width] if isinstance(spec.width, str) else spec.width
        shape = (rows,) if width is None else (rows, width)
        if spec.where == "host":
            return np.full(shape, fill, dtype=spec.dtype)
        if spec.where == "pinned":
            return torch.full(shape, fill, dtype=spec.dtype, pin_memory=self.pin)
        return torch.full(shape, fill, dtype=spec.dtype, device=self.device)

    def make(self, name: str) -> None:
        """Make the lazy array ``name`` (every row free)."""
        (spec,) = (s for s in ROW_ARRAYS if s.name == name)
        setattr(self, name, self._new(spec, self.rows))

    def resize(self, rows: int, slots: int) -> None:
        """Grow every array to ``rows`` rows (and ``"slots"`` widths to ``slots``), keeping its contents."""
        self.widths["slots"] = slots
        for spec in ROW_ARRAYS:
            old = getattr(self, spec.name)
            if old is None:
                continue
            new = self._new(spec, rows)
            if spec.where == "list":
                new[: len(old)] = old
            else:
                new[tuple(slice(0, n) for n in old.shape)] = old
            setattr(self, spec.name, new)
        self.rows = rows

    def keep(self, busy: list[int], index: torch.Tensor, rows: int) -> None:
        """Keep only rows ``busy`` (``index``: the same on the device), as the first of ``rows`` rows."""
        n = len(busy)
        for spec in ROW_ARRAYS:
            old = getattr(self, spec.name)
            if old is None:
                continue
            new = self._new(spec, rows)
            if spec.where == "list":
                new[:n] = [old[r] for r in busy]
            elif spec.where == "host":
                new[:n] = old[busy]
            else:
                new[:n] = old.index_select(0, index.to(old.device))
            setattr(self, spec.name, new)
        self.rows = rows

    def join(self, rows: list[int], index: torch.Tensor, jobs: list[Job], to_device: Callable[[Any], Any]) -> None:
        """Set rows ``rows`` (``index``: the same on the device) to what newly admitted ``jobs`` get (each array's
        :attr:`RowArray.joined`); ``to_device`` uploads a host tensor without blocking."""
        for spec in ROW_ARRAYS:
            a, joined = getattr(self, spec.name), spec.joined
            if a is None or joined is None:
                continue
            if isinstance(joined, str):  # "fill": a free row's value
                fill = self._free_value(spec)
                if spec.where == "list":
                    for r in rows:
                        a[r] = fill
                elif spec.where == "host":
                    a[rows] = fill
                else:
                    a.index_fill_(0, index if a.device == index.device else torch.tensor(rows), fill)
                continue
            values = [joined(job) for job in jobs]
            if spec.where == "list":
                for r, value in zip(rows, values, strict=True):
                    a[r] = value
            elif spec.where == "host":
                a[rows] = values
            else:
                a.index_copy_(0, index, to_device(torch.tensor(values, dtype=spec.dtype).view(len(jobs), *a.shape[1:])))
