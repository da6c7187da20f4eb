import email.utils

import pytest

from polytask._headers import parse_duration, parse_rate_limit_headers, parse_rate_limit_message, parse_retry_after
from polytask.chat import RateLimitHeaders


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("1h2m3s", 3723.0),
        ("150us", 0.00015),
        ("0s", 0.0),
        ("2", 2.0),
        ("0.25", 0.25),
    ],
)
def test_parse_duration_formats(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "1x", "s", "1s2", None, "inf", "nan", "1" * 400 + "h"])
def test_parse_duration_rejects_garbage(text):
    assert parse_duration(text) is None


def test_retry_after_ms_wins():
    assert parse_retry_after({"retry-after-ms": "1234", "retry-after": "9"}) == pytest.approx(1.234)


def test_retry_after_seconds():
    assert parse_retry_after({"retry-after": "7"}) == 7.0


def test_retry_after_http_date_uses_wall_clock():
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, wall_clock=lambda: now) == pytest.approx(30.0)
    assert (
        parse_retry_after({"retry-after": email.utils.formatdate(now - 5, usegmt=True)}, wall_clock=lambda: now) == 0.0
    )


@pytest.mark.parametrize("zone", ["-0000", ""])
def test_retry_after_http_date_without_a_zone_is_utc(zone, monkeypatch):
    import time

    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True).replace(" GMT", f" {zone}".rstrip())
    for tz in ("America/New_York", "Asia/Tokyo", "UTC"):
        monkeypatch.setenv("TZ", tz)
        time.tzset()
        assert parse_retry_after({"retry-after": date}, wall_clock=lambda: now) == pytest.approx(30.0), tz
    monkeypatch.delenv("TZ")
    time.tzset()


@pytest.mark.parametrize("name", ["retry-after", "retry-after-ms"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_retry_after_that_is_not_a_finite_number_is_ignored(name, value):
    assert parse_retry_after({name: value}) is None


def test_rate_limit_header_too_large_for_an_int_is_ignored():
    parsed = parse_rate_limit_headers({"x-ratelimit-remaining-tokens": "1e400", "x-ratelimit-limit-tokens": "inf"})
    assert parsed.remaining_tokens is None and parsed.limit_tokens is None


def test_retry_after_from_exhausted_bucket_reset():
    headers = {
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "20ms",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert parse_retry_after(headers) == 360.0


def test_retry_after_falls_back_to_shortest_reset():
    headers = {"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "500ms"}
    assert parse_retry_after(headers) == 0.5


def test_retry_after_absent():
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None


def test_rate_limit_headers_parsed():
    limits = parse_rate_limit_headers(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-limit-tokens": "200000",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-remaining-tokens": "199000",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-reset-tokens": "1m30s",
        }
    )
    assert (limits.limit_requests, limits.limit_tokens) == (500, 200000)
    assert (limits.remaining_requests, limits.remaining_tokens) == (499, 199000)
    assert limits.reset_requests == pytest.approx(0.12)
    assert limits.reset_tokens == 90.0


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        (
            "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29500, Requested 1200. "
            "Please try again in 2.7s. Visit https://platform.openai.com/account/rate-limits to learn more.",
            2.7,
        ),
        ("Rate limit reached for gpt-4o on requests per day (RPD): Limit 200. Please try again in 6m0s.", 360.0),
        ("Please try again in 120ms.", 0.12),
        ("Please try again in 1h2m3s", 3723.0),
        (
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded "
            "call rate limit of your current OpenAI S0 pricing tier. Please retry after 17 seconds. Please go here: "
            "https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.",
            17.0,
        ),
        ("Please try again in 20 seconds.", 20.0),
        ("Retry after 2 minutes", 120.0),
        ("Too many requests. Please try again later.", None),
        ("slow down", None),
    ],
)
def test_a_429_message_gives_the_wait(message, seconds):
    wait, _ = parse_rate_limit_message(message)
    assert wait == (pytest.approx(seconds) if seconds is not None else None)


def test_a_429_message_names_the_limit_that_ran_out():
    _, tokens = parse_rate_limit_message(
        "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29500, Requested 1200."
    )
    assert (tokens.limit_tokens, tokens.remaining_tokens, tokens.limit_requests) == (30000, 0, None)
    _, requests = parse_rate_limit_message("… on requests per min (RPM): Limit 3, Used 3, Requested 1. Please …")
    assert (requests.limit_requests, requests.remaining_requests, requests.remaining_tokens) == (3, 0, None)
    _, azure = parse_rate_limit_message("… have exceeded token rate limit of your current OpenAI S0 pricing tier.")
    assert (azure.remaining_tokens, azure.limit_tokens, azure.remaining_requests) == (0, None, None)
    _, daily = parse_rate_limit_message("on requests per day (RPD): Limit 200, Used 200")
    assert daily == RateLimitHeaders()  # a daily limit is no per-minute bucket


@pytest.mark.parametrize(
    ("policy", "window"),
    [
        ("100;w=10", 10.0),
        ('"default";q=100;w=1', 1.0),
        ('"burst";q=20;w=1, "minute";q=1200;w=60', 1.0),
        ("1200;w=60", None),
        ("1000;w=86400", None),
        ("garbage", None),
    ],
)
def test_ratelimit_policy_gives_a_short_window(policy, window):
    assert parse_rate_limit_headers({"ratelimit-policy": policy}).window == window
