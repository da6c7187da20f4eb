"""What the OpenAI backend learns, during a run, of a server that is only partly OpenAI-compatible.

- :class:`StructuredModes`: which ``response_format`` each task's calls use. A task starts in the configured mode
  and moves to a simpler one (``json_schema`` → ``json_object`` → ``none``) on a capability answer: a 400 naming
  ``response_format``, or a failure (any status but 401, 403, 404, 429) that repeats identically for the task's
  mode before that mode ever answered, while the same request in a simpler mode succeeds (the probe: one per task
  at a time; calls of the task that fail meanwhile wait for it, then go in the mode it found). A failure the
  simpler modes meet too is an outage, not a capability: the task keeps its mode, and the next probe waits for
  twice as many identical failures. A mode that answered once is kept for the run: later failures are transient.
- :class:`CapField`: which request field carries the completion cap, ``max_completion_tokens`` (OpenAI's current
  name) or ``max_tokens`` (older servers, llama.cpp, Ollama, many gateways); with ``"auto"`` it switches once to
  ``max_tokens`` when an answer runs past the cap sent (the server ignored it) or the server refuses the field.

Each logs its one change per task (or per run) on the ``polytask`` logger, at warning level.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

import anyio

from .. import exceptions as exc

__all__ = ["CapField", "CapParam", "StructuredMode", "StructuredModes", "may_be_capability", "simpler_modes"]

logger = logging.getLogger("polytask")

StructuredMode = Literal["json_schema", "json_object", "none"]
CapParam = Literal["auto", "max_completion_tokens", "max_tokens"]
SIMPLER: dict[StructuredMode, StructuredMode] = {"json_schema": "json_object", "json_object": "none"}
_SAYS = {"json_object": "in the prompt with JSON mode", "none": "in the prompt only"}
_NOT_CAPABILITY = (401, 403, 404, 429)  # a key, a permission, an unknown model, a rate limit: never the mode
_VERDICTS = (400, 422)  # statuses that judge the request itself: never retried, so never seen twice by one call
_REPEATS = 2  # identical failures of a task's unproven mode before a simpler one is probed (doubled per outage)
_MOST_REPEATS = 64
# a 400 naming the cap's field says it is unknown (not that its value is too large)
_UNKNOWN_FIELD = re.compile(
    r"unrecogni[sz]ed|unsupported|not supported|does not support|unknown|unexpected|extra (?:inputs?|fields?|param)"
    r"|not permitted|additional propert",
    re.IGNORECASE,
)


def simpler_modes(mode: StructuredMode) -> list[StructuredMode]:
    """The modes simpler than ``mode``, next simpler first."""
    out: list[StructuredMode] = []
    while mode in SIMPLER:
        mode = SIMPLER[mode]
        out.append(mode)
    return out


def may_be_capability(error: exc.APIStatusError) -> bool:
    """Whether an error status could be a server's answer to the ``response_format`` it was sent: any but a rate
    limit, a rejected key, a denied permission or an unknown model (401, 403, 404, 429)."""
    return not isinstance(error, exc.RateLimitError) and error.status_code not in _NOT_CAPABILITY


def _signature(error: exc.APIStatusError) -> tuple[int, str | None, str]:
    """What "the same failure" means: its status, code and message without the ids and numbers that change per
    request (a request id in a 500's text)."""
    return error.status_code, error.code, re.sub(r"\S*\d\S*", "#", str(error))[:300]


class StructuredModes:
    """The ``response_format`` mode of each task (by schema name), learned from the server's answers.

    Args:
        configured: the mode every task starts in.

    Attributes:
        configured: as given.
        fallbacks: each task that left ``configured`` → the mode it uses now.
    """

    def __init__(self, configured: StructuredMode) -> None:
        self.configured: StructuredMode = configured
        self.fallbacks: dict[str, StructuredMode] = {}
        self._seen: dict[str, None] = {}  # every task asked, in order
        self._proven: set[str] = set()  # tasks whose current mode has answered
        self._failures: dict[str, tuple[tuple[StructuredMode, tuple[int, str | None, str]], int]] = {}
        self._needed: dict[str, int] = {}  # identical failures that start the task's next probe
        self._probes: dict[str, anyio.Event] = {}  # the tasks being probed: set when the probe ends

    def mode(self, task: str) -> StructuredMode:
        """The mode ``task``'s next call is sent in."""
        self._seen.setdefault(task)
        return self.fallbacks.get(task, self.configured)

    @property
    def modes(self) -> dict[str, StructuredMode]:
        """Every task asked so far → the mode its calls use now."""
        return {task: self.fallbacks.get(task, self.configured) for task in self._seen}

    def answered(self, task: str, mode: StructuredMode) -> None:
        """A call of ``task`` in ``mode`` answered (2xx): while that is its mode, failures are transient."""
        if task in self._proven and self.fallbacks.get(task, self.configured) == mode:  # the common case
            return
        if self.mode(task) == mode:
            self._proven.add(task)
            self._failures.pop(task, None)

    def refused(self, task: str, mode: StructuredMode, error: exc.APIStatusError) -> StructuredMode | None:
        """A 400 or 422 to ``task`` in ``mode``: the mode to send it in now when the error names ``response_format``
        (the task falls back, or already did by another call), else None (it is about something else)."""
        simpler = SIMPLER.get(mode)
        if simpler is None or "response_format" not in str(error):
            return None
        if self.mode(task) == mode:
            self.fall_back(task, mode, simpler, f"the server refused {mode} structured outputs for it ({error})")
        return self.mode(task)

    def should_probe(self, task: str, mode: StructuredMode, error: exc.APIStatusError) -> bool:
        """Count a failed call of ``task`` in ``mode``; True when the caller should now send the same request in the
        simpler modes (then :meth:`probed`): ``mode`` is still the task's and has never answered, there is a simpler
        one, the failure could be a capability answer (not 401, 403, 404, 429), it repeated identically, and no other
        call of the task is probing."""
        if task in self._proven or self.mode(task) != mode or mode not in SIMPLER:
            return False
        if not may_be_capability(error) or task in self._probes:
            return False
        key = (mode, _signature(error))
        before = self._failures.get(task)
        count = before[1] + 1 if before is not None and before[0] == key else 1
        self._failures[task] = (key, count)
        # a 400 / 422 is a verdict on the request, never retried: one is enough to try the simpler modes (a server
        # refusing json_schema with 422, as Hugging Face TGI does, would otherwise fail the task's first call)
        first = 1 if error.status_code in _VERDICTS else _REPEATS
        if count < self._needed.get(task, first):
            return False
        self._probes[task] = anyio.Event()
        return True

    async def probe_ended(self, task: str) -> None:
        """Return once no call is probing ``task``'s modes (at once when none is)."""
        probe = self._probes.get(task)
        if probe is not None:
            await probe.wait()

    def probed(self, task: str, mode: StructuredMode, error: exc.APIStatusError, worked: StructuredMode | None) -> None:
        """The probe :meth:`should_probe` asked for ended: ``worked`` is the simpler mode that answered, or None
        (every simpler mode failed too: an outage, not a capability; the count starts afresh)."""
        probe = self._probes.pop(task, None)
        if probe is not None:
            probe.set()
        if worked is None:
            self._failures.pop(task, None)
            self._needed[task] = min(_MOST_REPEATS, 2 * self._needed.get(task, _REPEATS))
            return
        if self.mode(task) == mode:
            why = f"{mode} failed the same way each time ({error}) while {worked} answered the same request"
            self.fall_back(task, mode, worked, why)
        self.answered(task, worked)

    def fall_back(self, task: str, mode: StructuredMode, to: StructuredMode, why: str) -> None:
        """``task`` moves from ``mode`` to ``to`` for the rest of the run (logged once)."""
        self.fallbacks[task] = to
        self._proven.discard(task)
        self._failures.pop(task, None)
        logger.warning("task %r: %s; sending its schema %s for the rest of the run", task, why, _SAYS[to])


class CapField:
    """Which request field carries the completion cap.

    Args:
        param: ``"max_completion_tokens"`` or ``"max_tokens"`` (always that one), or ``"auto"``: start with
            ``max_completion_tokens``, switch once to ``max_tokens``.
        base_url: the server's URL, named in the log line.

    Attributes:
        param: as given.
        field: the field sent now.
    """

    def __init__(self, param: CapParam, base_url: str) -> None:
        self.param: CapParam = param
        self.field: Literal["max_completion_tokens", "max_tokens"] = (
            "max_tokens" if param == "max_tokens" else "max_completion_tokens"
        )
        self._base_url = base_url

    def refused(self, sent: str, error: exc.APIStatusError) -> bool:
        """A 400 or 422 (Mistral's status for an unknown field) to a call that carried the cap in ``sent``: True
        (and the field switched) when, with ``"auto"``, it says the server does not know that field; the call is
        then to be sent again."""
        if self.param != "auto" or sent != "max_completion_tokens":
            return False
        text = str(error)
        if sent not in text or not _UNKNOWN_FIELD.search(text):
            return False
        self._switch(f"it refused the field ({error})")
        return True

    def observe(self, sent: str, cap: int, completion_tokens: int) -> None:
        """An answer of ``completion_tokens`` to a call capped at ``cap`` tokens in ``sent``: more than the cap means
        the server ignored the field; with ``"auto"`` the field switches."""
        if self.param == "auto" and sent == "max_completion_tokens" and completion_tokens > cap:
            self._switch(f"an answer took {completion_tokens} completion tokens against a cap of {cap}: it ignores it")

    def _switch(self, why: str) -> None:
        if self.field == "max_tokens":  # another call switched already
            return
        self.field = "max_tokens"
        logger.warning(
            "the server at %s was sent the completion cap as max_completion_tokens and %s; sending max_tokens for "
            "the rest of the run",
            self._base_url,
            why,
        )
