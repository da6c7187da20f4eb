"""What can be read unambiguously from a loosely written answer, before a re-ask (which costs a call) is spent on it.

Servers without structured outputs answer loosely. :func:`recover_answer` undoes exactly three habits, and nothing
else:

* **a Markdown code fence** around the JSON object (```` ```json … ``` ```` or ```` ``` … ``` ````);
* **prose before or after** the JSON object ("Here is the answer: {…} Hope this helps");
* **an enum value in another case or with surrounding spaces** (``"Positive "``, ``"NEGATIVE"``, ``"per"``): it
  becomes the one member of the schema's ``enum`` (or ``const``) equal to it after ``str.strip`` and
  ``str.casefold`` — at any depth (objects, arrays, ``additionalProperties``, ``anyOf`` / ``oneOf`` branches,
  local ``$ref`` into ``$defs``).

It never guesses: the text must hold exactly one top-level JSON object (everything from its first ``{`` to its
last ``}`` must be that one object, so two objects, a stray brace in the prose, or an object inside a JSON array are
left alone); broken or cut-off JSON is never repaired; a string that already satisfies its schema (an enum member,
or any string where a branch of ``anyOf`` takes free text) is never changed; a value matching no enum member, or
two members (``"a"`` and ``"A"``), after normalisation is left as it is; keys are never renamed. What is left
invalid goes to the re-ask as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["recover_answer"]

_MAX_DEPTH = 64  # deeper answers (or $ref chains) are left as they are


def recover_answer(content: str, schema: Mapping[str, Any]) -> str | None:
    """The JSON text of the answer ``content`` holds, cleaned of a code fence, prose around it and loosely written
    enum values; None when nothing can be recovered without guessing.

    Args:
        content: the model's answer text, as it came.
        schema: the task's JSON schema (:meth:`~polytask.Task.json_schema`), for its ``enum`` / ``const`` values.

    Returns:
        The answer's JSON object as text (the object's own characters when only a fence or prose was removed; a
        compact re-serialisation when an enum value was normalised), or None when ``content`` holds no single JSON
        object, or holds one as it is (nothing around it, no enum value to normalise). The result is not validated:
        the task's ``parse`` decides.

    Raises nothing: what cannot be read is None.

    Example::

        >>> schema = {"type": "object", "properties": {"label": {"enum": ["positive", "negative"]}}}
        >>> recover_answer('Sure!\\n```json\\n{"label": "Positive "}\\n```', schema)
        '{"label":"positive"}'
    """
    found = _one_object(content)
    if found is None:
        return None
    value, text, unwrapped = found
    normalised, changed = _normalise(value, schema, schema, 0)
    if changed:
        return json.dumps(normalised, ensure_ascii=False, separators=(",", ":"))
    return text if unwrapped else None


def _one_object(content: str) -> tuple[dict[str, Any], str, bool] | None:
    """The one JSON object in ``content``, its text, and whether anything (a fence, prose) was around it; None when
    there is no object, two, broken JSON, or JSON that is not an object."""
    text = content.strip()
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        pass
    else:  # JSON already: an object, or a value that is not one (an array, a string) and not ours to unwrap
        return (whole, text, False) if isinstance(whole, dict) else None
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    inner = text[start : end + 1]
    try:
        value = json.loads(inner)
    except (ValueError, RecursionError):  # two objects, broken JSON, a brace in the prose: not guessed at
        return None
    before, after = text[:start].rstrip(), text[end + 1 :].lstrip()
    if not isinstance(value, dict) or before.endswith(("[", ",")) or after.startswith(("]", ",")):
        return None  # an element of a larger JSON value, not an answer with prose around it
    return value, inner, True


def _resolve(node: Any, root: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``node`` with local ``$ref`` pointers followed (None: not a schema, or a pointer that leads nowhere)."""
    for _ in range(_MAX_DEPTH):
        if not isinstance(node, Mapping):
            return None
        ref = node.get("$ref")
        if ref is None:
            return node
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None
        target: Any = root
        for part in (p for p in ref[1:].split("/") if p):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                return None
            target = target[part]
        if not isinstance(target, Mapping):
            return None
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return None


def _branches(node: Mapping[str, Any], root: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The alternatives a value may match at ``node``: its ``anyOf`` / ``oneOf`` branches (an ``allOf`` of one
    schema is that schema), else ``node`` itself; None when one cannot be read (then nothing is changed there)."""
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list):
            out = [_resolve(o, root) for o in options]
            return [o for o in out if o is not None] if all(o is not None for o in out) else None
    every = node.get("allOf")
    if isinstance(every, list):
        return [one] if len(every) == 1 and (one := _resolve(every[0], root)) is not None else None
    return [node]


def _types(node: Mapping[str, Any]) -> set[str]:
    kind = node.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    if "properties" in node or "additionalProperties" in node:
        return {"object"}
    if "items" in node or "prefixItems" in node:
        return {"array"}
    return set()


def _choices(node: Mapping[str, Any]) -> list[Any] | None:
    if "const" in node:
        return [node["const"]]
    values = node.get("enum")
    return values if isinstance(values, list) else None


def _key(text: str) -> str:
    return text.strip().casefold()


def _normalise(value: Any, node: Any, root: Mapping[str, Any], depth: int) -> tuple[Any, bool]:
    """``value`` with its loosely written enum strings made members, and whether any was."""
    schema = _resolve(node, root)
    branches = _branches(schema, root) if schema is not None and depth < _MAX_DEPTH else None
    if not branches:
        return value, False
    if isinstance(value, str):
        members: list[str] = []
        for branch in branches:
            choices = _choices(branch)
            if choices is None:
                if not _types(branch) or "string" in _types(branch):
                    return value, False  # this branch takes free text: the string may mean just what it says
                continue
            if value in choices:
                return value, False
            members.extend(c for c in choices if isinstance(c, str))
        matches = {m for m in members if _key(m) == _key(value)}
        if len(matches) == 1:
            return matches.pop(), True
        return value, False  # none, or two members differing only in case: not guessed
    if isinstance(value, dict | list):
        kind = "object" if isinstance(value, dict) else "array"
        shaped = [b for b in branches if kind in _types(b)]
        if len(shaped) != 1:
            return value, False  # which branch the value means is not known
        if isinstance(value, dict):
            return _object(value, shaped[0], root, depth)
        return _array(value, shaped[0], root, depth)
    return value, False


def _object(value: dict[str, Any], node: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> tuple[Any, bool]:
    properties = node.get("properties")
    if not isinstance(properties, Mapping):
        properties = {}
    rest = node.get("additionalProperties")
    out: dict[str, Any] = {}
    changed = False
    for key, item in value.items():
        sub = properties.get(key, rest if isinstance(rest, Mapping) else None)
        out[key], did = _normalise(item, sub, root, depth + 1) if sub is not None else (item, False)
        changed |= did
    return out, changed


def _array(value: list[Any], node: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> tuple[Any, bool]:
    prefix = node.get("prefixItems")
    if not isinstance(prefix, list):
        prefix = []
    items = node.get("items")
    out: list[Any] = []
    changed = False
    for i, item in enumerate(value):
        sub = prefix[i] if i < len(prefix) else items
        new, did = _normalise(item, sub, root, depth + 1) if isinstance(sub, Mapping) else (item, False)
        out.append(new)
        changed |= did
    return out, changed
