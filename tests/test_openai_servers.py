"""The OpenAI backend against servers that are only partly OpenAI-compatible (issue 12): nothing listening at the base
URL, a ``response_format`` answered with a 500, a completion cap the server reads from ``max_tokens`` only."""

import json
import logging
import socket
import time

import anyio
import httpx2
import pytest

import polytask as pt
from cli_helpers import own_cache_dir, run_cli  # noqa: F401 (the fixture)
from polytask.backends.base import ChatRequest
from polytask.exceptions import is_fatal_to_run, is_retryable
from polytask.testing import SimulatorConfig, run_in_thread
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789abcdef"

REQUEST = ChatRequest(
    messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": '{"sentence": "Hi."}'}],
    schema_name="sentiment",
    json_schema=pt.Sentiment().json_schema(),
    max_tokens=32,
    prompt_tokens_estimate=20,
)


def completion(content='{"label": "neutral", "score": 0}', completion_tokens=9):
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 17, "completion_tokens": completion_tokens, "total_tokens": 17 + completion_tokens},
    }


def error_body(message, type_="invalid_request_error"):
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def mock_backend(handler, http="httpx2", **kwargs):
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    return pt.OpenAIBackend("m", base_url="http://test/v1", api_key=KEY, http_client=client, http=http, **kwargs)


