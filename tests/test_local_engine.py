"""The local decode loop: continuous batching (rows refilled, buckets grown, jobs cancelled), grammar masks,
failures — every answer compared with plain ``model.generate`` one prompt at a time (tiny random Llama, CPU)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

np = pytest.importorskip("numpy")  # the `local` extra's: without it these tests skip, not fail collection
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
xgr = pytest.importorskip("xgrammar")

from local_models import build  # noqa: E402
from polytask.local.engine import Engine, GenRequest, GenResult  # noqa: E402
from polytask.local.grammar import GrammarCache, unpack_bits  # noqa: E402


def greedy(model, tok, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """The reference: n argmax steps over the whole sequence, no cache (``generate(min_new_tokens=n)`` would hide
    the end-of-sequence token, which an ``ignore_eos`` row may legitimately pick); ``penalty``: the CTRL
    repetition penalty over the tokens generated so far."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1].float()
            seen = ids[0, len(prompt) :].unique()
            if penalty != 1 and len(seen):
                vals = logits[seen]
                logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@dataclass(eq=False)
class ScriptedJob:
    request: GenRequest
    cancel_after: int | None = None  # decode steps after which the caller cancels
    cancelled: bool = False
    outcome: GenResult | BaseException | None = None
    finished: int = 0

    def finish(self, outcome) -> None:
        self.outcome = outcome
        self.finished += 1


@dataclass
class ScriptedSource:
    """Jobs that arrive over time: ``arrivals[i]`` is the engine's decode step at which job i starts to wait."""

    engine: Engine
    jobs: list[ScriptedJob]
    arrivals: list[int]
    taken: list[int] = field(default_factory=list)
    shapes: set = field(default_factory=set)

    def _arrived(self) -> list[int]:
        now = self.engine.stats["steps"]
        return [i for i, at in enumerate(self.arrivals) if at <= now and i not in self.taken]

    def waiting(self) -> int:
        self.shapes.update(self.engine._buckets)
        for job in self.jobs:
            if job.cancel_after is not None and self.engine.stats["steps"] >= job.cancel_after:
                job.cancelled = True
        return len(self._arrived())

    def take(self, n: int) -> list[ScriptedJob]:
        picked = self._arrived()[:n]
        self.taken += picked
        return [self.jobs[i] for i in picked]

    def idle(self) -> bool:
        if len(self.taken) < len(self.jobs):  # nothing busy, the next job is due later: time passes
            self.engine.stats["steps"] += 1
            return False
        return True


def prompts(tok, n: int) -> list[list[int]]:
    shared = "You label sentences. Answer briefly. " * 2
    return [tok(shared + f"sentence {i}: " + "word " * (i % 5))["input_ids"] for i in range(n)]


def test_rows_are_refilled_and_every_answer_equals_generate(tiny) -> None:
    model, tok = tiny
    ps = prompts(tok, 7)
    caps = [3, 9, 2, 6, 4, 8, 5]  # rows finish at different steps, freed rows are not contiguous
    jobs = [ScriptedJob(GenRequest(p, max_new_tokens=c, ignore_eos=True)) for p, c in zip(ps, caps, strict=True)]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, admit_every=1)
    engine.serve(ScriptedSource(engine, jobs, [0] * 7), max_rows=3)
    assert engine.stats["rows"] == 7 and engine.stats["batches"] > 1  # later jobs joined freed rows
    assert engine.stats["prefix_tokens_saved"] > 0  # the kept prefix was reused by single joiners
    for p, c, job in zip(ps, caps, jobs, strict=True):
        assert isinstance(job.outcome, GenResult) and job.finished == 1
        assert job.outcome.token_ids == greedy(model, tok, p, c)
        assert job.outcome.finish_reason == "length" and job.outcome.completion_tokens == c
        assert job.outcome.prompt_tokens == len(p)


def test_bucket_grows_for_late_arrivals_and_longer_prompts(tiny) -> None:
    model, tok = tiny
    ps = prompts(tok, 6)
    ps[5] = ps[5] + tok(" and a much longer tail " * 6)["input_ids"]  # needs more slots than the first bucket
    jobs = [ScriptedJob(GenRequest(p, max_new_tokens=5, ignore_eos=True)) for p in ps]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    source = ScriptedSource(engine, jobs, [0, 1, 1, 1, 2, 3])
    engine.serve(source, max_rows=8)
    assert engine.stats["grown"] >= 2
    rows = {r for r, _ in source.shapes}
    slots = {s for _, s in source.shapes}
    assert min(rows) == 1 and max(rows) >= 4 and len(slots) == 2  # rows 1 → 4 (→ 8), then more slots
    for p, job in zip(ps, jobs, strict=True):
        assert isinstance(job.outcome, GenResult)
        assert job.outcome.token_ids == greedy(model, tok, p, 5)


