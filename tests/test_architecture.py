"""The package's shape (issue 10): arrows between modules run one way, no module reaches into another's private
names, and backends declare their settings instead of being probed with getattr."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "polytask"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__.py``)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def module_level_imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for each import at module level, those under ``if TYPE_CHECKING:`` too
    (not those inside functions: those are deliberately lazy)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.extend((a.name, [], node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((base, [a.name for a in node.names], node.lineno))

    visit(tree.body)
    return found


def graph() -> dict[str, set[str]]:
    """Module → the modules importing it runs: the target, every submodule imported by name (``from . import x``),
    and the target's parent packages that are not the importer's own (their ``__init__`` runs first)."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)} | {name}
        for target, names, _ in module_level_imports(name, path):
            if not target.startswith("polytask"):
                continue
            hits = [t for t in [target, *(f"{target}.{n}" for n in names)] if t in known]
            for hit in hits:
                parts = hit.split(".")
                for i in range(1, len(parts) + 1):
                    dotted = ".".join(parts[:i])
                    if dotted not in own and dotted in known:
                        edges[name].add(dotted)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package() -> None:
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:  # the check above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_another_modules_private_names() -> None:
    """A private module (``_http``) may be imported whole; a private name defined in a module may not."""
    known = modules()
    offenders = []
    for name, path in known.items():
        for target, names, line in module_level_imports(name, path):
            private = [
                n for n in names if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in known
            ]
            if target.startswith("polytask") and private:
                offenders.append(f"{path.relative_to(SRC)}:{line} imports {private} from {target}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # lazy imports inside functions too
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("polytask")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                private = [n for n in private if not any(m.endswith(f".{n}") for m in known)]
                if private:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} imports {private}")
    assert sorted(set(offenders)) == []


def test_backends_are_never_probed_with_getattr() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert "getattr(backend" not in path.read_text(encoding="utf-8"), path
