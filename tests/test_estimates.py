import pytest

from polytask._estimates import CompletionBudget, PromptEstimator, cached_tiktoken_counter


def test_prompt_estimate_calibrates_to_the_servers_count():
    est = PromptEstimator(warmup=10)
    messages = [{"role": "user", "content": "word " * 100}]
    raw = est.raw(messages)
    assert est.estimate(raw) == raw  # no data yet: the heuristic as is
    for i in range(40):
        est.observe(raw, int(raw * (1.2 if i % 10 else 1.3)))  # the server counts 20–30 % more
    assert est.estimate(raw) == pytest.approx(raw * 1.3, rel=0.01)  # the 90th percentile: errs high


def test_custom_counter_is_used():
    est = PromptEstimator(lambda text: len(text.split()))
    assert est.raw([{"role": "user", "content": "a b c"}]) == 3 + 4 + 3


def test_no_tiktoken_download_offline():
    assert cached_tiktoken_counter("no-such-model") is None


def test_completion_budget_learns_a_cap_from_answers():
    budget = CompletionBudget(256, warmup=20)
    assert budget.cap == 256
    for n in range(20):
        budget.observe(10 + n % 5)
    assert budget.cap == int(14 * 1.25 + 0.999) + 16  # largest seen (14) plus a quarter, plus 16
    for _ in range(5):
        budget.observe(1000)
    assert budget.cap == 256  # never above the task's own max_tokens