def test_long_answers_left_alone_move_to_a_smaller_bucket(tiny) -> None:
    model, tok = tiny
    ps = prompts(tok, 8)
    caps = [30, 2, 2, 3, 2, 2, 3, 25]  # two long answers outlive six short ones
    jobs = [ScriptedJob(GenRequest(p, max_new_tokens=c, ignore_eos=True)) for p, c in zip(ps, caps, strict=True)]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    source = ScriptedSource(engine, jobs, [0] * 8)
    engine.serve(source, max_rows=8)
    assert engine.stats["shrunk"] == 1 and {r for r, _ in source.shapes} == {8, 2}  # 2 busy rows of 8 → 2 rows
    for p, c, job in zip(ps, caps, jobs, strict=True):
        assert isinstance(job.outcome, GenResult) and job.outcome.token_ids == greedy(model, tok, p, c)


@pytest.mark.parametrize("shrink_below", [0, 2])
def test_shrink_setting_never_changes_answers(tiny, shrink_below) -> None:
    model, tok = tiny
    ps = prompts(tok, 4)
    caps = [12, 3, 12, 3]
    jobs = [ScriptedJob(GenRequest(p, max_new_tokens=c, ignore_eos=True)) for p, c in zip(ps, caps, strict=True)]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, shrink_below=shrink_below)
    engine.serve(ScriptedSource(engine, jobs, [0] * 4), max_rows=4)
    assert engine.stats["shrunk"] == (1 if shrink_below else 0)  # 2 busy of 4 rows: shrinks at 2, not at 0 (off)
    for p, c, job in zip(ps, caps, jobs, strict=True):
        assert job.outcome.token_ids == greedy(model, tok, p, c)
    with pytest.raises(ValueError, match="shrink_below"):
        Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, shrink_below=1)


def test_a_cancelled_job_frees_its_row_and_others_are_unaffected(tiny) -> None:
    model, tok = tiny
    ps = prompts(tok, 3)
    jobs = [
        ScriptedJob(GenRequest(ps[0], max_new_tokens=50, ignore_eos=True), cancel_after=4),
        ScriptedJob(GenRequest(ps[1], max_new_tokens=6, ignore_eos=True)),
        ScriptedJob(GenRequest(ps[2], max_new_tokens=6, ignore_eos=True)),
        ScriptedJob(GenRequest(ps[2], max_new_tokens=6), cancel_after=0),  # cancelled before it has a row
    ]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    engine.serve(ScriptedSource(engine, jobs, [0, 0, 8, 9]), max_rows=2)  # job 2 gets the cancelled job's row
    assert jobs[3].finished == 1 and jobs[3].outcome.finish_reason == "cancelled"
    assert jobs[3].outcome.completion_tokens == 0
    assert isinstance(jobs[0].outcome, GenResult) and jobs[0].outcome.finish_reason == "cancelled"
    assert jobs[0].outcome.completion_tokens < 50
    for p, job in zip(ps[1:], jobs[1:3], strict=True):
        assert isinstance(job.outcome, GenResult) and job.outcome.token_ids == greedy(model, tok, p, 6)
    assert engine.stats["steps"] < 20


def test_stop_tokens_end_answers_and_are_not_returned(tiny) -> None:
    model, tok = tiny
    p = prompts(tok, 1)[0]
    ref = greedy(model, tok, p, 8)
    stop = ref[3]  # pretend the 4th token is the end of sequence
    engine = Engine(model, stop_token_ids=[stop], pad_token_id=tok.pad_token_id)
    (res,) = engine.generate([GenRequest(p, max_new_tokens=8)])
    cut = ref.index(stop)
    assert res.finish_reason == "stop" and res.token_ids == ref[:cut] and res.completion_tokens == cut + 1


