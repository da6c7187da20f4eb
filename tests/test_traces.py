"""Every call attempt is one CallEvent: to the on_call hook, to `polytask run --trace`, and as OpenTelemetry spans
under a span per document; API keys appear in none of them."""

import json

import httpx2
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import polytask as pt
from cli_helpers import own_cache_dir, run_cli  # noqa: F401 (the fixture)
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

SECRET = "sk-test-secret-0123456789"
SENTIMENT = '{"label": "neutral", "score": 0}'


def completion(content, request_id):
    return httpx2.Response(
        200,
        json={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27},
        },
        headers={"x-request-id": request_id},
    )


def scripted_server():
    """Sentence 0: a 429 (Retry-After 1.5 s), then an answer. Sentence 1: an invalid answer twice (re-asked once)."""
    seen = {}

    def handle(request):
        messages = json.loads(request.content)["messages"]
        which = "first" if any("First one" in str(m["content"]) for m in messages) else "second"
        seen[which] = seen.get(which, 0) + 1
        if which == "first" and seen[which] == 1:
            error = {
                "message": "Rate limit reached. Please try again in 1.5s.",
                "type": "requests",
                "code": "rate_limit_exceeded",
            }
            return httpx2.Response(
                429, json={"error": error}, headers={"x-request-id": "req-429", "retry-after-ms": "1500"}
            )
        if which == "first":
            return completion(SENTIMENT, "req-ok")
        return completion('{"label": "ecstatic", "score": 0}', f"req-bad-{seen[which]}")

    return handle


def orchestrator(on_call=None, on_document=None, **kwargs):
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(scripted_server()))
    backend = pt.OpenAIBackend("m", base_url="http://test/v1", api_key=SECRET, http_client=client)
    return pt.Orchestrator(
        backend,
        [pt.Sentiment()],
        clock=FakeClock(),
        retry=pt.RetryPolicy(wait_jitter=0),
        max_concurrency=1,
        prices=pt.Prices(input=1.0, output=2.0),
        on_call=on_call,
        on_document=on_document,
        **kwargs,
    )


async def test_each_attempt_is_one_event_with_what_happened():
    events, documents = [], []
    async with orchestrator(events.append, documents.append) as orch:
        result = await orch.process({"id": "doc-1", "text": "First one is fine. Second one is not."})
    assert len(documents) == 1 and documents[0] is result and result.partial
    rows = [(e.sentence, e.attempt, e.status, e.http_status, e.error_type, e.request_id) for e in events]
    assert rows == [
        (0, 1, "error", 429, "RateLimitError", "req-429"),
        (0, 2, "ok", 200, None, "req-ok"),
        (1, 1, "invalid", 200, "AnswerValidationError", "req-bad-1"),
        (1, 2, "invalid", 200, "AnswerValidationError", "req-bad-2"),
    ]
    limited, ok, invalid, last = events
    assert limited.retry_after == 1.5 and "try again in 1.5s" in limited.error and limited.prompt_tokens == 0
    assert ok.prompt_tokens == 20 and ok.completion_tokens == 7 and ok.cost == pytest.approx((20 + 14) / 1e6)
    assert ok.rate_limit_wait >= 0 and ok.queue_wait >= 0 and ok.latency >= 0 and ok.model == "openai:m"
    assert "re-asked" in invalid.error and "after one re-ask" in last.error
    assert {e.document_id for e in events} == {"doc-1"} and {e.task for e in events} == {"sentiment"}
    assert SECRET not in json.dumps([e.to_json_dict() for e in events])


async def test_a_hook_that_raises_is_logged_and_the_run_goes_on(caplog):
    def broken(event):
        raise ValueError("my metrics backend is down")

    async with orchestrator(broken, broken) as orch:
        result = await orch.process("First one is fine.")
    assert result.results["sentiment"].coverage == 1.0
    assert "the on_call hook raised" in caplog.text and "the on_document hook raised" in caplog.text


async def test_answers_from_the_cache_are_events_too(tmp_path):
    events = []
    async with orchestrator(events.append, cache=tmp_path / "c.sqlite") as orch:
        await orch.process("First one is fine.")
        await orch.process("First one is fine.")
    assert [(e.attempt, e.status) for e in events] == [(1, "error"), (2, "ok"), (0, "cached")]


async def test_opentelemetry_spans_per_document_and_per_call():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    orch = orchestrator()
    orch._otel = pt.traces.OtelTracer(tracer)  # the provider of this test, not the process-wide one
    with tracer.start_as_current_span("agent turn") as turn:
        async with orch:
            await orch.process({"id": "doc-1", "text": "First one is fine. Second one is not."})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    calls = [s for s in exporter.get_finished_spans() if s.name == "chat m"]
    document = spans["polytask.document"]
    assert document.parent.span_id == turn.get_span_context().span_id  # under the caller's span
    assert len(calls) == 4 and all(c.parent.span_id == document.context.span_id for c in calls)
    first = calls[0].attributes
    assert first["http.response.status_code"] == 429 and first["error.type"] == "RateLimitError"
    assert first["polytask.retry_after_s"] == 1.5 and calls[0].status.status_code == trace.StatusCode.ERROR
    assert (
        calls[1].attributes["gen_ai.usage.input_tokens"] == 20 and calls[1].attributes["gen_ai.response.id"] == "req-ok"
    )
    assert document.attributes["polytask.document.id"] == "doc-1" and document.attributes["polytask.partial"] is True
    assert all(SECRET not in json.dumps(dict(s.attributes)) for s in exporter.get_finished_spans())


def test_polytask_run_trace_writes_one_line_per_attempt_without_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    source, out, calls = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "calls.jsonl"
    source.write_text('{"id": "a", "text": "One. Two."}\n{"id": "b", "text": "Three."}\n')
    result = run_cli(source, "-o", out, "--simulate", "-t", "sentiment", "--trace", calls)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in calls.read_text().splitlines()]
    assert sorted((e["document_id"], e["sentence"]) for e in events) == [("a", 0), ("a", 1), ("b", 0)]
    assert all(e["status"] == "ok" and e["request_id"] for e in events)
    assert SECRET not in calls.read_text() and SECRET not in out.read_text()
    bad = run_cli(source, "-o", out, "--simulate", "--trace", tmp_path / "no" / "such" / "calls.jsonl")
    assert bad.exit_code == 2 and "--trace" in bad.output and "Traceback" not in bad.output


async def test_an_async_hook_is_refused_and_unknown_prices_give_no_cost():
    async def hook(event):
        pass

    class Sink:
        async def __call__(self, event):
            pass

    for bad in (hook, Sink()):
        with pytest.raises(pt.ConfigurationError, match="plain"):
            pt.Orchestrator(
                pt.FunctionBackend(lambda r: {"label": "neutral", "score": 0}), [pt.Sentiment()], on_call=bad
            )
    events = []
    backend = pt.FunctionBackend(lambda r: {"label": "neutral", "score": 0})
    async with pt.Orchestrator(backend, [pt.Sentiment()], on_call=events.append, clock=FakeClock()) as orch:
        await orch.process("One.")
    assert [e.cost for e in events] == [None]  # the prices are unknown: not "free"
