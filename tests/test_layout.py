"""The package's layout (alpaca_nb/__init__.py): its modules import each other without a circle (imports inside
functions count too: a lazy import hides a circle from Python, not from a reader), no stage module imports the
recipe that strings the stages together, and no file grows past about 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alpaca_nb"
STAGE_MODULES = (
    "seeds", "selfinstruct_prompts", "format_constraints", "generation_runs", "selfinstruct_inspection", "selfinstruct",
    "costs", "train_config", "training_data", "train_callbacks", "train", "alpaca_eval", "blind_votes", "stop_rates",
    "judge", "hallucination", "truthfulqa", "evaluate", "content_filter", "safety", "demo",
)
# The recipe's own modules and the commands and views above it: the only ones that may ask the recipe for stages.
ABOVE_THE_STAGES = {"chapter_runs", "report_card", "report_pages", "cli", "lab", "widgets", "static_widgets",
                    "demo_server", "book"}


def _run_time_nodes(tree: ast.AST) -> list[ast.AST]:
    """Return every node of ``tree`` but those under ``if TYPE_CHECKING:``, which Python never runs (annotations)."""
    skipped = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) ==
               "TYPE_CHECKING" for child in node.body for inner in ast.walk(child)}
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def imports() -> dict[str, set[str]]:
    """Return each module's alpaca_nb imports, wherever in the module they are (type annotations' aside)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in _run_time_nodes(ast.parse(path.read_text(encoding="utf-8"))):
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


def test_the_walk_skips_what_only_type_checkers_read():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from alpaca_nb.x import A\nimport alpaca_nb.y\n")
    assert [node.names[0].name for node in _run_time_nodes(tree) if isinstance(node, (ast.Import, ast.ImportFrom))] \
        == ["TYPE_CHECKING", "alpaca_nb.y"]


def test_no_module_holds_more_than_about_450_lines():
    lines = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: count for name, count in lines.items() if count > 460} == {}


def test_no_stage_module_knows_the_recipe():
    graph = imports()
    assert {module: "reproduce" for module in STAGE_MODULES if "reproduce" in graph[module]} == {}
    assert {module for module, imported in graph.items() if "reproduce" in imported} <= ABOVE_THE_STAGES


def test_shared_statistics_sit_below_evaluation_judging_and_hallucination():
    graph = imports()
    assert graph["stats"] == set()
    for module in ("evaluate", "judge", "hallucination"):
        assert not graph[module] & ({"evaluate", "judge", "hallucination"} - {module}) - ({"judge", "hallucination"}
                                                                                           if module == "evaluate" else set())
