"""Answers made up from a JSON schema: valid ones for the simulator's replies, invalid ones for re-ask tests, and
valid ones written loosely (:func:`loosen_answer`), as servers without structured outputs write them.

:func:`fill_schema` walks the schema (``type`` and type lists, ``enum``, ``const``, objects with every
property, arrays honouring ``minItems`` / ``maxItems``, strings honouring ``minLength`` / ``maxLength`` and
``pattern`` (a string drawn from the regular expression's own parse tree), numbers and integers within ``minimum``
/ ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum`` and on ``multipleOf``, ``anyOf`` / ``oneOf`` /
``allOf``, local ``$ref`` into ``$defs`` / ``definitions``) and draws choices from a seeded
:class:`random.Random`, so the same (seed, sentence) always gives the same answer. Nested arrays get fewer items
and recursive schemas are cut off after a few levels, by preferring ``null`` branches and the fewest array items
allowed, so answers stay short.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import string
from collections.abc import Mapping
from re import _parser as re_parser  # type: ignore[attr-defined]  # the regular-expression parser (3.11+)
from typing import Any

__all__ = ["LOOSE_FORMS", "answer_rng", "fill_schema", "loosen_answer", "resolve_ref", "violate_schema"]

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
_MAX_DEPTH = 8
_SHALLOW = 4  # below this depth arrays get their fewest items and optional branches are left out


def answer_rng(seed: int, sentence: str) -> random.Random:
    """The generator for one answer: deterministic per ``(seed, sentence)`` across processes and runs."""
    return random.Random(f"{seed}\x00{sentence}")


def resolve_ref(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """``node`` with local ``$ref`` pointers (``#/$defs/Name``, ``#/definitions/Name``, ``#``) followed.

    Raises:
        ValueError: a non-local or dangling reference.
    """
    seen = 0
    while "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"only local $ref pointers are supported, got {ref!r}")
        target: Any = root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                raise ValueError(f"dangling $ref {ref!r}")
            target = target[part]
        if not isinstance(target, Mapping):
            raise ValueError(f"$ref {ref!r} does not point at a schema")
        extra = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **extra} if extra else target
        seen += 1
        if seen > 64:
            raise ValueError(f"$ref loop at {ref!r}")
    return node


def _types(node: Mapping[str, Any]) -> list[str]:
    t = node.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    if "properties" in node:
        return ["object"]
    if "items" in node or "prefixItems" in node:
        return ["array"]
    return []


def _string(node: Mapping[str, Any], rng: random.Random) -> str:
    lo = int(node.get("minLength", 0))
    hi = node.get("maxLength")
    fmt = node.get("format")
    if fmt == "date":
        text = f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
    elif fmt == "date-time":
        text = f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T12:00:00Z"
    elif fmt == "email":
        text = f"{rng.choice(_WORDS)}@example.com"
    elif fmt == "uri":
        text = f"https://example.com/{rng.choice(_WORDS)}"
    elif fmt == "uuid":
        text = "-".join(f"{rng.getrandbits(b * 4):0{b}x}" for b in (8, 4, 4, 4, 12))
    else:
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        for _ in range(20):  # JSON Schema patterns are unanchored searches; lengths still apply
            drawn = _from_pattern(pattern, rng)
            if drawn is not None and lo <= len(drawn) <= (int(hi) if hi is not None else len(drawn)):
                return drawn
    while len(text) < lo:
        text += " " + rng.choice(_WORDS)
    if hi is not None:
        text = text[: int(hi)]
    return text


_CATEGORIES = {
    "CATEGORY_DIGIT": string.digits,
    "CATEGORY_WORD": string.ascii_letters + string.digits + "_",
    "CATEGORY_SPACE": " ",
    "CATEGORY_NOT_DIGIT": string.ascii_letters,
    "CATEGORY_NOT_WORD": " -.",
    "CATEGORY_NOT_SPACE": string.ascii_letters + string.digits,
}
_PRINTABLE = string.ascii_letters + string.digits + " -_.,"


def _from_pattern(pattern: str, rng: random.Random) -> str | None:
    """A string that ``re.search(pattern, ...)`` accepts, drawn from the pattern's parse tree; None if unsure."""
    try:
        tree = re_parser.parse(pattern)
    except (re.error, RecursionError):
        return None
    groups: dict[int, str] = {}

    def chars(items: Any) -> str:
        allowed, negate = [], False
        for op, av in items:
            name = str(op)
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                allowed.append(chr(av))
            elif name == "RANGE":
                allowed.extend(chr(c) for c in range(av[0], min(av[1], av[0] + 200) + 1))
            elif name == "CATEGORY":
                allowed.extend(_CATEGORIES.get(str(av), ""))
        if negate:
            return "".join(c for c in _PRINTABLE if c not in allowed)
        return "".join(allowed)

    def draw(items: Any) -> str:
        out = []
        for op, av in items:
            name = str(op)
            if name == "LITERAL":
                out.append(chr(av))
            elif name == "NOT_LITERAL":
                out.append(next(c for c in _PRINTABLE if ord(c) != av))
            elif name == "ANY":
                out.append(rng.choice(string.ascii_letters))
            elif name == "IN":
                pool = chars(av)
                if not pool:
                    raise ValueError
                out.append(rng.choice(pool))
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, sub = av
                n = rng.randint(lo, max(lo, min(hi, lo + 3)))
                out.extend(draw(sub) for _ in range(n))
            elif name == "SUBPATTERN":
                text = draw(av[-1])
                if av[0] is not None:
                    groups[av[0]] = text
                out.append(text)
            elif name == "BRANCH":
                out.append(draw(rng.choice(av[1])))
            elif name == "GROUPREF":
                out.append(groups.get(av, ""))
            elif name in ("AT", "ASSERT", "ASSERT_NOT"):
                continue  # anchors and look-arounds: the search below checks the result
            else:
                raise ValueError
        return "".join(out)

    try:
        text = draw(tree)
    except (ValueError, StopIteration, RecursionError):
        return None
    return text if re.search(pattern, text) else None


def _number(node: Mapping[str, Any], rng: random.Random, integer: bool) -> int | float:
    lo = node.get("minimum")
    hi = node.get("maximum")
    xlo = node.get("exclusiveMinimum")
    xhi = node.get("exclusiveMaximum")
    if isinstance(xlo, bool):  # draft-4 boolean form
        xlo = lo if xlo else None
        lo = None if xlo is not None else lo
    if isinstance(xhi, bool):
        xhi = hi if xhi else None
        hi = None if xhi is not None else hi
    if integer:
        low: int | None = math.ceil(lo) if lo is not None else None
        if xlo is not None:
            low = max(low, math.floor(xlo) + 1) if low is not None else math.floor(xlo) + 1
        high: int | None = math.floor(hi) if hi is not None else None
        if xhi is not None:
            high = min(high, math.ceil(xhi) - 1) if high is not None else math.ceil(xhi) - 1
        if low is None and high is None:
            low, high = 0, 100
        elif low is None:
            low = min(0, high) if high is not None else 0
        elif high is None:
            high = max(low, 100)
        assert low is not None and high is not None
        step = node.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            first, last = math.ceil(low / step), math.floor(max(low, high) / step)
            if first <= last:
                return rng.randint(first, last) * step
        return rng.randint(low, max(low, high))
    flo = float(lo) if lo is not None else (float(xlo) if xlo is not None else None)
    fhi = float(hi) if hi is not None else (float(xhi) if xhi is not None else None)
    if flo is None and fhi is None:
        flo, fhi = 0.0, 1.0
    elif flo is None:
        assert fhi is not None
        flo = min(0.0, fhi - 1.0)
    elif fhi is None:
        fhi = flo + 1.0
    if fhi < flo:
        fhi = flo
    step = node.get("multipleOf")
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        first, last = math.ceil(flo / step), math.floor(fhi / step)
        inside = [k for k in (first, last) if (xlo is None or k * step > xlo) and (xhi is None or k * step < xhi)]
        if first <= last and inside:
            k = rng.randint(first, last)
            k = k if (xlo is None or k * step > xlo) and (xhi is None or k * step < xhi) else inside[0]
            return k * step if isinstance(step, int) else round(k * step, 10)
    value = round(rng.uniform(flo, fhi), 3)
    # stay strictly inside exclusive bounds (and inside inclusive ones after rounding)
    if (xlo is not None and value <= xlo) or (xhi is not None and value >= xhi) or not flo <= value <= fhi:
        value = (flo + fhi) / 2
    return value


def fill_schema(
    schema: Mapping[str, Any], rng: random.Random, *, root: Mapping[str, Any] | None = None, _depth: int = 0
) -> Any:
    """A JSON value valid for ``schema``, drawn from ``rng``.

    Args:
        schema: the (sub)schema to fill.
        rng: the random source (see :func:`answer_rng`).
        root: the document ``$ref`` pointers resolve against (default: ``schema`` itself).

    Returns:
        A JSON-serialisable value: every object has all its declared properties.

    Raises:
        ValueError: an unsupported ``$ref``.
    """
    root = schema if root is None else root
    node = resolve_ref(schema, root)
    deep = _depth >= _MAX_DEPTH

    if "const" in node:
        return copy.deepcopy(node["const"])
    if isinstance(node.get("enum"), list) and node["enum"]:
        return copy.deepcopy(rng.choice(node["enum"]))
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and options:
            resolved = [resolve_ref(o, root) for o in options]
            non_null = [o for o in resolved if _types(o) != ["null"]]
            if _depth >= _SHALLOW and len(non_null) < len(resolved):
                return None
            pick = rng.choice(non_null or resolved)
            return fill_schema(pick, rng, root=root, _depth=_depth + 1)
    if isinstance(node.get("allOf"), list) and node["allOf"]:
        merged: dict[str, Any] = {k: v for k, v in node.items() if k != "allOf"}
        for part in node["allOf"]:
            part = resolve_ref(part, root)
            for k, v in part.items():
                if k == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **v}
                elif k == "required":
                    merged["required"] = [*merged.get("required", []), *v]
                else:
                    merged.setdefault(k, v)
        return fill_schema(merged, rng, root=root, _depth=_depth + 1)

    types = _types(node)
    if not types:
        return {} if _depth == 0 else rng.choice(_WORDS)
    kind = "null" if _depth >= _SHALLOW and "null" in types else next((t for t in types if t != "null"), "null")
    if kind == "null":
        return None
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "integer":
        return _number(node, rng, integer=True)
    if kind == "number":
        return _number(node, rng, integer=False)
    if kind == "string":
        return _string(node, rng)
    if kind == "array":
        lo = int(node.get("minItems", 0))
        hi = node.get("maxItems")
        prefix = node.get("prefixItems") or []
        top = max(lo, min(int(hi) if hi is not None else lo + 3, lo + 3))
        count = lo if deep else rng.randint(lo, top if _depth < _SHALLOW else min(top, lo + 1))
        items = node.get("items")
        out: list[Any] = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            out.append(fill_schema(sub, rng, root=root, _depth=_depth + 1) if isinstance(sub, Mapping) else None)
        if node.get("uniqueItems"):
            unique: list[Any] = []
            for v in out:
                if v not in unique:
                    unique.append(v)
            out = unique if len(unique) >= lo else out
        return out
    if kind == "object":
        props = node.get("properties") or {}
        obj = {name: fill_schema(sub, rng, root=root, _depth=_depth + 1) for name, sub in props.items()}
        for name in node.get("required") or []:
            obj.setdefault(name, rng.choice(_WORDS))
        return obj
    return None


