"""The ``polytask`` pytest plugin: a ``simulator`` fixture (registered through the ``pytest11`` entry point).

Example::

    def test_retries(simulator):
        sim = simulator(rpm=30, faults={"server_error": 0.5})
        client = openai.OpenAI(base_url=sim.base_url, api_key="test")
        ...
        assert sim.stats.outcomes["server_error"] > 0
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from .ratelimit import Clock
from .simulator import Simulator, SimulatorConfig, run_in_thread

__all__ = ["SimulatorFactory", "simulator"]


class SimulatorFactory(Protocol):
    """``simulator(config=None, *, clock=time.monotonic, **config_fields)`` → a started :class:`Simulator`.

    ``config_fields`` are :class:`SimulatorConfig` fields (applied over ``config`` when both are given);
    ``clock`` drives the rate-limit buckets. The result has ``.base_url`` (``http://127.0.0.1:PORT/v1``).
    """

    def __call__(self, config: SimulatorConfig | None = None, /, *, clock: Clock = ..., **fields: Any) -> Simulator: ...


@pytest.fixture
def simulator() -> Iterator[SimulatorFactory]:
    """A factory of running simulators, each on 127.0.0.1 in its own thread, all stopped at teardown.

    Call it with a :class:`SimulatorConfig` or with its fields as keywords: ``simulator(rpm=60, seed=3)``.
    """
    with contextlib.ExitStack() as stack:

        def factory(
            config: SimulatorConfig | None = None, /, *, clock: Clock = time.monotonic, **fields: Any
        ) -> Simulator:
            if config is None:
                config = SimulatorConfig(**fields)
            elif fields:
                config = SimulatorConfig(**{**config.model_dump(), **fields})
            return stack.enter_context(run_in_thread(config, clock=clock))

        yield factory
