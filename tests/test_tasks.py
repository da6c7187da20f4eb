import pytest
from pydantic import BaseModel

from polytask import Classify, ConfigurationError, Entities, Sentence, Sentiment, Task
from polytask.tasks import EntitiesAnswer, SentimentAnswer, strict_json_schema
from polytask.tasks.align import align_mentions


def sentences_of(text, spans):
    return [Sentence(index=i, start=s, end=e, text=text[s:e]) for i, (s, e) in enumerate(spans)]


def test_align_exact_then_normalized_then_unaligned():
    spans = align_mentions("Ｉ met ACME Corp  Ltd in São Paulo.", ["ACME Corp Ltd", "são paulo", "I", "Berlin"])
    assert [(a.start, a.end, a.match) for a in spans] == [
        (6, 20, "normalized"),
        (24, 33, "normalized"),
        (0, 1, "normalized"),
        (None, None, None),
    ]


def test_align_repeated_mentions_take_successive_occurrences():
    spans = align_mentions("Paris, Paris and Paris.", ["Paris", "Paris", "Paris", "Paris"])
    assert [a.start for a in spans] == [0, 7, 17, None]


def test_align_prefers_occurrence_outside_longer_mention():
    text = "New Orleans Habitat builds homes in New Orleans."
    spans = align_mentions(text, ["New Orleans Habitat", "New Orleans"])
    assert [(a.start, a.end) for a in spans] == [(0, 19), (36, 47)]


@pytest.mark.parametrize(
    ("sentence", "mention", "span"),
    [
        ("The Alamo tour was led by Al.", "Al", (26, 28)),
        ("USB sticks are sold in the US.", "US", (27, 29)),
        ("Annual report: Ann wrote it.", "ann", (15, 18)),  # the normalized path too
        ("Alamo only.", "Al", (0, 2)),  # no occurrence on word boundaries: the first one still
        ("我在中国银行工作，中国很大。", "中国", (2, 4)),  # no word boundaries in Chinese
        ("בירושלים יש שוק, ירושלים יפה", "ירושלים", (1, 8)),  # Hebrew prefixes join the word
    ],
)
def test_align_prefers_an_occurrence_on_word_boundaries(sentence, mention, span):
    (got,) = align_mentions(sentence, [mention])
    assert (got.start, got.end) == span


@pytest.mark.parametrize(
    ("sentence", "mention"),
    [
        ("Merkels Politik war umstritten, aber Merkel blieb.", "Merkel"),
        ("Визит Путина был коротким, Путин доволен.", "Путин"),
        ("ទៅភ្នំពេញហើយ ភ្នំពេញស្អាត", "ភ្នំពេញ"),
    ],
)
def test_a_repeated_mention_keeps_every_occurrence_even_inside_a_word(sentence, mention):
    got = align_mentions(sentence, [mention, mention])
    assert all(a.start is not None for a in got) and got[0].start < got[1].start
    assert all(sentence[a.start : a.end] == mention for a in got)


def test_entities_postprocess_and_merge_offsets():
    text = "Ann lives in Rome. Ann works at IBM in Rome."
    sents = sentences_of(text, [(0, 18), (19, 44)])
    task = Entities()
    a0 = task.postprocess(
        text,
        sents[0],
        EntitiesAnswer.model_validate(
            {"entities": [{"text": "Ann", "label": "PER"}, {"text": "Rome", "label": "LOC"}]}
        ),
    )
    a1 = task.postprocess(
        text,
        sents[1],
        EntitiesAnswer.model_validate(
            {
                "entities": [
                    {"text": "IBM", "label": "ORG"},
                    {"text": "Ann", "label": "PER"},
                    {"text": "Atlantis", "label": "LOC"},
                    {"text": "Rome", "label": "LOC"},
                ]
            }
        ),
    )
    assert [(e.text, e.start, e.end, e.sentence_start) for e in a1 if e.aligned] == [
        ("IBM", 32, 35, 13),
        ("Ann", 19, 22, 0),
        ("Rome", 39, 43, 20),
    ]
    merged = task.merge(text, sents, [a0, a1])
    assert [(e.start, e.end, e.label) for e in merged.entities if e.aligned] == [
        (0, 3, "PER"),
        (13, 17, "LOC"),
        (19, 22, "PER"),
        (32, 35, "ORG"),
        (39, 43, "LOC"),
    ]
    assert [text[e.start : e.end] for e in merged.entities if e.aligned] == [
        "Ann",
        "Rome",
        "Ann",
        "IBM",
        "Rome",
    ]
    assert merged.entities[-1].text == "Atlantis" and not merged.entities[-1].aligned
    merged_dup = task.merge(text, sents, [a0, a0])
    assert len(merged_dup.entities) == 2  # exact duplicates removed
    assert task.merge(text, sents, [a0, None]).coverage == 0.5