def test_constrained_rows_match_the_grammar_and_never_pick_padding_ids() -> None:
    model, tok = build(extra_vocab=45)  # logits past the tokenizer, as a padded vocabulary has
    vocab = model.config.vocab_size
    grammars = GrammarCache(tok, vocab, [tok.eos_token_id])
    assert grammars.vocab_size == len(tok) < vocab
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}, "n": {"type": "integer"}},
        "required": ["label", "n"],
        "additionalProperties": False,
    }
    grammar = grammars.get(schema)
    with torch.no_grad():  # make the padding ids the model's favourites: only the mask keeps them out
        model.lm_head.weight[len(tok) :] = model.lm_head.weight[: len(tok)].abs().max() * 4
    engine = Engine(
        model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, grammar_vocab=grammars.vocab_size
    )
    ps = prompts(tok, 6)
    reqs = [GenRequest(p, grammar=grammar if i % 2 == 0 else None, max_new_tokens=40) for i, p in enumerate(ps)]
    results = engine.generate(reqs, grammar_matcher=grammars.matcher)
    for i, res in enumerate(results):
        if i % 2 == 0:
            assert res.finish_reason == "stop", res
            answer = json.loads(tok.decode(res.token_ids))
            assert answer["label"] in ("positive", "negative") and isinstance(answer["n"], int)
            assert max(res.token_ids) < len(tok)
        else:  # unconstrained rows in the same batch pick what the model likes
            assert max(res.token_ids) >= len(tok)


@pytest.mark.parametrize("with_table", [True, False])
def test_a_complete_answer_ends_without_a_stop_step_even_on_its_last_allowed_token(tiny, with_table) -> None:
    # {"label":"positive"} is 20 byte tokens: with a cap of 20 it is whole ("stop", not "length"), and with any
    # cap it ends on its closing brace without a decode step for the stop token
    model, tok = tiny
    grammars = GrammarCache(tok, len(tok), [tok.eos_token_id])
    schema = {"type": "object", "properties": {"label": {"enum": ["positive"]}}, "required": ["label"]}
    grammar = grammars.get(schema)
    ends = grammars.answer_ends if with_table else None
    assert ends is None or ends[tok.convert_tokens_to_ids("}")]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, answer_ends=ends)
    reqs = [
        GenRequest(p, grammar=grammar, max_new_tokens=cap) for p, cap in zip(prompts(tok, 3), (20, 21, 64), strict=True)
    ]
    for res in engine.generate(reqs, grammar_matcher=grammars.matcher):
        assert res.finish_reason == "stop" and tok.decode(res.token_ids) == '{"label":"positive"}'
        assert res.completion_tokens == 20
    (cut,) = engine.generate([GenRequest(prompts(tok, 1)[0], grammar=grammar, max_new_tokens=19)], grammars.matcher)
    assert cut.finish_reason == "length"


