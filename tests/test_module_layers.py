"""The package's layers: experiments -> llm -> pvtheory, nothing imports upward, and no import cycle in llm/ or
pvtheory/ (function-level imports included, so a cycle cannot hide inside a function)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"pvtheory": 0, "llm": 1, "experiments": 2}


def runtime_nodes(tree: ast.AST):
    """Every node of the tree except those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for c in child.orelse for n in [c, *runtime_nodes(c)])
            continue
        yield child
        yield from runtime_nodes(child)


def imports_of(path: Path, package: str) -> set[str]:
    """Modules of this repository that `path` imports anywhere in its body (top level or inside functions); imports
    for type checkers only (under `if TYPE_CHECKING:`) do not run and are left out."""
    names = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in LAYERS}


def module_graph(top: str) -> dict[str, set[str]]:
    """{module: modules of the same repository it imports}, over the package `top`."""
    graph = {}
    for path in sorted((ROOT / top).rglob("*.py")):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mod = mod.removesuffix(".__init__")
        graph[mod] = imports_of(path, mod)
    known = set(graph)
    return {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}


def test_no_module_imports_from_a_layer_above_its_own():
    for top, level in LAYERS.items():
        for path in (ROOT / top).rglob("*.py"):
            mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            upward = [d for d in imports_of(path, mod) if LAYERS[d.split(".")[0]] > level]
            assert not upward, f"{mod} imports {upward} from a layer above {top}"


@pytest.mark.parametrize("top", ["pvtheory", "llm"])
def test_no_import_cycle_within_a_package(top):
    graph = {m: {d for d in deps if d.startswith(top)} for m, deps in module_graph(top).items()}
    graph = {m: deps - {top} for m, deps in graph.items()}  # `from llm import x` names a module, not the package body
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d] if d in path else [m, d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
