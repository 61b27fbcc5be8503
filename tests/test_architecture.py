"""The layers as the README draws them: ``flows -> tasks -> gamma``, the command line on top, no
import cycle anywhere (lazy imports inside functions included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gamma", "tasks", "flows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[tuple[str, bool]]]:
    """module -> {(imported project module, imported at module level)}."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[tuple[str, bool]]] = {m: set() for m in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            for t in targets:
                if t in files:
                    graph[name].add((t, id(node) in top_level))
    return graph


def find_cycle(graph: dict[str, set[tuple[str, bool]]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t, _ in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {("b", True)}, "b": {("c", False)}, "c": {("a", True)}}) == ["a", "b", "c", "a"]


def test_library_never_imports_orchestration():
    """Nothing in gamma/ imports tasks/ or flows/; only the command line may, lazily, inside the
    command that runs a flow; and nothing imports the command line."""
    graph = import_graph()
    for module, imports in graph.items():
        for target, top_level in imports:
            assert target != "gamma.cli", f"{module} imports the command line"
            if module.startswith("gamma.") and target.split(".")[0] in ("tasks", "flows"):
                assert module == "gamma.cli" and not top_level, f"{module} imports {target}"
    assert any(t.startswith("flows.") for t, _ in graph["gamma.cli"])  # the test does look at lazy imports