def test_sentiment_merge_weighted_mixed_and_coverage():
    text = "Great food. Terrible service, really bad. Ok."
    sents = sentences_of(text, [(0, 11), (12, 41), (42, 45)])
    task = Sentiment()
    pos, neg, neu = (
        SentimentAnswer(label=lbl, score=s) for lbl, s in (("positive", 0.9), ("negative", -0.8), ("neutral", 0.0))
    )
    merged = task.merge(text, sents, [pos, neg, neu])
    assert merged.label == "mixed"
    assert merged.score == pytest.approx(round((11 * 0.9 - 29 * 0.8) / 43, 4))
    assert merged.coverage == 1.0 and merged.sentences == 3
    only_pos = task.merge(text, sents, [pos, None, None])
    assert only_pos.label == "positive" and only_pos.coverage == pytest.approx(round(11 / 43, 4))
    none = task.merge(text, sents, [None, None, None])
    assert none.label is None and none.score is None and none.coverage == 0.0
    mild = task.merge(text, sents, [SentimentAnswer(label="positive", score=0.1)] * 3)
    assert mild.label == "neutral"


def test_sentiment_rejects_out_of_range_score():
    with pytest.raises(ValueError):
        Sentiment().parse('{"label": "positive", "score": 1.5}')


def test_classify_single_and_multi():
    text = "a. b. c. d."
    sents = sentences_of(text, [(0, 2), (3, 5), (6, 8), (9, 11)])
    single = Classify(["billing", "delivery", "other"])
    answers = [single.parse(f'{{"label": "{x}"}}') for x in ("billing", "delivery", "billing")] + [None]
    merged = single.merge(text, sents, answers)
    assert merged.shares == {
        "billing": pytest.approx(0.6667),
        "delivery": pytest.approx(0.3333),
        "other": 0.0,
    }
    assert merged.top == ["billing"] and merged.coverage == 0.75
    with pytest.raises(ValueError):
        single.parse('{"label": "refund"}')
    multi = Classify(["billing", "delivery"], multi_label=True)
    answers = [
        multi.parse(x)
        for x in (
            '{"labels": ["billing", "delivery"]}',
            '{"labels": ["billing"]}',
            '{"labels": []}',
            '{"labels": ["delivery"]}',
        )
    ]
    merged = multi.merge(text, sents, answers)
    assert merged.shares == {"billing": 0.5, "delivery": 0.5} and merged.top == ["billing", "delivery"]


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (["one"], "at least two labels"),
        (["a", "a"], "differ only in"),
        (["a", ""], "non-blank strings"),
        ([" ", "  "], "non-blank strings"),
        (["Billing", "billing "], "differ only in"),
        (["café", "cafe\u0301"], "differ only in"),  # NFC and NFD of the same word
        ("ab", "a list of labels"),
        ({"a", "b"}, "a list of labels"),  # a set has no stable order
        ([["a"], "b"], "non-blank strings"),
    ],
)
def test_classify_rejects_bad_labels(labels, words):
    with pytest.raises(ConfigurationError, match=words):
        Classify(labels)


def test_classify_budget_fits_long_labels_and_lists_them_unambiguously():
    long = "a customer asking about a refund for an order that never arrived " * 2
    task = Classify([long.strip(), "billing, refunds", "other"])
    assert task.max_tokens >= len(long)  # one token per byte at most: never cut off
    assert 'Labels: ["' in task.instruction and '"billing, refunds"' in task.instruction
    assert Classify([str(i) for i in range(1000)]).max_tokens < 40  # one label's answer, not a thousand
    assert Classify(["a", "b"], max_tokens=7).max_tokens == 7


def test_strict_schema_for_user_model():
    class Item(BaseModel):
        name: str
        qty: int = 1

    class Order(BaseModel):
        items: list[Item]
        note: str | None = None

    schema = strict_json_schema(Order)
    assert schema["additionalProperties"] is False and schema["required"] == ["items", "note"]
    item = schema["$defs"]["Item"]
    assert item["additionalProperties"] is False and item["required"] == ["name", "qty"]
    assert "default" not in item["properties"]["qty"]
    task = Task("order", Order, "Extract the order.")
    assert task.json_schema() is task.json_schema()
    assert task.parse('{"items": [{"name": "tea", "qty": 2}], "note": null}').items[0].qty == 2


def test_strict_schema_keeps_a_field_named_default_and_mapping_values():
    class Setting(BaseModel):
        name: str
        default: str = "x"
        counts: dict[str, int] = {}

    schema = strict_json_schema(Setting)
    assert list(schema["properties"]) == ["name", "default", "counts"] == schema["required"]
    assert "default" not in schema["properties"]["default"]  # the keyword goes, the field stays
    assert schema["properties"]["counts"]["additionalProperties"] == {"type": "integer"}