def test_torch_bitmask_fallback_equals_xgrammar_kernel() -> None:
    rng = np.random.default_rng(0)
    width, rows = 1000, 5
    packed = torch.from_numpy(rng.integers(-(2**31), 2**31, size=(rows, (width + 31) // 32), dtype=np.int64)).to(
        torch.int32
    )
    bits = unpack_bits(packed, width)
    logits = torch.randn(rows, width)
    reference = logits.clone()
    xgr.apply_token_bitmask_inplace(reference, packed, vocab_size=width)
    assert torch.equal(torch.isinf(reference), ~bits)
    for row in range(rows):  # bit j of word w is token 32 w + j
        for t in (0, 31, 32, 999):
            assert bool(bits[row, t]) == bool((int(packed[row, t // 32]) >> (t % 32)) & 1)


def test_a_failing_step_fails_the_rows_then_serving_goes_on(tiny, monkeypatch) -> None:
    model, tok = tiny
    ps = prompts(tok, 4)
    jobs = [ScriptedJob(GenRequest(p, max_new_tokens=4, ignore_eos=True)) for p in ps]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    real_call = engine.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_call(*args, **kwargs)

    monkeypatch.setattr(engine, "forward", flaky)
    engine.serve(ScriptedSource(engine, jobs, [0, 0, 5, 5]), max_rows=2)
    assert all(isinstance(j.outcome, RuntimeError) for j in jobs[:2])  # in the failed prefill
    for p, job in zip(ps[2:], jobs[2:], strict=True):
        assert isinstance(job.outcome, GenResult) and job.outcome.token_ids == greedy(model, tok, p, 4)
    assert all(j.finished == 1 for j in jobs)


def test_accept_tokens_advances_matchers_like_xgrammars_batch_call(tiny) -> None:
    from polytask.local import grammar as grammar_module

    _, tok = tiny
    cache = GrammarCache(tok, len(tok), [tok.eos_token_id])
    compiled = cache.get({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    answer = tok('{"a":12}')["input_ids"]
    ours, theirs = [cache.matcher(compiled) for _ in range(2)], [cache.matcher(compiled) for _ in range(2)]
    for token in answer:
        grammar_module.accept_tokens(ours, [token, token])
        xgr.BatchGrammarMatcher.batch_accept_token(theirs, [token, token])
    assert grammar_module._RAW_ACCEPT  # the fast path is in use with the pinned xgrammar
    masks = []
    for group in (ours, theirs):
        bitmask = torch.zeros((2, (len(tok) + 31) // 32), dtype=torch.int32)
        xgr.BatchGrammarMatcher().batch_fill_next_token_bitmask(group, bitmask)
        masks.append(bitmask)
    assert torch.equal(masks[0], masks[1])
    assert all(m.accept_token(tok.eos_token_id) for m in ours)  # the answer is complete


def test_a_length_bounded_string_keeps_to_json_string_rules(tiny) -> None:
    # xgrammar alone lets a raw control character into a maxLength string and refuses escapes: invalid JSON
    _, tok = tiny
    cache = GrammarCache(tok, len(tok), [tok.eos_token_id])
    schema = {"type": "object", "properties": {"tag": {"type": "string", "maxLength": 5}}, "required": ["tag"]}
    compiled = cache.get(schema)
    assert not cache.matcher(compiled).accept_string('{"tag":"a\x05')
    assert cache.matcher(compiled).accept_string('{"tag":"a\\"b"}')
    assert schema["properties"]["tag"]["maxLength"] == 5  # the caller's schema is left as it was


def test_repetition_penalty_per_row_through_refills_growth_and_shrink(tiny) -> None:
    model, tok = tiny
    ps = prompts(tok, 8)
    caps = [20, 3, 4, 3, 18, 2, 3, 16]
    penalties = [1.0, 1.5, 1.0, 2.0, 1.5, 1.0, 3.0, 1.0]
    jobs = [
        ScriptedJob(GenRequest(p, max_new_tokens=c, ignore_eos=True, repetition_penalty=r))
        for p, c, r in zip(ps, caps, penalties, strict=True)
    ]
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, admit_every=1)
    source = ScriptedSource(engine, jobs, [0, 0, 1, 1, 2, 6, 6, 7])
    engine.serve(source, max_rows=4)
    assert engine.stats["grown"] >= 1 and engine.stats["shrunk"] >= 1 and engine.stats["rows"] == 8
    for p, c, r, job in zip(ps, caps, penalties, jobs, strict=True):
        assert isinstance(job.outcome, GenResult)
        assert job.outcome.token_ids == greedy(model, tok, p, c, penalty=r), r
    # and the penalty does change answers (a tiny random model repeats itself)
    runs = zip(ps, caps, penalties, strict=True)
    assert any(greedy(model, tok, p, c, penalty=r) != greedy(model, tok, p, c) for p, c, r in runs)


def test_a_prefill_hands_the_output_layer_a_contiguous_input_and_leaves_no_hook(tiny) -> None:
    """The last position of a prefill is a strided slice of the hidden states; the engine makes it contiguous before
    the output layer (a strided input ran as a 26.6 ms kernel per prefill on the H200), and only during its calls."""
    model, tok = tiny
    head = model.get_output_embeddings()
    seen: list[bool] = []
    probe = head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    try:
        engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        ps = prompts(tok, 3)
        results = engine.generate([GenRequest(p, max_new_tokens=2, ignore_eos=True) for p in ps])
        assert [r.token_ids for r in results] == [greedy(model, tok, p, 2) for p in ps]
        assert seen and all(seen)
        assert len(head._forward_pre_hooks) == 0  # the engine's hook is gone after its calls
        model(torch.tensor([ps[0], ps[0]]), logits_to_keep=1)
        assert seen[-1] is False  # the model's own forward is untouched: its last-position slice stays strided
    finally:
        probe.remove()


def test_close_drops_buckets_prefixes_and_model_but_keeps_stats(tiny) -> None:
    model, tok = tiny
    engine = Engine(model, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    engine.generate([GenRequest(p, max_new_tokens=2, ignore_eos=True) for p in prompts(tok, 3)])
    stats = dict(engine.stats)
    assert engine._buckets and engine._prefix and stats["rows"] == 3
    engine.close()
    assert not engine._buckets and not engine._prefix
    assert engine.model is None and engine.graph_pool is None
    assert engine.stats == stats


def test_every_per_row_array_is_declared_once_and_typed() -> None:
    from polytask.local.rows import ROW_ARRAYS, RowState

    names = [spec.name for spec in ROW_ARRAYS]
    assert len(names) == len(set(names))
    assert set(names) == set(RowState.__annotations__)
