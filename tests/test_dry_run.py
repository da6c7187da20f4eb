"""A dry run says what a job would take before any call (issue 11): within 10% of the real run's calls and tokens
on the example job, nothing sent, nothing written, and what the cache already holds is free."""

from pathlib import Path

import pytest

import polytask as pt
from cli_helpers import own_cache_dir, run_cli, runner, summary_value  # noqa: F401 (the fixture)
from polytask.cli import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


value = summary_value


def number(text: str) -> int:
    return int(text.replace("≈", "").replace(",", "").split()[0])


def test_the_dry_run_of_the_example_job_is_within_10_percent_of_the_real_run(tmp_path):
    source, out = EXAMPLES / "ewt_dev.jsonl", tmp_path / "out.jsonl"
    args = ["run", str(source), "-o", str(out), "--simulate-oracle", str(source), "--no-progress"]
    dry = runner.invoke(app, [*args, "--dry-run", "--rpm", "1200", "--tpm", "120000"], catch_exceptions=False)
    assert dry.exit_code == 0, dry.output
    assert not out.exists() and "no call was made" in dry.output
    calls = number(value(dry.output, "calls to make"))
    prompt, completion = (number(x) for x in value(dry.output, "prompt / completion tokens").split(" / "))
    assert value(dry.output, "documents") == "318" and value(dry.output, "sentences") == "1,626"
    assert value(dry.output, "time the rate limits allow").startswith("≥ 5m")  # 681k tokens at 120k TPM

    real = runner.invoke(app, args, catch_exceptions=False)
    assert real.exit_code == 0, real.output
    real_calls = number(value(real.output, "requests"))
    real_prompt, real_completion = (number(x) for x in value(real.output, "prompt / completion tokens").split(" / "))
    assert abs(calls - real_calls) <= 0.1 * real_calls
    assert abs(prompt + completion - real_prompt - real_completion) <= 0.1 * (real_prompt + real_completion)
    assert abs(completion - real_completion) <= 0.25 * real_completion  # a typical answer, not the answer

    again = runner.invoke(app, [*args, "--dry-run"], catch_exceptions=False)  # everything is in the cache now
    assert number(value(again.output, "calls to make")) == 0
    assert number(value(again.output, "answered in the cache (free)")) == 3252
    assert "no RPM / TPM limit" in value(again.output, "time the rate limits allow")


def test_a_dry_run_sends_nothing_and_counts_what_the_input_holds():
    backend = pt.FunctionBackend(lambda request: {"label": "neutral", "score": 0.0})
    orch = pt.Orchestrator(backend, [pt.Sentiment(), pt.Classify(["a", "b"])], rpm=60, tpm=6000)
    plan = orch.dry_run(["One. Two. Three.", ("x", "Four."), {"id": "y", "text": ""}])
    assert backend.calls == 0
    assert (plan.documents, plan.sentences, plan.pairs, plan.calls, plan.cached) == (3, 4, 8, 8, 0)
    assert plan.prompt_tokens > 8 * 50 and plan.completion_tokens == 4 * (9 + 4)  # typical answers of each task
    tokens_bound = (plan.prompt_tokens + plan.completion_tokens) / 6000 * 60
    assert plan.seconds == pytest.approx(max(8 / 60 * 60, tokens_bound))
    with pytest.raises(pt.InputError):
        orch.dry_run([{"text": 3}])


def test_a_dry_run_prices_the_calls_it_would_make():
    backend = pt.FunctionBackend(lambda request: {"label": "neutral", "score": 0.0})
    prices = pt.Prices(input=2.0, output=10.0)  # USD per million tokens
    plan = pt.Orchestrator(backend, [pt.Sentiment()], prices=prices).dry_run(["One. Two.", "Three."])
    assert plan.cost == pytest.approx((2.0 * plan.prompt_tokens + 10.0 * plan.completion_tokens) / 1e6)
    unknown = pt.Orchestrator(backend, [pt.Sentiment()]).dry_run(["One."])
    assert unknown.cost is None  # never $0 for prices nobody knows
    out = runner.invoke(
        app, ["run", str(EXAMPLES / "quickstart.jsonl"), "-o", "x.jsonl", "--simulate", "--dry-run",
              "--price-in", "0.15", "--price-out", "0.6"], catch_exceptions=False,
    )  # fmt: skip
    assert out.exit_code == 0 and value(out.output, "cost").startswith("≈ $0.0")


def test_a_dry_run_against_openai_needs_no_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    source, out = EXAMPLES / "sample.jsonl", tmp_path / "out.jsonl"
    args = ["run", str(source), "-o", str(out), "--model", "gpt-4o-mini", "--rpm", "500", "--no-progress"]
    dry = runner.invoke(app, [*args, "--dry-run"], catch_exceptions=False)
    assert dry.exit_code == 0, dry.output
    assert "no call was made" in dry.output and value(dry.output, "cost").startswith("≈ $")  # genai-prices knows it
    real = runner.invoke(app, args, catch_exceptions=False)  # the real run still needs one, and says so
    assert real.exit_code == 2 and "no API key" in real.output
