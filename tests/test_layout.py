"""The package's architecture, read from its source with ``ast``: subpackages in layers, lower layers
never importing upper ones, no import cycles, no project imports tucked into functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "densenet"
# lowest first; a module may import its own layer or a lower one
LAYERS = ["errors", "io", "models", "data", "analysis", "serving", "training", "cli"]
TOP_LEVEL = {"__init__": "models", "__main__": "cli"}  # the package's own entry points


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "models"  # the package itself re-exports the models
    return TOP_LEVEL.get(parts[1], parts[1])


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names of the project modules a ``from ... import ...`` reads."""
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("densenet"):
        return []
    names = [f"{target}.{a.name}" for a in node.names]
    return [n for n in names if n in MODULES] or [target]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``path``."""
    module, is_package = module_name(path), path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                found.extend((t, child.lineno, in_function) for t in resolve(module, is_package, child))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("densenet"))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports(p) for p in FILES}


def test_the_layers_exist_and_hold_every_module():
    assert {layer(m) for m in MODULES} <= set(LAYERS), sorted({layer(m) for m in MODULES} - set(LAYERS))
    for sub in ("io", "models", "data", "analysis", "serving", "training"):
        assert (PACKAGE / sub / "__init__.py").is_file(), sub


def test_lower_layers_never_import_upper_ones():
    wrong = [f"{m} (line {line}) imports {target}: {layer(m)} is below {layer(target)}"
             for m, found in GRAPH.items() for target, line, _ in found
             if LAYERS.index(layer(target)) > LAYERS.index(layer(m)) and m != "densenet"]
    assert not wrong, "\n".join(wrong)


def test_no_project_import_inside_a_function():
    tucked = [f"{m} line {line}: {target}" for m, found in GRAPH.items() for target, line, inside in found if inside]
    assert not tucked, "\n".join(tucked)


def edges() -> dict[str, list[str]]:
    """Project module -> project modules it imports (``from pkg import name`` reads ``pkg``'s __init__)."""
    return {m: sorted({t if t in MODULES else t.rsplit(".", 1)[0] for t, _, _ in found} & MODULES - {m})
            for m, found in GRAPH.items()}


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first walk of ``graph``."""
    found, state, stack = [], {}, []

    def walk(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m)
    return found


def test_no_import_cycles():
    graph = edges()
    assert len(graph) > 30 and "densenet.models.densenet" in graph["densenet.models.registry"]
    assert cycles(graph) == []
    # the walk finds a cycle where there is one (evaluate -> export -> inference -> evaluate, as before)
    assert cycles({"a.evaluate": ["a.export"], "a.export": ["a.inference"], "a.inference": ["a.evaluate"]}) == [
        ["a.evaluate", "a.export", "a.inference", "a.evaluate"]]


@pytest.mark.parametrize("source, target, expected", [
    ("densenet.models.densenet", "densenet.training.loop", False),  # models below training
    ("densenet.cli", "densenet.io.atomic", True),
    ("densenet.data.cache", "densenet.io.atomic", True),
    ("densenet.io.checkpoint", "densenet.models.weights", False),
])
def test_the_layer_rule_itself(source, target, expected):
    """The rule the tests above apply, on examples both ways (so that it cannot pass vacuously)."""
    assert (LAYERS.index(layer(target)) <= LAYERS.index(layer(source))) is expected