def violate_schema(schema: Mapping[str, Any], rng: random.Random) -> Any:
    """A JSON value that is *not* valid for ``schema`` (for testing re-asks).

    An object schema gets a filled object with its first required property removed (or, with none
    required, an array instead of an object); any other typed schema gets a value of the wrong type. A schema
    that accepts everything (``{}``) has nothing to violate: an empty object is returned.
    """
    node = resolve_ref(schema, schema)
    types = _types(node)
    if "object" in types:
        required = list(node.get("required") or [])
        if required:
            value = fill_schema(schema, rng)
            if isinstance(value, dict):
                value.pop(required[0], None)
                return value
        return ["not", "an", "object"]
    if not types:
        return {}
    if "string" in types:
        return {"not": "a string"}
    return "not a valid answer"


LOOSE_FORMS = ("fence_json", "fence", "prose", "case")
"""How :func:`loosen_answer` writes a valid answer: in a ```` ```json ```` fence, in a bare ```` ``` ```` fence,
between two lines of prose, or with its enum values in another case and a trailing space."""


def loosen_answer(answer: Any, schema: Mapping[str, Any], rng: random.Random) -> str:
    """A valid ``answer`` written as a server without structured outputs may write it: one of :data:`LOOSE_FORMS`,
    drawn from ``rng`` (``"case"`` falls back to ``"fence_json"`` when the answer holds no enum value). Everything
    in it can be recovered without guessing (:meth:`polytask.Task.recover`)."""
    form = rng.choice(LOOSE_FORMS)
    if form == "case":
        shifted = _shift_case(answer, schema, schema)
        if shifted != answer:
            return json.dumps(shifted, ensure_ascii=False, separators=(",", ":"))
        form = "fence_json"
    text = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
    if form == "prose":
        return f"Here is the answer:\n{text}\nI hope this helps."
    return f"```{'json' if form == 'fence_json' else ''}\n{text}\n```"


def _shift_case(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any], depth: int = 0) -> Any:
    """``value`` with each string that is an enum member of its schema in another case, with a trailing space."""
    node = resolve_ref(schema, root)
    if depth > _MAX_DEPTH:
        return value
    options = [resolve_ref(o, root) for key in ("anyOf", "oneOf") for o in node.get(key) or ()] or [node]
    if isinstance(value, str):
        for option in options:
            members = [option["const"]] if "const" in option else option.get("enum") or []
            if value in members:
                return (value.lower() if value.isupper() else value.upper()) + " "
        return value
    if isinstance(value, dict):
        shaped = [o for o in options if "object" in _types(o)]
        props = shaped[0].get("properties") or {} if len(shaped) == 1 else {}
        return {k: _shift_case(v, props[k], root, depth + 1) if k in props else v for k, v in value.items()}
    if isinstance(value, list):
        shaped = [o for o in options if "array" in _types(o)]
        items = shaped[0].get("items") if len(shaped) == 1 else None
        return [_shift_case(v, items, root, depth + 1) if isinstance(items, Mapping) else v for v in value]
    return value