def free_port():
    """A port nothing listens on: bound, then closed (the kernel refuses connections to it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "polytask" and r.levelno == logging.WARNING]


# --- nothing listening at the base URL ---------------------------------------------------------------------------


def test_a_base_url_nothing_listens_at_stops_the_cli_within_seconds_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    url = f"http://127.0.0.1:{free_port()}/v1"
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "d{i}", "text": "Doc {i}. Two sentences."}}\n' for i in range(300)))
    started = time.monotonic()
    result = run_cli(source, "-o", tmp_path / "out.jsonl", "--base-url", url, "--model", "m")
    took = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert f"nothing is listening at {url}: check --base-url" in result.output
    assert "OPENAI_BASE_URL" in result.output and "Traceback" not in result.output
    assert took < 10  # the default quick retries (0.5 s, then 1 s) included; before: minutes, exit 1 or 2


@pytest.mark.parametrize("http", ["aiohttp", "httpx2", "sdk"])
async def test_refused_before_any_answer_is_tried_twice_more_then_a_configuration_error(monkeypatch, http):
    monkeypatch.setattr("polytask.backends.openai._UNREACHABLE_RETRIES", (0.0, 0.0))
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = pt.OpenAIBackend("m", base_url=url, api_key=KEY, http=http)
    with pytest.raises(pt.ServerUnreachableError) as info:
        await backend.complete(REQUEST)
    error = info.value
    assert is_fatal_to_run(error) and not is_retryable(error)
    assert isinstance(error, pt.APIConnectionError) and not error.connected  # caught as a connection error too
    assert str(error).startswith(f"nothing is listening at {url}: ") and "3 connection(s) refused" in str(error)
    assert error.base_url == url
    with pytest.raises(pt.ServerUnreachableError, match=r"1 connection\(s\) refused over 0 s"):
        await backend.complete(REQUEST)  # said once: later calls are not held for the retries again
    await backend.aclose()


async def test_a_server_starting_at_that_moment_is_not_a_configuration_error(monkeypatch):
    monkeypatch.setattr("polytask.backends.openai._UNREACHABLE_RETRIES", (0.0, 0.0))
    tries = []

    def starting(request):  # refuses twice, then is up
        tries.append(1)
        if len(tries) <= 2:
            raise httpx2.ConnectError("All connection attempts failed", request=request)
        return httpx2.Response(200, json=completion())

    backend = mock_backend(starting)
    assert (await backend.complete(REQUEST)).content
    assert len(tries) == 3


@pytest.mark.parametrize("http", ["aiohttp", "httpx2", "sdk"])
async def test_a_server_that_answered_then_went_away_is_an_outage_not_a_configuration_error(monkeypatch, http):
    monkeypatch.setattr("polytask.backends.openai._UNREACHABLE_RETRIES", (3600.0,))  # were it waited: the guard fails
    with run_in_thread(SimulatorConfig()) as sim:
        backend = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=KEY, http=http)
        assert (await backend.complete(REQUEST)).content
    await backend.aclose()  # no pooled connection left: the next call connects anew, and is refused
    with anyio.fail_after(30), pytest.raises(pt.APIConnectionError) as info:
        await backend.complete(REQUEST)
    assert type(info.value) is pt.APIConnectionError and not info.value.connected
    assert is_retryable(info.value) and not is_fatal_to_run(info.value)  # retried, breaker, max_outage
    await backend.aclose()


async def test_the_seam_says_whether_a_connection_was_made():
    from polytask._http import translate_transport_errors

    request = httpx2.Request("POST", "http://test/v1")
    tls = httpx2.ConnectError("certificate verify failed", request=request)
    tls.__context__ = __import__("ssl").SSLError("CERTIFICATE_VERIFY_FAILED")
    cases = [
        (httpx2.ConnectError("All connection attempts failed", request=request), False),
        (ConnectionRefusedError(111, "Connection refused"), False),
        (socket.gaierror(-2, "Name or service not known"), False),
        (tls, True),  # something answered, in TLS: not "nothing is listening"
        (httpx2.ReadError("reset", request=request), True),
        (ConnectionResetError("peer reset"), True),
    ]
    for raised, connected in cases:
        with pytest.raises(pt.APIConnectionError) as info, translate_transport_errors(1.0):
            raise raised
        assert info.value.connected is connected, raised


# --- a response_format answered with an error status -------------------------------------------------------------


def formats_of(sent):
    return [(b.get("response_format") or {}).get("type") for b in sent]


@pytest.mark.parametrize(("documents", "concurrency", "most_refused"), [(20, 4, 3 * 2), (200, None, 12)])
async def test_a_server_that_answers_500_to_json_schema_runs_each_task_in_json_mode(
    simulator, caplog, documents, concurrency, most_refused
):
    sim = simulator(supports_json_schema=False, json_schema_status=500, seed=3)
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key=KEY, timeout=5.0)
    texts = [f"Ann met Bob in Rome on day {i}. They were happy." for i in range(documents)]
    retry = pt.RetryPolicy(attempts=4, wait_jitter=0)
    tasks = [pt.Sentiment(), pt.Entities()]
    async with pt.Orchestrator(backend, tasks, clock=FakeClock(), retry=retry, max_concurrency=concurrency) as orch:
        results = await orch.run(texts)
    pairs = [p for r in results for p in r.pairs]
    assert len(pairs) == 4 * documents and all(p.error is None and p.answer is not None for p in pairs)
    assert backend.structured_modes == {"sentiment": "json_object", "entities": "json_object"}
    assert backend.fallbacks == {"sentiment": "json_object", "entities": "json_object"}
    # two identical failures per task, and those of its calls already out then (≤ 3 per task with 4 in flight;
    # the slow start's first 8 calls by default, whatever the run's size); before: every attempt of every pair
    assert 4 <= sim.stats.outcomes["json_schema_refused"] <= most_refused, sim.stats.outcomes
    assert sim.stats.outcomes["ok"] == 4 * documents  # every pair answered once, in JSON mode
    assert orch.stats.retries <= 2  # the calls that failed during the probe waited for it and went again at once
    said = warnings_of(caplog)
    assert sorted(m.split(":")[0] for m in said) == ["task 'entities'", "task 'sentiment'"]  # once per task
    assert all("failed the same way each time" in m and "JSON mode" in m for m in said)


async def test_the_fallback_does_not_depend_on_the_status(caplog):
    sent = []

    def handler(request):
        body = json.loads(request.content)
        sent.append(body)
        if (body.get("response_format") or {}).get("type") == "json_schema":
            return httpx2.Response(422, text="Unprocessable Entity")
        return httpx2.Response(200, json=completion())

    backend = mock_backend(handler)
    # a 422 (Hugging Face TGI's answer to json_schema) is never retried: one is enough to try JSON mode, which
    # answers — so even the task's first call is answered, not failed
    assert (await backend.complete(REQUEST)).content
    assert (await backend.complete(REQUEST)).content
    assert formats_of(sent) == ["json_schema", "json_object", "json_object"]
    assert backend.structured_modes == {"sentiment": "json_object"} and len(warnings_of(caplog)) == 1


async def test_a_422_for_the_cap_field_switches_it_as_a_400_does(caplog):
    """Mistral answers an unknown max_completion_tokens with a 422, not a 400."""
    sent = []

    def handler(request):
        body = json.loads(request.content)
        sent.append(sorted(k for k in body if "tokens" in k))
        if "max_completion_tokens" in body:
            message = "Extra inputs are not permitted: body.max_completion_tokens"
            return httpx2.Response(422, json={"object": "error", "message": message, "type": "invalid_request_error"})
        return httpx2.Response(200, json=completion())

    backend = mock_backend(handler)
    assert (await backend.complete(REQUEST)).content
    assert (await backend.complete(REQUEST)).content
    assert (
        sent == [["max_completion_tokens"], ["max_tokens"], ["max_tokens"]] and backend.max_tokens_field == "max_tokens"
    )


@pytest.mark.parametrize("http", ["httpx2", "sdk"])
async def test_a_failure_every_mode_meets_is_an_outage_and_the_mode_is_kept(http, caplog):
    sent = []
    down = [True]

    def handler(request):
        sent.append(json.loads(request.content))
        if down[0]:
            return httpx2.Response(500, json=error_body("The server had an error (request req_81f3a)", "server_error"))
        return httpx2.Response(200, json=completion())

    backend = mock_backend(handler, http=http)
    for _ in range(2):
        with pytest.raises(pt.ServerError):
            await backend.complete(REQUEST)
    assert formats_of(sent) == ["json_schema", "json_schema", "json_object", None]  # one probe of each simpler mode
    assert backend.structured_modes == {"sentiment": "json_schema"} and warnings_of(caplog) == []
    down[0] = False
    assert (await backend.complete(REQUEST)).content
    assert formats_of(sent)[-1] == "json_schema" and backend.fallbacks == {}


async def test_a_mode_that_answered_once_is_kept_through_later_failures():
    sent = []

    def handler(request):
        sent.append(json.loads(request.content))
        if len(sent) == 1:
            return httpx2.Response(200, json=completion())
        return httpx2.Response(500, text="Internal Server Error")

    backend = mock_backend(handler)
    await backend.complete(REQUEST)
    for _ in range(3):
        with pytest.raises(pt.ServerError):
            await backend.complete(REQUEST)
    assert formats_of(sent) == ["json_schema"] * 4 and backend.structured_modes == {"sentiment": "json_schema"}


@pytest.mark.parametrize("status", [401, 403, 404, 429])
async def test_a_key_a_permission_a_model_or_a_rate_limit_is_never_a_capability_answer(status):
    sent = []

    def handler(request):
        sent.append(json.loads(request.content))
        if (sent[-1].get("response_format") or {}).get("type") == "json_schema":
            return httpx2.Response(status, json=error_body("no"))
        return httpx2.Response(200, json=completion())

    backend = mock_backend(handler)
    for _ in range(3):
        with pytest.raises(pt.APIStatusError):
            await backend.complete(REQUEST)
    assert formats_of(sent) == ["json_schema"] * 3 and backend.fallbacks == {}


async def test_different_failures_are_not_a_repeat():
    sent = []
    answers = iter(["upstream connect error", "worker died", "upstream connect error"])

    def handler(request):
        sent.append(json.loads(request.content))
        if (sent[-1].get("response_format") or {}).get("type") == "json_schema":
            return httpx2.Response(502, text=next(answers))
        return httpx2.Response(200, json=completion())

    backend = mock_backend(handler)
    for _ in range(3):
        with pytest.raises(pt.ServerError):
            await backend.complete(REQUEST)
    assert formats_of(sent) == ["json_schema"] * 3 and backend.fallbacks == {}


# --- the completion cap ------------------------------------------------------------------------------------------


SHORT = ChatRequest(
    messages=REQUEST.messages,
    schema_name="sentiment",
    json_schema=REQUEST.json_schema,
    max_tokens=3,  # shorter than any sentiment answer
    prompt_tokens_estimate=20,
)


async def test_auto_sends_max_tokens_once_an_answer_shows_the_cap_was_ignored(simulator, caplog):
    sim = simulator(reads_max_completion_tokens=False)
    backend = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=KEY)
    assert backend.max_tokens_param == "auto" and backend.max_tokens_field == "max_completion_tokens"
    first = await backend.complete(SHORT)
    assert first.completion_tokens > 3 and first.finish_reason == "stop"  # the server ignored the cap
    assert backend.max_tokens_field == "max_tokens"
    second = await backend.complete(SHORT)
    assert (second.finish_reason, second.completion_tokens) == ("length", 3)  # now it reaches the server
    await backend.complete(SHORT)
    (said,) = warnings_of(caplog)
    assert sim.base_url in said and "ignores it" in said and "sending max_tokens" in said
    await backend.aclose()


async def test_auto_keeps_max_completion_tokens_on_a_server_that_reads_it(simulator, caplog):
    sim = simulator()
    backend = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=KEY)
    for _ in range(2):
        response = await backend.complete(SHORT)
        assert (response.finish_reason, response.completion_tokens) == ("length", 3)
    assert backend.max_tokens_field == "max_completion_tokens" and warnings_of(caplog) == []
    await backend.aclose()


@pytest.mark.parametrize("http", ["httpx2", "sdk"])
@pytest.mark.parametrize(
    "message",
    [
        "Unrecognized request argument supplied: max_completion_tokens",
        "[{'type': 'extra_forbidden', 'loc': ('body', 'max_completion_tokens'), 'msg': 'Extra inputs are not "
        "permitted', 'input': 3}]",  # a server validating its body with pydantic (extra="forbid")
        "litellm.UnsupportedParamsError: this model does not support parameters: ['max_completion_tokens']",
    ],
)
async def test_auto_sends_max_tokens_when_the_server_refuses_max_completion_tokens(http, message, caplog):
    sent = []

    def handler(request):
        body = json.loads(request.content)
        sent.append(sorted(k for k in body if k.startswith("max_")))
        if "max_completion_tokens" in body:
            return httpx2.Response(400, json=error_body(message))
        return httpx2.Response(200, json=completion())

    backend = mock_backend(handler, http=http)
    assert (await backend.complete(REQUEST)).content  # sent again at once: the call itself succeeds
    assert (await backend.complete(REQUEST)).content
    assert sent == [["max_completion_tokens"], ["max_tokens"], ["max_tokens"]]
    assert backend.max_tokens_field == "max_tokens" and len(warnings_of(caplog)) == 1


async def test_a_400_about_the_caps_value_is_not_a_field_the_server_does_not_know():
    message = "max_completion_tokens is too large: 100000. This model supports at most 16384 completion tokens"
    backend = mock_backend(lambda request: httpx2.Response(400, json=error_body(message)))
    with pytest.raises(pt.BadRequestError, match="too large"):
        await backend.complete(REQUEST)
    assert backend.max_tokens_field == "max_completion_tokens"


@pytest.mark.parametrize("param", ["max_completion_tokens", "max_tokens"])
async def test_a_field_named_is_always_the_one_sent(simulator, param):
    sim = simulator(reads_max_completion_tokens=False)
    backend = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=KEY, max_tokens_param=param)
    for _ in range(2):
        response = await backend.complete(SHORT)
        assert (response.completion_tokens == 3) is (param == "max_tokens")
    assert backend.max_tokens_field == param
    await backend.aclose()


def test_an_unknown_max_tokens_param_or_mode_is_a_configuration_error():
    with pytest.raises(pt.ConfigurationError, match="max_tokens_param must be"):
        pt.OpenAIBackend("m", base_url="http://x/v1", max_tokens_param="max_new_tokens")
    with pytest.raises(pt.ConfigurationError, match="structured_outputs must be"):
        pt.OpenAIBackend("m", base_url="http://x/v1", structured_outputs="grammar")


def test_credentials_in_the_base_url_are_refused_without_showing_them():
    with pytest.raises(pt.ConfigurationError) as info:
        pt.OpenAIBackend("m", base_url="http://alice:s3cret-pass@127.0.0.1:9/v1", api_key="sk-test-123456")
    message = str(info.value)
    assert "http://***@127.0.0.1:9/v1" in message and "credentials" in message
    assert "s3cret" not in message and "alice" not in message


async def test_an_error_wrapped_in_an_array_keeps_its_message_and_retry_delay():
    """Gemini's OpenAI-compatible endpoint: [{"error": {...}}], the wait in a google.rpc.RetryInfo detail."""
    body = [
        {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota, please check your plan.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}],
            }
        }
    ]
    backend = mock_backend(lambda request: httpx2.Response(429, json=body))
    with pytest.raises(pt.RateLimitError) as info:
        await backend.complete(REQUEST)
    assert "exceeded your current quota" in str(info.value) and info.value.retry_after == 37.0
