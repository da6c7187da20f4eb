"""``OpenAIBackend(stream=True)``: server-sent chunks joined into one answer on every HTTP path (injected httpx2
transports for httpx2 and the SDK, the simulator over loopback for aiohttp too); a stream cut off is a retried
connection error, never an answer; a server that ignores ``stream`` still answers (issue 15)."""

import json

import httpx2
import pytest

import polytask as pt
from cli_helpers import own_cache_dir, run_cli  # noqa: F401 (the fixture)
from polytask._http import ServerEvents, async_library
from polytask.backends.base import ChatRequest
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

SECRET = "sk-test-0123456789abcdef"
ANSWER = '{"label": "neutral", "score": 0}'
REQUEST = ChatRequest(
    messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": '{"sentence": "Hi."}'}],
    schema_name="sentiment",
    json_schema=pt.Sentiment().json_schema(),
    max_tokens=32,
    prompt_tokens_estimate=20,
)
USAGE = {"prompt_tokens": 17, "completion_tokens": 9, "total_tokens": 26, "prompt_tokens_details": {"cached_tokens": 5}}


def chunk(delta=None, finish=None, usage=None, choices=True):
    return {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else [],
        "usage": usage,
    }


def answer_chunks(text=ANSWER, finish="stop", field="content"):
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    start = {"role": "assistant", "content": "" if field == "content" else None}
    return [
        chunk(start),
        *(chunk({field: piece}) for piece in pieces),
        chunk(finish=finish),
        chunk(usage=USAGE, choices=False),
    ]


def sse(chunks, done=True):
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


def stream_response(content, headers=None):
    return httpx2.Response(200, content=content, headers={"content-type": "text/event-stream", **(headers or {})})


@pytest.fixture(params=["httpx2", "sdk"])
def backend_for(request):
    """A streaming backend through an injected transport, on polytask's lean path and on the openai SDK's."""

    def make(handler, **kwargs):
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        return pt.OpenAIBackend(
            "m",
            base_url="http://test/v1",
            api_key=SECRET,
            http_client=client,
            http=request.param,
            stream=True,
            **kwargs,
        )

    return make


async def test_chunks_are_joined_with_usage_cached_tokens_and_request_id(backend_for):
    sent = []

    def handler(request):
        sent.append(json.loads(request.content))
        return stream_response(sse(answer_chunks()), {"x-request-id": "req_1", "x-ratelimit-limit-requests": "500"})

    response = await backend_for(handler).complete(REQUEST)
    assert response.content == ANSWER and response.finish_reason == "stop" and response.refusal is None
    assert (response.prompt_tokens, response.completion_tokens, response.cached_tokens) == (17, 9, 5)
    assert response.request_id == "req_1" and response.rate_limits.limit_requests == 500
    assert response.latency > 0
    (body,) = sent
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["response_format"]["type"] == "json_schema" and body["max_completion_tokens"] == 32


async def test_without_the_header_the_request_id_is_the_chunks_id(backend_for):
    response = await backend_for(lambda r: stream_response(sse(answer_chunks()))).complete(REQUEST)
    assert response.request_id == "chatcmpl-s1"


async def test_a_refusal_and_the_last_finish_reason_are_joined_too(backend_for):
    refused = answer_chunks("I can't help with that.", field="refusal")
    response = await backend_for(lambda r: stream_response(sse(refused))).complete(REQUEST)
    assert response.content is None and response.refusal == "I can't help with that."
    cut = answer_chunks('{"label": "neu', finish="length")
    response = await backend_for(lambda r: stream_response(sse(cut))).complete(REQUEST)
    assert response.finish_reason == "length" and response.content == '{"label": "neu'


async def test_a_stream_without_usage_counts_no_tokens(backend_for):
    response = await backend_for(lambda r: stream_response(sse(answer_chunks()[:-1]))).complete(REQUEST)
    assert response.content == ANSWER and (response.prompt_tokens, response.completion_tokens) == (0, 0)


