"""The OpenAI backend through an injected httpx2 transport: every status and body translated to polytask errors."""

import dataclasses
import json

import httpx2
import pytest

import polytask as pt
from polytask.backends.base import ChatRequest

pytestmark = pytest.mark.anyio

SECRET = "sk-test-0123456789abcdef"

REQUEST = ChatRequest(
    messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": '{"sentence": "Hi."}'}],
    schema_name="sentiment",
    json_schema=pt.Sentiment().json_schema(),
    max_tokens=32,
    prompt_tokens_estimate=20,
)


def completion(content='{"label": "neutral", "score": 0}', finish_reason="stop", refusal=None):
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": finish_reason,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
            }
        ],
        "usage": {"prompt_tokens": 17, "completion_tokens": 9, "total_tokens": 26},
    }


@pytest.fixture(params=["httpx2", "sdk"])
def http(request):
    """Every test runs through polytask's lean HTTP path and through the openai SDK's."""
    return request.param


@pytest.fixture
def backend_for(http):
    def make(handler, **kwargs):
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        return pt.OpenAIBackend("m", base_url="http://test/v1", api_key=SECRET, http_client=client, http=http, **kwargs)

    return make


def error_body(message, code=None, type_="invalid_request_error"):
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def test_success_records_usage_and_rate_limit_headers(backend_for):
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx2.Response(
            200,
            json=completion(),
            headers={
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-tokens": "1999",
                "x-ratelimit-reset-tokens": "6m0s",
            },
        )

    response = await backend_for(handler).complete(REQUEST)
    assert response.content == '{"label": "neutral", "score": 0}'
    assert (response.prompt_tokens, response.completion_tokens) == (17, 9)
    assert response.rate_limits.limit_requests == 500 and response.rate_limits.reset_tokens == 360.0
    body = seen[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    assert body["max_completion_tokens"] == 32


@pytest.mark.parametrize(
    ("status", "body", "headers", "error_type"),
    [
        (400, error_body("bad"), {}, pt.BadRequestError),
        (401, error_body(f"Incorrect API key provided: {SECRET}"), {}, pt.AuthenticationError),
        (403, error_body("no"), {}, pt.PermissionDeniedError),
        (404, error_body("no such model"), {}, pt.NotFoundError),
        (408, error_body("timeout"), {}, pt.ServerError),
        (409, error_body("conflict"), {}, pt.ServerError),
        (422, error_body("no"), {}, pt.UnprocessableEntityError),
        (
            429,
            error_body("slow down", "rate_limit_exceeded", "tokens"),
            {"retry-after-ms": "1500"},
            pt.RateLimitError,
        ),
        (
            429,
            error_body("You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
            {},
            pt.QuotaExceededError,
        ),
        (500, error_body("boom", type_="server_error"), {}, pt.ServerError),
        (503, error_body("overloaded", type_="server_error"), {"retry-after": "3"}, pt.ServerError),
    ],
)
async def test_status_errors_are_translated(backend_for, status, body, headers, error_type):
    backend = backend_for(lambda request: httpx2.Response(status, json=body, headers=headers))
    with pytest.raises(error_type) as info:
        await backend.complete(REQUEST)
    error = info.value
    assert type(error) is error_type
    assert error.status_code == status
    assert SECRET not in str(error)
    if "retry-after-ms" in headers:
        assert error.retry_after == 1.5
    if "retry-after" in headers:
        assert error.retry_after == 3.0
    if status == 429 and error_type is pt.QuotaExceededError:
        assert error.code == "insufficient_quota"


async def test_bad_gateway_html_body(backend_for):
    backend = backend_for(
        lambda r: httpx2.Response(
            502, text="<html><body>Bad Gateway</body></html>", headers={"content-type": "text/html"}
        )
    )
    with pytest.raises(pt.ServerError) as info:
        await backend.complete(REQUEST)
    assert info.value.status_code == 502


async def test_connection_error_and_timeout(backend_for):
    def reset(request):
        raise httpx2.ReadError("connection reset by peer", request=request)

    with pytest.raises(pt.APIConnectionError) as info:
        await backend_for(reset).complete(REQUEST)
    assert not isinstance(info.value, pt.APITimeoutError)

    def slow(request):
        raise httpx2.ReadTimeout("timed out", request=request)

    with pytest.raises(pt.APITimeoutError):
        await backend_for(slow).complete(REQUEST)


async def test_malformed_json_body(backend_for):
    backend = backend_for(
        lambda r: httpx2.Response(200, content=b'{"id": "x", "choi', headers={"content-type": "application/json"})
    )
    with pytest.raises(pt.MalformedResponseError):
        await backend.complete(REQUEST)


async def test_length_and_refusal_pass_through_as_data(backend_for):
    backend = backend_for(lambda r: httpx2.Response(200, json=completion('{"label": "neu', "length")))
    assert (await backend.complete(REQUEST)).finish_reason == "length"
    backend = backend_for(lambda r: httpx2.Response(200, json=completion(None, refusal="I can't help with that")))
    assert (await backend.complete(REQUEST)).refusal == "I can't help with that"


async def test_falls_back_to_json_object_then_prompt_only(backend_for):
    formats = []

    def handler(request):
        body = json.loads(request.content)
        fmt = body.get("response_format", {}).get("type")
        formats.append(fmt)
        if fmt in ("json_schema", "json_object"):
            return httpx2.Response(400, json=error_body(f"response_format {fmt} is not supported"))
        assert "Answer schema (JSON Schema)" in body["messages"][0]["content"]
        return httpx2.Response(200, json=completion())

    backend = backend_for(handler)
    await backend.complete(REQUEST)
    await backend.complete(REQUEST)
    assert formats == ["json_schema", "json_object", None, None]
    assert backend.fallbacks == {REQUEST.schema_name: "none"}


async def test_one_rejected_schema_falls_back_alone(backend_for, caplog):
    # OpenAI's 400 for a schema strict mode cannot take: only that task leaves strict structured outputs
    sent = []

    def handler(request):
        body = json.loads(request.content)
        fmt = body.get("response_format", {})
        sent.append((fmt.get("json_schema", {}).get("name"), fmt.get("type")))
        if fmt.get("json_schema", {}).get("name") == "counts":
            message = "Invalid schema for response_format 'counts': 'additionalProperties' is required to be false"
            return httpx2.Response(400, json=error_body(message))
        return httpx2.Response(200, json=completion())

    backend = backend_for(handler)
    await backend.complete(dataclasses.replace(REQUEST, schema_name="counts"))
    await backend.complete(REQUEST)
    await backend.complete(dataclasses.replace(REQUEST, schema_name="counts"))
    name = REQUEST.schema_name
    assert sent == [("counts", "json_schema"), (None, "json_object"), (name, "json_schema"), (None, "json_object")]
    assert backend.fallbacks == {"counts": "json_object"}
    assert ["'counts'" in r.getMessage() and "JSON mode" in r.getMessage() for r in caplog.records] == [True]


async def test_unrelated_400_does_not_fall_back(backend_for):
    backend = backend_for(lambda r: httpx2.Response(400, json=error_body("context length exceeded")))
    with pytest.raises(pt.BadRequestError):
        await backend.complete(REQUEST)
    assert backend.mode == "json_schema" and backend.fallbacks == {}


def test_missing_api_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(pt.ConfigurationError, match="OPENAI_API_KEY"):
        pt.OpenAIBackend("m")


def test_env_vars_are_read_like_the_sdk(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    backend = pt.OpenAIBackend("m")
    assert "127.0.0.1:9" in repr(backend) and SECRET not in repr(backend)


async def test_headers_sent_and_secret_never_in_errors(monkeypatch):
    monkeypatch.setenv("OPENAI_ORG_ID", "org-1")
    seen = {}

    def handler(request):
        seen.update(request.headers)
        return httpx2.Response(401, json=error_body(f"Incorrect API key provided: {SECRET}"))

    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    backend = pt.OpenAIBackend("m", base_url="http://test/v1", api_key=SECRET, http_client=client, project="p-2")
    with pytest.raises(pt.AuthenticationError) as info:
        await backend.complete(REQUEST)
    assert seen["authorization"] == f"Bearer {SECRET}"
    assert seen["openai-organization"] == "org-1" and seen["openai-project"] == "p-2"
    assert seen["user-agent"].startswith("polytask/")
    assert SECRET not in str(info.value) and SECRET not in repr(backend)


def test_unknown_http_mode():
    with pytest.raises(pt.ConfigurationError, match="http"):
        pt.OpenAIBackend("m", base_url="http://x/v1", http="curl")


@pytest.mark.parametrize("key", ["sk-abc\r\nX-Injected: 1", "sk-abc\x00def", "sk-abc…", "sk-abcé", "sk-abc\u2028x"])
def test_api_key_that_cannot_be_a_header_fails_at_construction_without_showing_it(key):
    with pytest.raises(pt.ConfigurationError, match="non-ASCII") as info:
        pt.OpenAIBackend("m", api_key=key)
    assert "sk-abc" not in str(info.value)


def test_api_key_surrounding_whitespace_is_dropped(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "  sk-test-key-123456\n")
    backend = pt.OpenAIBackend("m")
    assert backend._secret == "sk-test-key-123456"


@pytest.mark.parametrize("mode", ["aiohttp", "httpx2", "sdk"])
async def test_a_closed_backend_opens_new_connections_when_used_again(simulator, mode):
    # an Orchestrator closes its backend at the end of `async with`; the README then reuses it in run_sync
    sim = simulator()
    backend = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=SECRET, http=mode)
    for _ in range(2):
        assert (await backend.complete(REQUEST)).content
        await backend.aclose()
    assert sim.stats.received == 2


async def test_your_client_stays_open_and_a_closed_one_is_a_typed_error(backend_for):
    backend = backend_for(lambda r: httpx2.Response(200, json=completion()))
    await backend.complete(REQUEST)
    await backend.aclose()  # e.g. at the end of an Orchestrator's `async with`: your client is yours to close
    assert (await backend.complete(REQUEST)).content
    await backend._lean.client.aclose() if backend._lean is not None else await backend._sdk.close()
    with pytest.raises(pt.BackendClosedError, match="http_client given to the backend is closed"):
        await backend.complete(REQUEST)


@pytest.mark.parametrize("body", [[], "x", None])
async def test_a_200_that_is_not_a_json_object_is_malformed(backend_for, body):
    backend = backend_for(lambda r: httpx2.Response(200, json=body))
    with pytest.raises(pt.MalformedResponseError):
        await backend.complete(REQUEST)


@pytest.mark.parametrize(
    ("content", "content_type", "says"),
    [
        (b"<!DOCTYPE html><html><title>Sign in</title>", "text/html; charset=utf-8", "a body that is not JSON"),
        (b"", "text/plain", "an empty body"),
        (b'{"object": "list", "data": []}', "application/json", "a JSON object without 'choices' (keys: data, object)"),
        (b"Bad Gateway", "text/plain", "a body that is not JSON"),
    ],
)
async def test_a_200_that_is_not_a_chat_completion_names_what_came_back(backend_for, content, content_type, says):
    backend = backend_for(lambda r: httpx2.Response(200, content=content, headers={"content-type": content_type}))
    with pytest.raises(pt.MalformedResponseError) as info:
        await backend.complete(REQUEST)
    message = str(info.value)
    assert says in message and content_type in message and "NoneType" not in message
    assert content[:20].decode() in message and "--base-url" in message


@pytest.mark.parametrize(
    ("message", "wait", "limits"),
    [
        (
            "Rate limit reached for m on tokens per min (TPM): Limit 30000, Used 29500, Requested 1200. Please try "
            "again in 2.7s. Visit https://platform.openai.com/account/rate-limits to learn more.",
            2.7,
            pt.RateLimitHeaders(limit_tokens=30000, remaining_tokens=0),
        ),
        ("Rate limit reached. Please try again in 6m0s.", 360.0, None),
        ("Please try again in 120ms.", 0.12, None),
        (
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded "
            "call rate limit of your current OpenAI S0 pricing tier. Please retry after 17 seconds.",
            17.0,
            pt.RateLimitHeaders(remaining_requests=0),
        ),
    ],
)
async def test_a_429_with_the_wait_only_in_its_message_is_honoured(backend_for, message, wait, limits):
    body = error_body(message, "rate_limit_exceeded", "requests")
    backend = backend_for(lambda request: httpx2.Response(429, json=body))
    with pytest.raises(pt.RateLimitError) as info:
        await backend.complete(REQUEST)
    assert info.value.retry_after == pytest.approx(wait)
    assert info.value.rate_limits == limits


async def test_a_429_header_wait_wins_over_its_message(backend_for):
    body = error_body("Please try again in 20s.", "rate_limit_exceeded", "requests")
    headers = {"retry-after-ms": "1500", "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0"}
    backend = backend_for(lambda request: httpx2.Response(429, json=body, headers=headers))
    with pytest.raises(pt.RateLimitError) as info:
        await backend.complete(REQUEST)
    assert info.value.retry_after == 1.5
    assert info.value.rate_limits == pt.RateLimitHeaders(limit_requests=500, remaining_requests=0)
