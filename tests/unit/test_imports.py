"""Imports run one way, from the bottom up, and no module imports itself back at module level (as Ray Train's
test_circular_imports guards its packages). Read from the source: nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "shardrun"

LAYERS = [
    ("shardrun", "shardrun.errors", "shardrun.config", "shardrun.fs", "shardrun.net", "shardrun.lease",
     "shardrun.memory", "shardrun.checkpoint_format"),
    ("shardrun.datasets", "shardrun.metrics"),
    ("shardrun.trainer",),
    ("shardrun.cluster", "shardrun.driver", "shardrun.runs", "shardrun.export", "shardrun.hf_export",
     "shardrun.generate", "shardrun.report", "shardrun.jobs", "shardrun.working_dir", "shardrun.specdoc"),
    ("shardrun.cli", "shardrun.__main__"),
]
"""Bottom first: a module may import from its own layer and the layers below it."""


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> int:
    best = max((prefix for group in LAYERS for prefix in group
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(i for i, group in enumerate(LAYERS) if best in group)


def imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    """The shardrun modules `module` imports (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
            found.add(base)
        for child in ast.iter_child_nodes(node):
            inside = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if not (top_level_only and inside):
                visit(child, inside)

    visit(tree, False)
    known = modules()
    return {name for name in found if name in known and name != module}


def test_every_module_is_in_a_layer():
    assert {m for m in modules() if not any(m == p or m.startswith(p + ".") for g in LAYERS for p in g)} == set()


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_from_a_layer_above_its_own(module):
    upward = {name for name in imports(modules()[module], module, top_level_only=False) if layer(name) > layer(module)}
    assert upward == set(), f"{module} (layer {layer(module)}) imports {sorted(upward)} from above"


def test_no_import_cycle_at_module_level():
    graph = {m: imports(p, m, top_level_only=True) for m, p in modules().items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
