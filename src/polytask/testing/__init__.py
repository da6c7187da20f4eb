"""Test helpers: an OpenAI-compatible chat-completions simulator with rate limits, latency and faults.

Quick start::

    from polytask.testing import SimulatorConfig, run_in_thread

    with run_in_thread(SimulatorConfig(rpm=60, faults={"server_error": 0.1})) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="test")

In pytest, the ``simulator`` fixture (registered by the ``polytask`` pytest plugin) does the same:
``sim = simulator(rpm=60)``.
"""

from .clock import FakeClock
from .config import FAULT_KINDS, FaultRates, SimulatorConfig, SimulatorStats
from .oracle import GoldEntity, GoldIndex, oracle_answer
from .ratelimit import ServerRateLimiter, format_duration
from .schema_fill import answer_rng, fill_schema, violate_schema
from .simulator import Simulator, run_in_thread, serve

__all__ = [
    "FAULT_KINDS",
    "FakeClock",
    "FaultRates",
    "GoldEntity",
    "GoldIndex",
    "ServerRateLimiter",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "answer_rng",
    "fill_schema",
    "format_duration",
    "oracle_answer",
    "run_in_thread",
    "serve",
    "violate_schema",
]
