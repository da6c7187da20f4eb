"""Real services for the tests that need them: a ``redis-server`` on 127.0.0.1, started and stopped by a fixture;
the ``ray`` package (a small local cluster, started by tests/test_ray.py).

Where the binary is missing the tests skip, except where ``POLYTASK_REQUIRE_SERVICES=1`` (``.ci/run`` sets it, after
installing Debian's ``redis-server``): there a missing service fails them, so CI never passes by skipping them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(binary: str) -> str:
    """The path of ``binary``; skips the test when it is missing (fails it under POLYTASK_REQUIRE_SERVICES=1)."""
    path = shutil.which(binary)
    if path is None:
        why = f"{binary} is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("POLYTASK_REQUIRE_SERVICES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


def need_module(name: str, extra: str) -> object:
    """The module ``name``, imported; skips the test when it is missing (fails it under POLYTASK_REQUIRE_SERVICES=1,
    where CI has installed the ``extra``)."""
    try:
        return __import__(name)
    except ImportError:
        why = f"{name} is not installed (pip install 'polytask[{extra}]')"
        if os.environ.get("POLYTASK_REQUIRE_SERVICES") == "1":
            pytest.fail(why)
        pytest.skip(why)


class RedisServer:
    """A throwaway ``redis-server`` (no persistence) on 127.0.0.1; :meth:`stop` and :meth:`start` simulate an outage."""

    def __init__(self, workdir: Path) -> None:
        self.binary = need("redis-server")
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