def _cut_after_two_chunks():
    async def pieces():
        yield sse(answer_chunks()[:2], done=False)
        raise httpx2.ReadError("connection reset by peer")

    return pieces()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda: sse(answer_chunks()[:3], done=False), id="closed-before-done-and-finish"),
        pytest.param(lambda: sse(answer_chunks()[:3], done=False)[:-20], id="last-chunk-half-sent"),
        pytest.param(
            lambda: sse(answer_chunks()[:3], done=False) + b'data: {"id": "chatcmpl-s1", "cho\n\n',
            id="last-chunk-not-json",
        ),
        pytest.param(_cut_after_two_chunks, id="connection-reset-mid-stream"),
    ],
)
async def test_a_stream_cut_off_is_a_connection_error_never_an_answer(backend_for, content):
    backend = backend_for(lambda r: stream_response(content()))
    with pytest.raises(pt.APIConnectionError) as info:
        await backend.complete(REQUEST)
    assert type(info.value) is pt.APIConnectionError and info.value.connected
    assert pt.APIConnectionError.retryable


async def test_a_stream_that_ends_after_its_finish_reason_without_done_is_whole(backend_for):
    response = await backend_for(lambda r: stream_response(sse(answer_chunks(), done=False))).complete(REQUEST)
    assert response.content == ANSWER and response.completion_tokens == 9


async def test_a_server_that_ignores_stream_answers_in_one_piece(backend_for):
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ANSWER}}],
        "usage": {"prompt_tokens": 17, "completion_tokens": 9, "total_tokens": 26},
    }
    response = await backend_for(lambda r: httpx2.Response(200, json=completion)).complete(REQUEST)
    assert response.content == ANSWER and (response.prompt_tokens, response.completion_tokens) == (17, 9)
    assert response.request_id == "chatcmpl-1"
    with pytest.raises(pt.MalformedResponseError, match="not a chat completion"):
        await backend_for(lambda r: httpx2.Response(200, json={"object": "list"})).complete(REQUEST)


async def test_an_error_status_before_the_stream_is_translated_as_without_stream(backend_for):
    body = {"error": {"message": "slow down", "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
    backend = backend_for(lambda r: httpx2.Response(429, json=body, headers={"retry-after-ms": "1500"}))
    with pytest.raises(pt.RateLimitError) as info:
        await backend.complete(REQUEST)
    assert info.value.retry_after == 1.5 and info.value.status_code == 429
    backend = backend_for(lambda r: httpx2.Response(503, text="overloaded", headers={"content-type": "text/plain"}))
    with pytest.raises(pt.ServerError):
        await backend.complete(REQUEST)


async def test_an_error_chunk_mid_stream_is_a_server_error(backend_for):
    error = {"error": {"message": "the engine died", "type": "server_error", "param": None, "code": None}}
    content = sse(answer_chunks()[:2], done=False) + f"data: {json.dumps(error)}\n\n".encode()
    with pytest.raises(pt.ServerError, match="the engine died") as info:
        await backend_for(lambda r: stream_response(content)).complete(REQUEST)
    assert info.value.retryable and SECRET not in str(info.value)


def test_stream_must_be_a_bool():
    with pytest.raises(pt.ConfigurationError, match="stream must be True or False"):
        pt.OpenAIBackend("m", base_url="http://x/v1", stream="yes")  # type: ignore[arg-type]
    assert pt.OpenAIBackend("m", base_url="http://x/v1").stream is False


def test_server_sent_events_are_framed_whatever_the_pieces():
    body = (
        b': keep-alive\r\n\r\nevent: message\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
        b'data:{"b": 2}\n\ndata: {"c": 3}\ndata: [DONE]\ndata: never read\n\n'
    )
    for size in (1, 3, len(body)):
        events = ServerEvents()
        for i in range(0, len(body), size):
            if events.feed(body[i : i + size]):
                break
        events.end()
        assert events.data == ['{"a":\n1}', '{"b": 2}', '{"c": 3}'] and events.done and not events.broken
    cut = ServerEvents()
    cut.feed(b'data: {"a": 1}\n\ndata: {"b"')
    assert cut.end().data == ['{"a": 1}'] and cut.broken and not cut.done
    unended = ServerEvents()
    unended.feed(b'data: {"a": 1}\n')  # its line arrived whole, the blank line after it did not
    assert unended.end().data == ['{"a": 1}'] and not unended.broken


# over loopback, against the simulator: aiohttp too


@pytest.mark.parametrize("http", ["aiohttp", "httpx2", "sdk"])
async def test_the_simulator_streams_the_answer_it_would_send_whole(simulator, http):
    sim = simulator(seed=4)
    streamed = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=SECRET, http=http, stream=True)
    whole = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=SECRET, http=http)
    try:
        got, expected = await streamed.complete(REQUEST), await whole.complete(REQUEST)
    finally:
        await streamed.aclose()
        await whole.aclose()
    assert got.content == expected.content and json.loads(got.content)
    assert (got.prompt_tokens, got.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens) > (0, 0)
    assert got.finish_reason == "stop" and got.request_id and got.request_id.startswith("req_")
    assert sim.stats.outcomes == {"ok": 2}


