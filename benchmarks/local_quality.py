"""Answer quality of a local model (default: the embedded SmolLM2-135M-Instruct) on ../shared/data.

Entities: F1 of (lower-cased text, label) mentions against the gold PER/ORG/LOC of a sample of English EWT
sentences (predicted MISC dropped: the gold has none), with polytask's own prompts (``build_messages`` and the
``Entities`` task) and prompt variants. Sentiment: the label distribution and score spread over the same sample
(does the model say different things for different sentences?).

Example: ``python benchmarks/local_quality.py --sentences 40 --variants default,fewshot``; ``--penalties 1,1.3``
compares repetition penalties side by side (the same model, one after the other in one run).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

import anyio

from polytask._prompts import build_messages
from polytask.backends.base import ChatRequest
from polytask.backends.transformers import TransformersBackend
from polytask.tasks.entities import Entities, EntitiesAnswer, EntityMention
from polytask.tasks.sentiment import Sentiment

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ewt_dev.jsonl"
DATA = SHARED if SHARED.is_file() else Path(__file__).resolve().parents[1] / "examples" / "ewt_dev.jsonl"
FEWSHOT = [
    (
        "Barack Obama met Angela Merkel in Berlin.",
        EntitiesAnswer(
            entities=[
                EntityMention(text="Barack Obama", label="PER"),
                EntityMention(text="Angela Merkel", label="PER"),
                EntityMention(text="Berlin", label="LOC"),
            ]
        ),
    ),
    ("I bought a phone from Apple last week.", EntitiesAnswer(entities=[EntityMention(text="Apple", label="ORG")])),
    ("the food was great and the staff friendly.", EntitiesAnswer(entities=[])),
]


def sample(n: int, seed: int = 0) -> list[tuple[str, set[tuple[str, str]]]]:
    out = []
    for line in DATA.read_text().splitlines():
        doc = json.loads(line)
        for s in doc["sentences"]:
            gold = {
                (e["text"].lower(), e["label"])
                for e in doc["entities"]
                if e["start"] >= s["start"] and e["end"] <= s["end"]
            }
            out.append((doc["text"][s["start"] : s["end"]], gold))
    random.Random(seed).shuffle(out)
    return out[:n]


async def ask(backend: TransformersBackend, task, sentences: list[str]) -> list:
    out: list = [None] * len(sentences)
    async with anyio.create_task_group() as tg:
        for i, s in enumerate(sentences):

            async def one(i: int = i, s: str = s) -> None:
                r = ChatRequest(
                    messages=build_messages(task, s),
                    schema_name=task.name,
                    json_schema=task.json_schema(),
                    max_tokens=task.max_tokens,
                )
                out[i] = await backend.complete(r)

            tg.start_soon(one)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory / .gguf / cached hub id (default: embedded)")
    p.add_argument("--sentences", type=int, default=40)
    p.add_argument("--variants", default="default,fewshot")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument(
        "--penalties", default=None, help="repetition penalties to compare, e.g. 1,1.3 (default: the backend's)"
    )
    args = p.parse_args()
    backend = TransformersBackend(args.model, max_batch_size=64, cpu_threads=1)
    data = sample(args.sentences)
    sentences = [s for s, _ in data]
    for penalty in args.penalties.split(",") if args.penalties else [None]:
        if penalty is not None:
            backend.repetition_penalty = float(penalty)
        print(f"# repetition_penalty={backend.repetition_penalty:g}", flush=True)
        evaluate(backend, args, data, sentences)


def evaluate(backend: TransformersBackend, args: argparse.Namespace, data: list, sentences: list[str]) -> None:
    for variant in args.variants.split(","):
        task = Entities(max_tokens=args.max_tokens)
        if variant == "fewshot":
            task.examples = tuple(FEWSHOT)
        t = time.perf_counter()
        answers = anyio.run(ask, backend, task, sentences)
        tp = fp = fn = parsed = 0
        cut = sum(a.finish_reason == "length" for a in answers)
        tokens = sum(a.completion_tokens for a in answers)
        for a, (_, gold) in zip(answers, data, strict=True):
            try:
                pred = {(m.text.lower(), m.label) for m in task.parse(a.content).entities if m.label != "MISC"}
                parsed += 1
            except ValueError:
                pred = set()
            tp += len(pred & gold)
            fp += len(pred - gold)
            fn += len(gold - pred)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        print(
            f"entities[{variant}]: n={len(data)} parsed={parsed} P={prec:.3f} R={rec:.3f} F1={f1:.3f} "
            f"gold={tp + fn} predicted={tp + fp} cut={cut} tokens={tokens} ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    task = Sentiment()
    answers = anyio.run(ask, backend, task, sentences)
    parsed = [task.parse(a.content) for a in answers if a.finish_reason == "stop"]
    labels = collections.Counter(a.label for a in parsed)
    scores = [a.score for a in parsed]
    print(
        f"sentiment: n={len(answers)} parsed={len(parsed)} labels={dict(labels)} "
        f"score min/max={min(scores, default=0):.2f}/{max(scores, default=0):.2f} "
        f"distinct scores={len(set(scores))}",
        flush=True,
    )


if __name__ == "__main__":
    main()
