"""polytask._http: the one seam where transport errors become polytask's, and a transport that runs on trio too."""

import socket

import anyio
import httpx2
import openai
import pytest

import polytask as pt
from polytask._http import async_library, translate_transport_errors
from polytask.backends.base import ChatRequest

pytestmark = pytest.mark.anyio

SECRET = "sk-test-0123456789abcdef"
MODES = ["aiohttp", "httpx2", "sdk"]  # the three places a call is sent from

REQUEST = ChatRequest(
    messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": '{"sentence": "Hi."}'}],
    schema_name="sentiment",
    json_schema=pt.Sentiment().json_schema(),
    max_tokens=32,
    prompt_tokens_estimate=20,
)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_default_settings_answer_end_to_end_under_asyncio_and_trio(simulator, anyio_backend):
    sim = simulator(seed=1)
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key=SECRET)  # every transport setting default
    assert async_library() == anyio_backend
    async with pt.Orchestrator(backend, [pt.Sentiment()]) as orch:
        results = await orch.run(["Ann lives in Rome. She loves it!"])
    (result,) = results
    assert not result.partial, result.pairs
    assert all(p.error is None and p.answer is not None for p in result.pairs) and len(result.pairs) == 2
    assert result.results["sentiment"].coverage == 1.0
    assert sim.stats.received == 2
    assert (await backend.complete(REQUEST)).content  # closed by the `async with`, it opens anew in the same run


@pytest.mark.parametrize("http", [None, "httpx2", "sdk"])
def test_several_trio_runs_each_get_their_own_connections(simulator, http):
    # as asyncio.run per turn does (tests/test_orchestrator.py), now with trio.run per turn
    sim = simulator()
    backend = pt.OpenAIBackend("m", base_url=sim.base_url, api_key=SECRET, http=http)
    for _ in range(3):
        assert anyio.run(backend.complete, REQUEST, backend="trio").content
    anyio.run(backend.aclose, backend="trio")  # from yet another run: lets go of the old connections
    assert sim.stats.received == 3


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_aiohttp_asked_for_under_trio_is_a_configuration_error_that_says_what_to_pass(anyio_backend):
    backend = pt.OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", api_key=SECRET, http="aiohttp")
    with pytest.raises(pt.ConfigurationError, match=r"asyncio only.*pass http='httpx2' or 'sdk'.*leave http unset"):
        await backend.complete(REQUEST)


async def _errors(base_url, seconds=5.0):
    """The error each sending path raises for one call to ``base_url``."""
    errors = {}
    for mode in MODES:
        backend = pt.OpenAIBackend("m", base_url=base_url, api_key=SECRET, http=mode, timeout=seconds)
        try:
            with pytest.raises(pt.APIConnectionError) as info:
                await backend.complete(REQUEST)
        finally:
            await backend.aclose()
        errors[mode] = info.value
    return errors


async def test_refused_connection_is_the_same_error_from_every_path(monkeypatch):
    # refused before anything ever answered: a wrong base URL (tried again at once here, not after 0.5 s and 1 s)
    monkeypatch.setattr("polytask.backends.openai._UNREACHABLE_RETRIES", (0.0, 0.0))
    with socket.socket() as bound:  # bound, never listening: the kernel refuses connections to it
        bound.bind(("127.0.0.1", 0))
        errors = await _errors(f"http://127.0.0.1:{bound.getsockname()[1]}/v1")
    for mode, unreachable in errors.items():
        assert type(unreachable) is pt.ServerUnreachableError, mode
        error = unreachable.__cause__  # what the transport said, in polytask's words
        assert type(error) is pt.APIConnectionError and not error.connected, mode
        assert str(error).startswith("connection failed: ") and len(str(error)) <= 500, mode
        assert str(unreachable).endswith(f"{error})"), mode
    assert str(errors["sdk"].__cause__) == str(errors["httpx2"].__cause__)  # the same library below, the same words
    assert str(errors["httpx2"].__cause__).startswith("connection failed: ConnectError: ")


async def test_no_answer_within_the_timeout_is_the_same_error_from_every_path():
    with socket.socket() as silent:  # listening, never answering: the request is taken in and left unread
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        errors = await _errors(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", seconds=0.2)
    for mode, error in errors.items():
        assert type(error) is pt.APITimeoutError, mode
        assert str(error) == "no response within 0.2 s", mode


@pytest.mark.parametrize("http", ["httpx2", "sdk"])
async def test_injected_transport_failures_read_alike_and_the_sdk_path_redacts_the_key(http):
    def reset(request):
        raise httpx2.WriteError(f"reset while sending {SECRET}", request=request)

    client = httpx2.AsyncClient(transport=httpx2.MockTransport(reset))
    backend = pt.OpenAIBackend("m", base_url="http://test/v1", api_key=SECRET, http_client=client, http=http)
    with pytest.raises(pt.APIConnectionError) as info:
        await backend.complete(REQUEST)
    expected = "connection failed: WriteError: reset while sending " + (SECRET if http == "httpx2" else "***")
    assert str(info.value) == expected


def test_the_seam_translates_each_library_and_lets_everything_else_through():
    request = httpx2.Request("POST", "http://test/v1")
    failures = [
        (TimeoutError(), pt.APITimeoutError, "no response within 1.5 s"),
        (httpx2.ReadTimeout("slow", request=request), pt.APITimeoutError, "no response within 1.5 s"),
        (openai.APITimeoutError(request), pt.APITimeoutError, "no response within 1.5 s"),
        (
            ConnectionResetError("peer reset"),
            pt.APIConnectionError,
            "connection failed: ConnectionResetError: peer reset",
        ),
        (
            httpx2.RemoteProtocolError("bad", request=request),
            pt.APIConnectionError,
            "connection failed: RemoteProtocolError: bad",
        ),
    ]
    for raised, error_type, message in failures:
        with pytest.raises(error_type) as info, translate_transport_errors(1.5):
            raise raised
        assert type(info.value) is error_type and str(info.value) == message
        assert info.value.__cause__ is None and info.value.__suppress_context__

    wrapped = openai.APIConnectionError(request=request)  # the SDK's wrapper: the words are those of what it wraps
    wrapped.__cause__ = httpx2.ConnectError(f"refused {SECRET}", request=request)
    with (
        pytest.raises(pt.APIConnectionError) as info,
        translate_transport_errors(1.5, redact=lambda t: t.replace(SECRET, "***")),
    ):
        raise wrapped
    assert str(info.value) == "connection failed: ConnectError: refused ***"

    for passing in (
        ValueError("not transport"),
        pt.BackendClosedError("closed"),
        pt.ServerError("500", status_code=500),
    ):
        with pytest.raises(type(passing)) as info, translate_transport_errors(1.5):
            raise passing
        assert info.value is passing