@pytest.mark.parametrize("http", ["aiohttp", "httpx2", "sdk"])
async def test_a_cut_stream_from_the_simulator_is_a_connection_error(simulator, http):
    sim = simulator(faults={"cut_stream": 1.0})
    backend = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=SECRET, http=http, stream=True)
    try:
        with pytest.raises(pt.APIConnectionError) as info:
            await backend.complete(REQUEST)
        assert type(info.value) is pt.APIConnectionError
        plain = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=SECRET, http=http)  # a body cut halfway
        with pytest.raises(pt.APIConnectionError):
            await plain.complete(REQUEST)
        await plain.aclose()
    finally:
        await backend.aclose()
    assert sim.stats.outcomes == {"cut_stream": 2}


def test_the_simulator_streams_only_when_asked_and_usage_only_when_asked(simulator):
    sim = simulator()
    body = {"model": "m", "messages": REQUEST.messages}
    plain = httpx2.post(f"{sim.base_url}/chat/completions", json=body)
    assert plain.headers["content-type"].startswith("application/json") and plain.json()["usage"]
    for include_usage in (True, False):
        asked = {**body, "stream": True, "stream_options": {"include_usage": include_usage}}
        r = httpx2.post(f"{sim.base_url}/chat/completions", json=asked)
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-request-id"]
        lines = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
        assert lines[-1] == "[DONE]" and len(lines) >= 4
        chunks = [json.loads(line) for line in lines[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
        with_usage = [c for c in chunks if c.get("usage")]
        assert (len(with_usage) == 1 and with_usage[-1] is chunks[-1] and not chunks[-1]["choices"]) == include_usage
        assert with_usage or not include_usage


@pytest.mark.parametrize("http", [None, "sdk"])
async def test_cut_streams_are_retried_until_every_pair_is_answered(simulator, http):
    sim = simulator(faults={"cut_stream": 0.3}, seed=3)
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key=SECRET, http=http, stream=True, timeout=5)
    retry = pt.RetryPolicy(attempts=10, wait_jitter=0)
    async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()], clock=FakeClock(), retry=retry) as orch:
        results = await orch.run(["Ann lives in Rome. She loves it!", "One more. And another. Done."] * 2)
    assert all(p.error is None and p.answer is not None for r in results for p in r.pairs)
    assert sim.stats.outcomes["cut_stream"] > 0 and orch.stats.retries == sim.stats.outcomes["cut_stream"]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_streaming_under_trio(simulator, anyio_backend):
    sim = simulator()
    backend = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=SECRET, stream=True)  # httpx2, chosen for trio
    response = await backend.complete(REQUEST)
    await backend.aclose()
    assert json.loads(response.content or "") and response.completion_tokens > 0
    assert async_library() == "trio"


def test_the_cli_stream_flag_reaches_the_backend(tmp_path, monkeypatch):
    import polytask.cli._options as options

    made = []
    real = options.make_backend

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(options, "make_backend", spy)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"id": "a", "text": "Ann lives in Rome. She loves it!"}\n')
    result = run_cli(source, "-o", out, "--simulate", "--stream", "-t", "sentiment")
    assert result.exit_code == 0, result.output
    assert [b.stream for b in made] == [True]
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["results"]["sentiment"]
    result = run_cli(source, "-o", tmp_path / "local.jsonl", "--backend", "local", "--stream")
    assert result.exit_code == 2 and "--stream does not apply to --backend local" in result.output
