"""``polytask run``'s dollars (issue 11): --price-in / --price-out, --budget, the summary's cost, and the cost on
every output record — in-process against the built-in simulator, whose model genai-prices does not know."""

import json

import pytest

from cli_helpers import own_cache_dir, run_cli, runner, summary_value  # noqa: F401 (the fixture)


def dollars(text: str) -> float:
    return float(text.removeprefix("$").replace(",", ""))


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"id": "d{i}", "text": "Document {i} is short."}}\n' for i in range(20)))
    return path


def test_a_model_genai_prices_does_not_know_costs_unknown_not_zero(tmp_path, source):
    result = run_cli(source, "-o", tmp_path / "out.jsonl", "--simulate", "-t", "sentiment")
    assert result.exit_code == 0, result.output
    assert summary_value(result.output, "cost") == "unknown (pass --price-in/--price-out)"
    assert "$0.00" not in result.output


def test_price_in_and_out_price_every_record_and_the_summary(tmp_path, source):
    out = tmp_path / "out.jsonl"
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--price-in", "0.15", "--price-out", "0.6")
    assert result.exit_code == 0, result.output
    assert summary_value(result.output, "price per million tokens") == "$0.15 in / $0.6 out"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for r in records:
        usage = r["usage"]
        expected = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.6) / 1e6
        assert usage["cost"] == pytest.approx(expected) and usage["cost"] > 0
        assert sum(p["cost"] for p in r["pairs"]) == pytest.approx(usage["cost"])
    total = sum(r["usage"]["cost"] for r in records)
    assert dollars(summary_value(result.output, "cost")) == pytest.approx(total, rel=1e-3)  # four digits shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--price-in", "0.15"], "--price-in needs --price-out too"),
        (["--price-out", "0.6"], "--price-out needs --price-in too"),
        (["--price-in", "-1", "--price-out", "1"], "--price-in must be 0 or more"),
        (["--price-in", "1", "--price-out", "nan"], "--price-out must be a finite number"),
        (["--budget", "0", "--price-in", "1", "--price-out", "1"], "--budget must be greater than 0"),
        (["--budget", "5"], "budget needs prices"),  # the simulator's model: unknown to genai-prices
    ],
)
def test_prices_and_budget_that_cannot_work_exit_2_before_anything_is_written(tmp_path, source, args, message):
    result = run_cli(source, "-o", tmp_path / "out.jsonl", "--simulate", "-t", "sentiment", *args)
    assert result.exit_code == 2 and "error:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_the_budget_stops_the_run_with_exit_2_and_a_higher_one_resumes_from_the_cache(tmp_path, source):
    out = tmp_path / "out.jsonl"
    dear = ["--price-in", "1000000", "--price-out", "1000000"]  # $1 a token: a call costs a few hundred dollars
    args = ["--simulate", "-t", "sentiment", "--concurrency", "1", *dear]
    result = run_cli(source, "-o", out, *args, "--budget", "1000")
    assert result.exit_code == 2, result.output
    assert "stopped:" in result.output and "the budget of $1,000.00 is reached" in result.output
    assert "rerun with a higher budget to resume" in result.output
    assert dollars(summary_value(result.output, "cost")) <= 1000
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"d{i}" for i in range(20)]  # every input line has its output line
    done = [r for r in records if "results" in r and not r["partial"]]
    assert 0 < len(done) < 20
    assert sum(r["usage"]["cost"] for r in done) <= 1000
    kinds = {p["error"]["type"] for r in records if "pairs" in r for p in r["pairs"] if p["error"]}
    assert "BudgetExceededError" in kinds and kinds <= {"BudgetExceededError", "RunStopped"}

    again = run_cli(source, "-o", out, *args, "--budget", "100000")
    assert again.exit_code == 0, again.output
    # paid once, not twice: the finished documents come from the partial file the stop kept
    assert summary_value(again.output, "documents finished by an earlier run") == str(len(done))
    assert summary_value(again.output, "requests").split()[0] == str(20 - len(done))
