"""What the CLI tests share: the runner, a request cache of each test's own (imported, the fixture applies to every
test of the importing module), and the summary table's cells."""

import pytest
from typer.testing import CliRunner

from polytask.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    """Each test's runs share a request cache of their own (the CLI caches by default)."""
    monkeypatch.setenv("POLYTASK_CACHE_DIR", str(tmp_path / "polytask-cache"))


def run_cli(*args):
    """``polytask run ARGS --no-progress``, in-process."""
    return runner.invoke(app, ["run", *map(str, args), "--no-progress"], catch_exceptions=False)


def summary_value(output: str, name: str) -> str:
    """The value cell of the summary (or dry-run) table's row ``name``."""
    (line,) = [line for line in output.splitlines() if f"│ {name} " in line]
    return line.split("│")[2].strip()
