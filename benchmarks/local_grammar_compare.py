"""Which JSON-schema constrained-decoding library the local transformers backend should use.

Compares xgrammar, llguidance, outlines-core and lm-format-enforcer side by side, in one process, with the
embedded SmolLM2-135M-Instruct on CPU (one torch thread) and polytask's real answer schemas
(``Sentiment``, ``Entities`` — ``$defs``/``$ref``, an array of objects, enums — and ``Classify``), each library
set up for compact JSON (no free whitespace) as ``polytask.local.grammar`` does for xgrammar:

1. **Schemas compiled**: which of the three schemas each library accepts (the exact error otherwise).
2. **Spec probes**: hand-written answers (valid ones, and ones breaking an enum, a numeric range, a required key,
   ``additionalProperties: false``) fed token by token through the library's mask; a library is right when it
   accepts exactly those that ``task.parse`` accepts. A false accept means the library can emit an invalid
   answer; a false reject means it forbids a valid one.
3. **Greedy decoding**: ``--sentences`` EWT sentences (``examples/ewt_dev.jsonl``) through
   ``polytask._prompts.build_messages`` and the chat template, decoded greedily in batches of 8 under the
   library's mask up to 96 new tokens (entities) or 32 (the others); answers are counted as valid (stopped and
   ``task.parse`` accepts them), cut (hit the cap), invalid (stopped but ``task.parse`` rejects them, or the
   mask left no token: should be 0). Prompt prefills are computed once and shared by every library.
4. **Speed**: grammar compile time per schema (first compile, then compiling the same schema again through the
   library's own cache if it has one), and the per-step cost of the constraint for a batch of 8 rows — filling
   the masks, applying them to the logits and advancing the row states — measured around the very same forward
   passes as the decode above, against an unconstrained step (forward + argmax) of the same batch.

Prints one table and a recommendation (correctness first, then speed); ``--json PATH`` writes every figure.
A library that is not installed (or fails to set up) is skipped with the reason. Takes ~3-5 minutes on 2 cores.

Run: ``/work/venv-local/bin/python benchmarks/local_grammar_compare.py [--sentences 20] [--json out.json]``
(``pip install xgrammar llguidance outlines-core lm-format-enforcer`` into that environment first).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LMFE_MAX_CONSECUTIVE_WHITESPACES", "0")  # compact JSON, like the other three

import torch

import polytask as pt
from polytask._prompts import build_messages

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "ewt_dev.jsonl"
BATCH = 8
NEG_INF = float("-inf")
SHIFTS = torch.arange(32, dtype=torch.int32)


def tasks() -> list[tuple[str, Any, int]]:
    """(name, task, max_new_tokens) for the three schemas compared."""
    return [
        ("sentiment", pt.Sentiment(), 32),
        ("entities", pt.Entities(), 96),
        ("classify", pt.Classify(["billing", "delivery", "other"]), 32),
    ]


# Hand-written answers per task: each is checked with task.parse for the expected verdict, then fed through
# every library's mask token by token.
PROBES: dict[str, list[str]] = {
    "sentiment": [
        '{"label":"positive","score":0.5}',
        '{"label":"negative","score":-1}',
        '{"label":"positive","score":1.0}',
        '{"label":"negative","score":-0.25}',
        '{"label":"mixed","score":0}',
        '{"label":"positive","score":5}',  # out of [-1, 1]
        '{"label":"negative","score":-1.5}',  # out of [-1, 1]
        '{"label":"happy","score":0.1}',  # not in the enum
        '{"label":"positive"}',  # required key missing
        '{"label":"positive","score":0.5,"why":"x"}',  # additionalProperties: false
    ],
    "entities": [
        '{"entities":[]}',
        '{"entities":[{"text":"Tampa Bay","label":"LOC"},{"text":"Bush","label":"PER"}]}',
        '{"entities":[{"text":"the \\"Big\\" one in Zürich","label":"MISC"}]}',  # escapes, non-ASCII
        '{"entities":[{"text":"x","label":"DATE"}]}',  # not in the enum
        '{"entities":[{"text":"x"}]}',  # required key missing
        '{"entities":[{"text":"x","label":"LOC","start":0}]}',  # additionalProperties: false ($defs)
        '{"entities":{"text":"x","label":"LOC"}}',  # not an array
    ],
    "classify": [
        '{"label":"billing"}',
        '{"label":"other"}',
        '{"label":"refund"}',  # not in the enum
        '{"label":"billing","extra":1}',  # additionalProperties: false
    ],
}


def sentences(n: int) -> list[str]:
    """The first sentence of 30-160 characters from each EWT document, until there are ``n``."""
    out: list[str] = []
    for line in DATA.read_text().splitlines():
        doc = json.loads(line)
        for span in doc["sentences"]:
            text = doc["text"][span["start"] : span["end"]].strip()
            if 30 <= len(text) <= 160:
                out.append(text)
                break
        if len(out) >= n:
            break
    return out


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """An int32 token bitmask ``(rows, words)`` as a bool ``(rows, vocab)`` allowed-mask (as polytask's engine);
    a bool mask as is."""
    if bitmask.dtype == torch.bool:
        return bitmask
    return ((bitmask[:, :, None] >> SHIFTS) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab]


# ----------------------------------------------------------------------------------------------------------------
# Libraries: init (per tokenizer) / compile (per schema) / new (per row) / fill (per step, whole batch) / accept.


class Library:
    name = ""
    dist = ""
    module = ""
    settings = ""

    def version(self) -> str | None:
        if importlib.util.find_spec(self.module) is None:
            return None
        try:
            return importlib.metadata.version(self.dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    def init(self, tok: Any, vocab: int, stop: list[int]) -> None:
        self.vocab, self.stop = vocab, stop

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def new(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, states: list[Any], rows: list[int]) -> torch.Tensor:
        """The next-token masks of ``rows``: an int32 bitmask ``(len(states), words)`` or a bool
        ``(len(states), vocab)`` allowed-mask; the other rows are stale."""
        raise NotImplementedError

    def accept(self, state: Any, token: int) -> bool:
        raise NotImplementedError

    def _bitmask(self, n: int) -> torch.Tensor:
        words = (self.vocab + 31) // 32
        bm = getattr(self, "_bm", None)
        if bm is None or bm.shape[0] != n:
            bm = self._bm = torch.full((n, words), -1, dtype=torch.int32)
        return bm


class XGrammar(Library):
    name, dist, module = "xgrammar", "xgrammar", "xgrammar"
    settings = "any_whitespace=False, separators=(',', ':'), strict_mode=True; BatchGrammarMatcher fill"

    def init(self, tok: Any, vocab: int, stop: list[int]) -> None:
        super().init(tok, vocab, stop)
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=stop)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        self.batch = xgr.BatchGrammarMatcher()

    def compile(self, schema: dict[str, Any]) -> Any:
        text = json.dumps(schema, separators=(",", ":"))
        return self.compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"), strict_mode=True)

    def new(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, states: list[Any], rows: list[int]) -> torch.Tensor:
        bm = self._bitmask(len(states))
        self.batch.batch_fill_next_token_bitmask([states[i] for i in rows], bm, indices=rows)
        return bm

    def accept(self, state: Any, token: int) -> bool:
        return bool(state.accept_token(token))


class LLGuidance(Library):
    name, dist, module = "llguidance", "llguidance", "llguidance"
    settings = "whitespace_flexible=False (',' and ':'); LLMatcher per row, LLExecutor fill_next_token_bitmask_par"

    def init(self, tok: Any, vocab: int, stop: list[int]) -> None:
        super().init(tok, vocab, stop)
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=stop)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def new(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, states: list[Any], rows: list[int]) -> torch.Tensor:
        bm = self._bitmask(len(states))
        self.llg.torch.fill_next_token_bitmask_par(self.executor, [(states[i], i) for i in rows], bm)
        return bm

    def accept(self, state: Any, token: int) -> bool:
        return bool(state.consume_token(token))


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable stand-in character of every byte, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class OutlinesCore(Library):
    name, dist, module = "outlines-core", "outlines-core", "outlines_core"
    settings = "build_regex_from_schema(whitespace_pattern=''), Index + Guide per row, write_mask_into per row"

    def init(self, tok: Any, vocab: int, stop: list[int]) -> None:
        super().init(tok, vocab, stop)
        import outlines_core

        self.oc = outlines_core
        # Vocabulary.from_pretrained would fetch tokenizer.json from the hub: build it from the tokenizer instead
        # (token strings → bytes through the byte-level BPE alphabet; special tokens left out).
        decoder = _byte_decoder()
        special = set(tok.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        skipped = 0
        for text, idx in tok.get_vocab().items():
            if idx in special or idx >= vocab:
                continue
            try:
                key = bytes(decoder[c] for c in text)
            except KeyError:
                skipped += 1
                continue
            tokens.setdefault(key, []).append(idx)
        if len(stop) != 1:
            raise ValueError(f"outlines-core Vocabulary takes one eos id, the model has {stop}")
        self.vocabulary = outlines_core.Vocabulary(stop[0], tokens)
        self.skipped_tokens = skipped

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return self.oc.Index(regex, self.vocabulary)

    def new(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, states: list[Any], rows: list[int]) -> torch.Tensor:
        bm = self._bitmask(len(states))
        words = bm.shape[1]
        for i in rows:
            states[i].write_mask_into(bm[i].data_ptr(), words, 4)
        return bm

    def accept(self, state: Any, token: int) -> bool:
        try:
            state.advance(token, False)
        except (ValueError, RuntimeError):
            return False
        return True


class LMFormatEnforcer(Library):
    name, dist, module = "lm-format-enforcer", "lm-format-enforcer", "lmformatenforcer"
    settings = "JsonSchemaParser, LMFE_MAX_CONSECUTIVE_WHITESPACES=0; one TokenEnforcer per schema, token lists"

    def init(self, tok: Any, vocab: int, stop: list[int]) -> None:
        super().init(tok, vocab, stop)
        import lmformatenforcer

        self.lmfe = lmformatenforcer
        try:
            from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data

            self.data = build_token_enforcer_tokenizer_data(tok, vocab_size=vocab)
            self.integration = "lmformatenforcer.integrations.transformers"
        except ImportError as exc:
            # 0.11.3's transformers integration imports transformers.tokenization_utils, gone in transformers 5
            # (the ImportError is re-raised as "transformers is not installed"): the same tokenizer data, built
            # here the way that module builds it.
            self.integration = f"own copy of build_token_enforcer_tokenizer_data (integration: ImportError: {exc})"
            self.data = _lmfe_tokenizer_data(tok, vocab)
        self.root = int(tok.convert_tokens_to_ids("\n"))  # a stand-in "prompt" token: states are keyed by tokens

    def compile(self, schema: dict[str, Any]) -> Any:
        parser = self.lmfe.JsonSchemaParser(schema)
        return self.lmfe.TokenEnforcer(self.data, parser)

    def new(self, compiled: Any) -> Any:
        return (compiled, [self.root])

    def fill(self, states: list[Any], rows: list[int]) -> torch.Tensor:
        allowed = torch.zeros((len(states), self.vocab), dtype=torch.bool)
        for i in rows:
            enforcer, seq = states[i]
            ids = enforcer.get_allowed_tokens(seq).allowed_tokens
            allowed[i, torch.tensor(ids, dtype=torch.long)] = True
        return allowed

    def accept(self, state: Any, token: int) -> bool:
        state[1].append(token)
        return True


def _lmfe_tokenizer_data(tok: Any, vocab: int) -> Any:
    """lmformatenforcer.integrations.transformers.build_token_enforcer_tokenizer_data (0.11.3), without the
    transformers 4 imports of that module."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    token_0 = tok.encode("0")[-1]
    special = set(tok.all_special_ids)
    regular = []
    for idx in range(vocab):
        if idx in special:
            continue
        after_0 = tok.decode([token_0, idx])[1:]  # a leading space survives after "0"
        alone = tok.decode([idx])
        regular.append((idx, after_0, len(after_0) > len(alone)))

    def decode(ids: list[int]) -> str:
        return str(tok.decode(ids)).rstrip("\ufffd")

    return TokenEnforcerTokenizerData(regular, decode, tok.eos_token_id, False, vocab)


LIBRARIES = [XGrammar, LLGuidance, OutlinesCore, LMFormatEnforcer]


# ----------------------------------------------------------------------------------------------------------------
# Model side: shared prefills, constrained greedy decode, unconstrained baseline.


def prefill(model: Any, rows: list[list[int]], pad: int) -> dict[str, Any]:
    """One left-padded forward pass over the prompts; the cache and last logits, reused by every library."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    return {"cache": out.past_key_values, "logits": out.logits[:, -1].float(), "attn": attn, "pos": pos[:, -1] + 1}


def step(model: Any, state: dict[str, Any], feed: torch.Tensor) -> torch.Tensor:
    """One decode forward pass for the whole batch; returns the next logits."""
    state["attn"] = torch.cat([state["attn"], torch.ones((feed.shape[0], 1), dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(
            input_ids=feed[:, None],
            attention_mask=state["attn"],
            position_ids=state["pos"][:, None],
            past_key_values=state["cache"],
            use_cache=True,
        )
    state["pos"] = state["pos"] + 1
    return out.logits[:, -1].float()


def fresh(pre: dict[str, Any]) -> dict[str, Any]:
    return {"cache": copy.deepcopy(pre["cache"]), "attn": pre["attn"].clone(), "pos": pre["pos"].clone()}


def decode(
    model: Any, lib: Library, compiled: Any, pre: dict[str, Any], cap: int, stop: list[int], pad: int
) -> tuple[list[list[int]], list[str], list[dict[str, float]]]:
    """Greedy decode under ``lib``'s mask; (tokens, finish reasons, per-step timings)."""
    n = pre["logits"].shape[0]
    state = fresh(pre)
    logits = pre["logits"].clone()
    rows = [lib.new(compiled) for _ in range(n)]
    out: list[list[int]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    live = list(range(n))
    steps: list[dict[str, float]] = []
    stops = set(stop)
    for _ in range(cap + 1):
        t0 = time.perf_counter()
        mask = lib.fill(rows, live)
        tf = time.perf_counter()
        allowed = unpack(mask, logits.shape[-1])
        logits.masked_fill_(~allowed, NEG_INF)
        t1 = time.perf_counter()
        picked = logits.argmax(-1)
        toks = picked.tolist()
        t2 = time.perf_counter()
        any_allowed = allowed.any(-1).tolist()
        for i in live:
            t = toks[i]
            if not any_allowed[i]:
                finish[i] = "dead-end"
            elif t in stops:
                finish[i] = "stop"
            elif len(out[i]) >= cap:
                finish[i] = "length"
            else:
                out[i].append(t)
                if not lib.accept(rows[i], t):
                    finish[i] = "rejected"
        t3 = time.perf_counter()
        record = {
            "live": len(live),
            "mask_s": (t1 - t0) + (t3 - t2),
            "fill_s": tf - t0,
            "apply_s": t1 - tf,
            "advance_s": t3 - t2,
            "argmax_s": t2 - t1,
        }
        live = [i for i in live if finish[i] is None]
        if not live:
            steps.append(record)
            break
        feed = torch.tensor([toks[i] if finish[i] is None else pad for i in range(n)], dtype=torch.long)
        t4 = time.perf_counter()
        logits = step(model, state, feed)
        record["forward_s"] = time.perf_counter() - t4
        steps.append(record)
    return out, [f or "length" for f in finish], steps


def baseline(model: Any, pre: dict[str, Any], n_steps: int) -> list[float]:
    """Unconstrained steps (argmax + forward) of the same batch from the same prefill; seconds per step."""
    state = fresh(pre)
    logits = pre["logits"].clone()
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        feed = logits.argmax(-1)
        logits = step(model, state, feed)
        times.append(time.perf_counter() - t0)
    return times


def probe(lib: Library, compiled: Any, ids: list[int], stop: list[int]) -> bool:
    """Does ``lib`` allow the answer ``ids`` followed by a stop token?"""
    state = [lib.new(compiled)]
    for t in ids:
        if not bool(unpack(lib.fill(state, [0]), lib.vocab)[0, t]) or not lib.accept(state[0], t):
            return False
    return bool(unpack(lib.fill(state, [0]), lib.vocab)[0, stop].any())


# ----------------------------------------------------------------------------------------------------------------


def run_library(
    lib: Library,
    model: Any,
    tok: Any,
    vocab: int,
    stop: list[int],
    pad: int,
    work: list[dict[str, Any]],
    probes: dict[str, list[tuple[str, list[int], bool]]],
    split: list[tuple[str, str, list[int]]],
) -> dict[str, Any]:
    res: dict[str, Any] = {"library": lib.name, "version": lib.version(), "settings": lib.settings}
    t0 = time.perf_counter()
    try:
        lib.init(tok, vocab, stop)
    except Exception as exc:
        res["skipped"] = f"set-up failed: {type(exc).__name__}: {exc}"
        return res
    res["init_s"] = time.perf_counter() - t0
    if getattr(lib, "integration", None):
        res["integration"] = lib.integration
    compiled: dict[str, Any] = {}
    res["compile"], res["compile_errors"] = {}, {}
    for name, task, _ in tasks():
        schema = task.json_schema()
        try:
            # compile + the first mask of a fresh row: llguidance and lm-format-enforcer defer work to the first
            # mask, xgrammar and outlines-core do it in the compile; "again" compiles the same schema once more
            # (through the library's own cache where it has one)
            times = []
            for _ in range(2):
                t1 = time.perf_counter()
                c = lib.compile(schema)
                t2 = time.perf_counter()
                lib.fill([lib.new(c)], [0])
                times.append((t2 - t1, time.perf_counter() - t1))
                compiled.setdefault(name, c)
            res["compile"][name] = {
                "first_ms": times[0][1] * 1e3,
                "again_ms": times[1][1] * 1e3,
                "compile_only_first_ms": times[0][0] * 1e3,
                "compile_only_again_ms": times[1][0] * 1e3,
            }
        except Exception as exc:
            res["compile_errors"][name] = f"{type(exc).__name__}: {str(exc)[:400]}"
    res["schemas_compiled"] = len(compiled)

    # spec probes
    res["probes"] = {"right": 0, "false_accept": [], "false_reject": []}
    for name, items in probes.items():
        if name not in compiled:
            continue
        for text, ids, expected in items:
            try:
                got = probe(lib, compiled[name], ids, stop)
            except Exception as exc:
                got = None
                res["probes"]["false_reject"].append(f"{text} (error: {type(exc).__name__}: {exc})")
                continue
            if got == expected:
                res["probes"]["right"] += 1
            else:
                res["probes"]["false_accept" if got else "false_reject"].append(text)

    # valid answers in non-canonical tokens: not a correctness error (same language), but it steers greedy decoding
    res["split_probes"] = {"accepted": 0, "total": 0, "refused": []}
    for name, text, ids in split:
        if name in compiled:
            res["split_probes"]["total"] += 1
            try:
                ok = probe(lib, compiled[name], ids, stop)
            except Exception:
                ok = False
            if ok:
                res["split_probes"]["accepted"] += 1
            else:
                res["split_probes"]["refused"].append(text)

    # greedy decode
    counts = {"valid": 0, "finished": 0, "cut": 0, "invalid": 0, "not_compiled": 0}
    per_task: dict[str, dict[str, int]] = {}
    invalid: list[dict[str, str]] = []
    answers: dict[str, list[str]] = {}
    mask_full: list[dict[str, float]] = []  # steps where all 8 rows were live
    mask_all, rowsteps, fwd = 0.0, 0, []
    for item in work:
        name, task = item["task"], item["task_obj"]
        tc = per_task.setdefault(name, {"valid": 0, "finished": 0, "cut": 0, "invalid": 0})
        if name not in compiled:
            counts["not_compiled"] += len(item["rows"])
            continue
        try:
            out, finish, steps = decode(model, lib, compiled[name], item["pre"], item["cap"], stop, pad)
        except Exception as exc:
            res.setdefault("decode_errors", []).append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            counts["invalid"] += len(item["rows"])
            tc["invalid"] += len(item["rows"])
            continue
        texts = tok.batch_decode(out, skip_special_tokens=True)
        for text, why in zip(texts, finish, strict=True):
            answers.setdefault(name, []).append(text)
            if why == "length":
                counts["cut"] += 1
                tc["cut"] += 1
                continue
            ok = why == "stop"
            if ok:
                counts["finished"] += 1
                tc["finished"] += 1
                try:
                    task.parse(text)
                except Exception as exc:
                    ok = False
                    why = f"parse: {type(exc).__name__}: {str(exc)[:200]}"
            if ok:
                counts["valid"] += 1
                tc["valid"] += 1
            else:
                counts["invalid"] += 1
                tc["invalid"] += 1
                invalid.append({"task": name, "text": text, "why": why})
        if len(item["rows"]) == BATCH:
            for s in steps:
                mask_all += s["mask_s"]
                rowsteps += s["live"]
                if s["live"] == BATCH:
                    mask_full.append(s)
                if "forward_s" in s:
                    fwd.append(s["forward_s"] + s["argmax_s"])
    res["counts"], res["per_task"], res["invalid"], res["answers"] = counts, per_task, invalid[:10], answers
    for part in ("mask", "fill", "apply", "advance", "own"):
        key = f"{part}_ms_step_b8"
        if part == "own":  # the library's own work: fill + advance (apply is the same code for all)
            vals = [x["fill_s"] + x["advance_s"] for x in mask_full]
        else:
            vals = [x[f"{part}_s"] for x in mask_full]
        res[key] = statistics.median(vals) * 1e3 if vals else None
    res["mask_steps_b8"] = len(mask_full)
    res["mask_us_per_row_step"] = mask_all / rowsteps * 1e6 if rowsteps else None
    res["forward_ms_step_b8"] = statistics.median(fwd) * 1e3 if fwd else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=20, help="EWT sentences per task (default 20)")
    ap.add_argument("--json", type=Path, help="write every figure here as JSON")
    ap.add_argument("--libraries", default=",".join(c.name for c in LIBRARIES), help="comma-separated subset")
    ap.add_argument("--baseline-steps", type=int, default=16, help="unconstrained steps per batch of 8")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    from polytask.local.model import EMBEDDED_MODEL, load_model

    t = time.perf_counter()
    model, tok = load_model(None, device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t
    cfg = model.config
    vocab = int(cfg.vocab_size)
    stop = sorted({tok.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None))) - {None})
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]

    # prompts and shared prefills
    sents = sentences(args.sentences)
    work: list[dict[str, Any]] = []
    t = time.perf_counter()
    for name, task, cap in tasks():
        ids = []
        for s in sents:
            enc = tok.apply_chat_template(build_messages(task, s), add_generation_prompt=True, tokenize=True)
            ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
        for b in range(0, len(ids), BATCH):
            rows = ids[b : b + BATCH]
            work.append({"task": name, "task_obj": task, "cap": cap, "rows": rows, "pre": prefill(model, rows, pad)})
    prefill_s = time.perf_counter() - t

    # unconstrained baseline: the first full batch of each task
    base: list[float] = []
    for name, *_ in tasks():
        item = next((w for w in work if w["task"] == name and len(w["rows"]) == BATCH), None)
        if item is not None:
            base += baseline(model, item["pre"], args.baseline_steps)[1:]  # first step warms up
    base_ms = statistics.median(base) * 1e3 if base else None

    # probes: expected verdict from task.parse
    probes: dict[str, list[tuple[str, list[int], bool]]] = {}
    split: list[tuple[str, str, list[int]]] = []
    for name, task, _ in tasks():
        for text in PROBES[name]:
            try:
                task.parse(text)
                ok = True
            except Exception:
                ok = False
            probes.setdefault(name, []).append((text, tok.encode(text, add_special_tokens=False), ok))
            if ok:  # the same valid answer, one character per token (not the tokenizer's own split)
                chars = [t for ch in text for t in tok.encode(ch, add_special_tokens=False)]
                split.append((name, text, chars))

    wanted = {x.strip() for x in args.libraries.split(",")}
    results = []
    for cls in LIBRARIES:
        lib = cls()
        if lib.name not in wanted:
            continue
        if lib.version() is None:
            results.append({"library": lib.name, "version": None, "skipped": f"not installed (pip install {lib.dist})"})
            print(f"[skip] {lib.name}: not installed", file=sys.stderr)
            continue
        t = time.perf_counter()
        r = run_library(lib, model, tok, vocab, stop, pad, work, probes, split)
        r["wall_s"] = time.perf_counter() - t
        if base_ms and r.get("mask_ms_step_b8") is not None:
            r["overhead_pct"] = 100 * r["mask_ms_step_b8"] / base_ms
        results.append(r)
        print(f"[done] {lib.name} in {r['wall_s']:.1f} s", file=sys.stderr)

    meta = {
        "model": EMBEDDED_MODEL,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "sentences": len(sents),
        "batch": BATCH,
        "max_new_tokens": {n: c for n, _, c in tasks()},
        "stop_token_ids": stop,
        "vocab_size": vocab,
        "model_load_s": load_s,
        "prefill_s": prefill_s,
        "unconstrained_step_ms_b8": base_ms,
        "versions": {p: _version(p) for p in ("torch", "transformers", "tokenizers", "pydantic", "polytask", "numpy")},
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "probes": {n: [(text, ok) for text, _, ok in items] for n, items in probes.items()},
        "total_s": None,
    }
    meta["total_s"] = time.perf_counter() - started
    report(meta, results)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
        print(f"\nwrote {args.json}")


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [] if x is None else [x]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    n_probes = sum(len(v) for v in meta["probes"].values())
    total = meta["sentences"] * len(meta["max_new_tokens"])
    print(
        f"\nmodel: {meta['model']} on CPU, {meta['torch_threads']} torch thread; {meta['sentences']} sentences x "
        f"{len(meta['max_new_tokens'])} tasks = {total} greedy answers per library, batches of {meta['batch']}; "
        f"unconstrained step (batch {meta['batch']}): {_fmt(meta['unconstrained_step_ms_b8'], '.1f')} ms "
        f"(forward + argmax); total run {meta['total_s']:.0f} s"
    )
    print(", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    head = (
        f"{'library':<19}{'version':<9}{'schemas':>8}  {'valid/finished/cut/invalid':>27}  {'probes':>7}  "
        f"{'compile ms 1st/again':>21}  {'mask ms/step':>12}  {'fill/apply/adv':>15}  {'overhead':>8}  "
        f"{'µs/row-step':>11}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        if "skipped" in r:
            print(f"{r['library']:<19}{r['version'] or '-':<9}  skipped: {r['skipped']}")
            continue
        c = r["counts"]
        vfci = f"{c['valid']}/{c['finished']}/{c['cut']}/{c['invalid']}"
        if c["not_compiled"]:
            vfci += f" (+{c['not_compiled']} n/c)"
        comp = r["compile"].values()
        first = sum(x["first_ms"] for x in comp) / len(comp) if comp else None
        again = sum(x["again_ms"] for x in comp) / len(comp) if comp else None
        pr = f"{r['probes']['right']}/{n_probes}"
        parts = "/".join(_fmt(r.get(f"{p}_ms_step_b8"), ".2f") for p in ("fill", "apply", "advance"))
        print(
            f"{r['library']:<19}{r['version']:<9}{r['schemas_compiled']:>6}/3  {vfci:>27}  {pr:>7}  "
            f"{_fmt(first, '.1f'):>10}/{_fmt(again, '.2f'):<10}  {_fmt(r.get('mask_ms_step_b8'), '.2f'):>12}  "
            f"{parts:>15}  {_fmt(r.get('overhead_pct'), '.1f'):>7}%  {_fmt(r.get('mask_us_per_row_step'), '.0f'):>11}"
        )
    legend = [
        "valid = stopped and task.parse accepts; cut = hit max_new_tokens; invalid = stopped but rejected, or no token "
        "left (should be 0);",
        "probes = hand-written answers the library judges as task.parse does;",
        "compile ms = compile + the first mask of a row, mean over the schemas, first time / same schema again;",
        "mask ms/step = median cost (fill + apply + advance) of a decode step with all 8 rows live; overhead = that / "
        "the unconstrained step;",
        "fill/apply/adv = its parts: the library fills the masks / the shared bitmask → logits apply "
        "(lm-format-enforcer: token lists → bool mask, in fill) / the library advances the rows;",
        "µs/row-step = all constrained steps' cost / live rows.",
    ]
    print("\n" + "\n".join(legend))
    ref = next((r for r in results if "answers" in r), None)
    for r in results:
        if "skipped" in r:
            continue
        notes = []
        if ref is not None and r is not ref:
            same = sum(
                a == b
                for name in ref["answers"]
                for a, b in zip(ref["answers"][name], r["answers"].get(name, []), strict=False)
            )
            notes.append(f"greedy answers identical to {ref['library']}'s: {same}/{total}")
        sp = r.get("split_probes", {})
        if sp.get("total"):
            notes.append(f"valid answers fed one character per token: {sp['accepted']}/{sp['total']} accepted")
        if "own copy" in r.get("integration", ""):
            notes.append(f"set up through an {r['integration']}")
        for name, err in r["compile_errors"].items():
            notes.append(f"cannot compile {name}: {err}")
        if r["probes"]["false_accept"]:
            notes.append(f"accepts invalid: {r['probes']['false_accept']}")
        if r["probes"]["false_reject"]:
            notes.append(f"rejects valid: {r['probes']['false_reject']}")
        for bad in r["invalid"][:3]:
            notes.append(f"invalid {bad['task']} answer {bad['text']!r}: {bad['why']}")
        for err in r.get("decode_errors", []):
            notes.append(f"decode error: {err}")
        if notes:
            print(f"\n{r['library']}:\n  " + "\n  ".join(notes))
    print("\n" + recommend(results, n_probes, total))


def _compile_ms(r: dict[str, Any]) -> str:
    comp = list(r.get("compile", {}).values())
    if not comp:
        return "-"
    first = sum(x["first_ms"] for x in comp) / len(comp)
    again = sum(x["again_ms"] for x in comp) / len(comp)
    return f"{first:.1f} / {again:.2f}"


def recommend(results: list[dict[str, Any]], n_probes: int, total: int) -> str:
    ran = [r for r in results if "skipped" not in r]
    if not ran:
        return "recommendation: nothing ran."

    def correct_key(r: dict[str, Any]) -> tuple[Any, ...]:
        c = r["counts"]
        return (-r["schemas_compiled"], c["invalid"], len(r["probes"]["false_accept"]), -c["valid"])

    def full(r: dict[str, Any]) -> bool:
        c = r["counts"]
        return r["schemas_compiled"] == 3 and c["invalid"] == 0 and not r["probes"]["false_accept"]

    correct = [r for r in ran if full(r)]
    pool = correct or ran
    best_key = min(correct_key(r) for r in pool)
    tied = [r for r in pool if correct_key(r)[:3] == best_key[:3]]
    pick = min(tied, key=lambda r: r.get("own_ms_step_b8") or float("inf"))
    lines = [
        f"recommendation: {pick['library']} {pick['version']}. Correctness first: "
        + "; ".join(
            f"{r['library']} compiled {r['schemas_compiled']}/3 schemas, {r['counts']['valid']}/{total} valid, "
            f"{r['counts']['invalid']} invalid, {len(r['probes']['false_accept'])} invalid probe answers allowed, "
            f"{len(r['probes']['false_reject'])} valid ones refused"
            for r in ran
        )
        + ". Then speed, the library's own work per batch-of-8 step (fill + advance; whole mask cost in "
        "brackets) and compile (first / again): "
        + ", ".join(
            f"{r['library']} {_fmt(r.get('own_ms_step_b8'), '.2f')} ms ({_fmt(r.get('mask_ms_step_b8'), '.2f')} ms, "
            f"{_fmt(r.get('overhead_pct'), '.1f')}% of a step), {_compile_ms(r)} ms"
            for r in ran
        )
        + ".",
    ]
    for r in ran:
        sp = r.get("split_probes", {})
        if sp.get("total") and sp["accepted"] < sp["total"]:
            lines.append(
                f"{r['library']} refuses valid answers spelled in non-canonical tokens ({sp['accepted']}/{sp['total']} "
                "accepted when fed one character per token), so where the model prefers such a split its greedy "
                "answers differ from the other libraries' (same validity, different text)."
            )
    skipped = [r for r in results if "skipped" in r]
    if skipped:
        lines.append("Not compared: " + "; ".join(f"{r['library']} ({r['skipped']})" for r in skipped) + ".")
    return " ".join(lines)


if __name__ == "__main__":
    main()