def test_aliases_are_what_the_schema_asks_and_the_examples_show():
    from pydantic import Field

    from polytask._prompts import build_messages

    class Person(BaseModel):
        full_name: str = Field(alias="fullName")

    task = Task("person", Person, "Who is named?", examples=[("Ada wrote it.", Person(fullName="Ada"))])
    assert list(task.json_schema()["properties"]) == ["fullName"]
    shown = [m["content"] for m in build_messages(task, "Bob.") if m["role"] == "assistant"]
    assert shown == ['{"fullName":"Ada"}'] and task.parse(shown[0]).full_name == "Ada"


class _Products(BaseModel):
    names: list[str]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"examples": [("I love my Kindle.", {"nmes": ["Kindle"]})]}, "example 0: the answer does not match"),
        ({"examples": [("only a sentence",)]}, "example 0 must be a (sentence, answer) pair"),
        ({"instruction": None}, "instruction must be a non-empty string"),
        ({"answer": list[str]}, "answer must be a pydantic BaseModel class"),
        ({"max_tokens": 0}, "max_tokens must be an integer"),
        ({"merge": "sum"}, "merge must be callable"),
    ],
)
def test_a_task_that_cannot_work_fails_when_built(kwargs, words):
    args = {"answer": _Products, "instruction": "List the products.", **kwargs}
    with pytest.raises(ConfigurationError, match=r"task 'products'") as info:
        Task("products", args.pop("answer"), args.pop("instruction"), **args)
    assert words in str(info.value)


def test_an_answer_model_without_a_json_schema_fails_when_built():
    from collections.abc import Callable

    class Hook(BaseModel):
        fn: Callable[[], None]

    with pytest.raises(ConfigurationError, match="no JSON schema for Hook"):
        Task("hook", Hook, "x")


def test_recursive_and_root_models_get_an_object_schema():
    from pydantic import RootModel

    from polytask._prompts import build_messages

    class Node(BaseModel):
        name: str
        children: list["Node"]

    class Inner(BaseModel):
        x: int

    tree = Task("tree", Node, "The tree.", examples=[("a(b)", Node(name="a", children=[Node(name="b", children=[])]))])
    schema = tree.json_schema()
    assert schema["type"] == "object" and "$ref" not in schema and schema["required"] == ["name", "children"]
    assert schema["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}  # the recursion still resolves
    assert tree.parse('{"name":"a","children":[{"name":"b","children":[]}]}').children[0].name == "b"
    assert [m["content"] for m in build_messages(tree, "x") if m["role"] == "assistant"] == [
        '{"name":"a","children":[{"name":"b","children":[]}]}'
    ]
    assert Task("root", RootModel[Inner], "x").json_schema()["properties"] == {"x": {"title": "X", "type": "integer"}}


def test_examples_are_kept_as_given_and_shown_without_computed_fields():
    from pydantic import ConfigDict, computed_field, field_validator

    class Tags(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tags: list[str]

        @field_validator("tags")
        @classmethod
        def hashed(cls, v: list[str]) -> list[str]:
            return ["#" + t.lstrip("#") for t in v]

        @computed_field  # type: ignore[prop-decorator]
        @property
        def count(self) -> int:
            return len(self.tags)

    example = Tags(tags=["a"])
    task = Task("tags", Tags, "Tag it.", examples=[("s", example)])
    assert task.examples[0][1] is example  # not rebuilt (a validator would run again)
    assert task.dump_answer(example) == '{"tags":["#a"]}'  # no "count": an answer cannot hold it


def test_a_dict_example_is_checked_and_kept_as_the_model():
    task = Task("products", _Products, "List them.", examples=[("I love my Kindle.", {"names": ["Kindle"]})])
    assert task.examples == (("I love my Kindle.", _Products(names=["Kindle"])),)


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "products\n"])
def test_task_name_validated(name):
    with pytest.raises(ConfigurationError):
        Task(name, SentimentAnswer, "x")


def test_align_meets_nfc_text_and_nfd_entities_and_the_reverse():
    import unicodedata

    nfc = "Wir fahren nach München, dann nach Zürich."
    nfd = unicodedata.normalize("NFD", nfc)
    for text, mentions in ((nfc, ["München", "Zürich"]), (nfd, ["München", "Zürich"])):
        for form in ("NFC", "NFD"):
            spans = align_mentions(text, [unicodedata.normalize(form, m) for m in mentions])
            got = [text[s.start : s.end] for s in spans]
            # the whole name in the text's own form: the combining marks included, nothing cut in half
            assert got == [unicodedata.normalize("NFD" if text is nfd else "NFC", m) for m in mentions], (form, got)
    (span,) = align_mentions(nfd, ["Zu\u0308rich"[:2]])  # "Zu": a prefix of Zürich's letters, not of its text
    assert span.start is None or nfd[span.start : span.end] != "Zu"
