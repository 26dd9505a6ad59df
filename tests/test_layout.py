"""The package's layout (alpaca_nb/__init__.py): its modules import each other without a circle (imports inside
functions count too: a lazy import hides a circle from Python, not from a reader), and no stage module imports the
recipe that strings the stages together."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alpaca_nb"
STAGE_MODULES = ("seeds", "selfinstruct", "costs", "train", "evaluate", "judge", "hallucination", "safety", "demo")


def imports() -> dict[str, set[str]]:
    """Return each module's alpaca_nb imports, wherever in the module they are."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "alpaca_nb":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names} & modules
            elif isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("alpaca_nb.")}
        graph[path.stem] = found & modules - {path.stem}
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Return the strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for other in graph.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(frozenset(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_walk_finds_a_circle_where_there_is_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    graph = imports()
    assert graph["judge"] >= {"stats"} and "evaluate" not in graph["judge"]  # the walk reads lazy imports too
    assert circles(graph) == []


def test_no_stage_module_knows_the_recipe():
    graph = imports()
    assert {module: "reproduce" for module in STAGE_MODULES if "reproduce" in graph[module]} == {}


def test_shared_statistics_sit_below_evaluation_judging_and_hallucination():
    graph = imports()
    assert graph["stats"] == set()
    for module in ("evaluate", "judge", "hallucination"):
        assert not graph[module] & ({"evaluate", "judge", "hallucination"} - {module}) - ({"judge", "hallucination"}
                                                                                           if module == "evaluate" else set())
