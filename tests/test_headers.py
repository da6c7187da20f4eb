import email.utils

import pytest

from polytask._headers import parse_duration, parse_rate_limit_headers, parse_retry_after


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
