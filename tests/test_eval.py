"""polytask eval: precision / recall / F1 of sentence boundaries and entities (exact span + label, per label),
sentiment accuracy, and what the run cost, for configurations side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import polytask as pt
from cli_helpers import own_cache_dir  # noqa: F401 (the fixture)
from polytask.cli import app
from polytask.evaluate import Counts, score
from polytask.tasks.entities import DocumentEntities, Entity
from polytask.tasks.sentiment import DocumentSentiment

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def test_counts_are_micro_averaged_with_duplicates_counted():
    counts = Counts()
    counts.add([(0, 3, "PER"), (5, 9, "LOC"), (5, 9, "LOC")], [(0, 3, "PER"), (5, 9, "ORG"), (5, 9, "LOC")])
    counts.add([], [(1, 2, "MISC")])
    assert (counts.tp, counts.fp, counts.fn) == (2, 1, 2)
    assert counts.precision == pytest.approx(2 / 3) and counts.recall == pytest.approx(0.5)
    assert counts.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert Counts().f1 == 0.0


def test_score_reads_sentences_entities_and_sentiment_against_gold():
    text = "Ann met Bob. In Rome."
    sentences = [
        pt.Sentence(index=0, start=0, end=12, text=text[:12]),
        pt.Sentence(index=1, start=13, end=21, text=text[13:]),
    ]
    entities = DocumentEntities(
        entities=[
            Entity(
                text="Ann",
                label="PER",
                start=0,
                end=3,
                sentence=0,
                sentence_start=0,
                sentence_end=3,
                aligned=True,
                match="exact",
            ),
            Entity(
                text="Rome",
                label="ORG",
                start=16,
                end=20,
                sentence=1,
                sentence_start=3,
                sentence_end=7,
                aligned=True,
                match="exact",
            ),
            Entity(
                text="Zed",
                label="PER",
                start=None,
                end=None,
                sentence=1,
                sentence_start=None,
                sentence_end=None,
                aligned=False,
                match=None,
            ),
        ],
        coverage=1.0,
    )
    result = pt.DocumentResult(
        id="d1",
        text=text,
        sentences=sentences,
        results={
            "entities": entities,
            "sentiment": DocumentSentiment(label="neutral", score=0.0, coverage=1.0, sentences=2),
        },
        pairs=[],
        partial=False,
        elapsed=0.0,
        usage=pt.Usage(),
    )
    gold = {
        "d1": {
            "sentences": [{"start": 0, "end": 12}, {"start": 13, "end": 21}],
            "entities": [
                {"start": 0, "end": 3, "label": "PER"},
                {"start": 8, "end": 11, "label": "PER"},
                {"start": 16, "end": 20, "label": "LOC"},
            ],
            "sentiment": "positive",
        }
    }
    scores = score(gold, [result])
    assert scores.documents == 1 and scores.sentences.f1 == 1.0
    assert (scores.entities.tp, scores.entities.fp, scores.entities.fn) == (1, 2, 2)  # unaligned Zed: a false positive
    assert scores.entities_by_label["LOC"].recall == 0.0 and scores.entities_by_label["PER"].tp == 1
    assert scores.sentiment_accuracy == 0.0 and scores.sentiment_total == 1
    with pytest.raises(ValueError, match=r"'d1'.*'entities'"):
        score({"d1": {"entities": [{"start": "0", "end": 3}]}}, [result])


def test_polytask_eval_against_the_gold_itself_compares_configurations(tmp_path):
    result = runner.invoke(
        app,
        ["eval", str(DATA / "oracle_sample.jsonl"), "--simulate", "--compare", "context=0", "--compare", "context=1"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    (header,) = [line for line in lines if "context=0" in line]
    assert "context=1" in header
    (entities,) = [line for line in lines if "entities P / R / F1" in line]
    assert entities.count("1.000 / 1.000 / 1.000") == 2  # the simulator answers from the gold: the pipeline is exact
    (calls,) = [line for line in lines if line.startswith("│ calls")]
    (tokens,) = [line for line in lines if "prompt / completion tokens" in line]
    prompt = [int(cell.split("/")[0].replace(",", "")) for cell in tokens.split("│")[2:4]]
    assert prompt[1] > prompt[0]  # context costs prompt tokens
    assert len({cell.strip() for cell in calls.split("│")[2:4]}) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare", "colour=red"], "expected KEY=VALUE with KEY one of"),
        (["--compare", "context=many"], "'many' is not a valid context"),
    ],
)
def test_polytask_eval_refuses_what_it_cannot_run(tmp_path, args, message):
    result = runner.invoke(app, ["eval", str(DATA / "oracle_sample.jsonl"), "--simulate", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_polytask_eval_names_a_bad_gold_line(tmp_path):
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"id": "a", "text": "One."}) + "\n" + json.dumps({"id": "a", "text": "Two."}) + "\n")
    result = runner.invoke(app, ["eval", str(gold), "--simulate"])
    assert result.exit_code == 2 and "line 2" in result.output and "'a' is used twice" in result.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "nope.jsonl"), "--simulate"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
