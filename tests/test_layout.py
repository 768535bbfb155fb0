"""The package's import graph: no cycles, imports only in the allowed directions, nothing imports an entry point,
and the torch-free parts (records, plots) import no torch. Read from the source (ast), so lazy imports inside
functions count too."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "memory_test"
# Which parts of memory_test each part may import (itself always): entry points -> suite -> {privacy, models,
# diffusion, profiling, records}; cli_common under everything.
ALLOWED = {
    "cli_common": set(),
    "records": {"cli_common"},
    "profiling": {"cli_common"},
    "kernels": set(),
    "privacy": {"kernels"},
    "models": set(),
    "diffusion": {"cli_common"},
    "train": {"privacy", "models", "diffusion", "cli_common"},
    "suite": {"privacy", "models", "diffusion", "profiling", "records", "cli_common"},
    "plots": {"records", "cli_common"},
    "entry": {"suite", "plots", "train", "models", "privacy", "records", "cli_common"},
}
ENTRY_POINTS = {
    "memory_test.diffusion_profile.single_experiment",
    "memory_test.diffusion_profile.visualize_memory_breakdown",
    "memory_test.diffusion_profile.inspect_dit_model",
    "memory_test.diffusion_profile.train_dp",
    "memory_test.train.__main__",
    "memory_test.records.__main__",
}
NO_TORCH = ("records", "plots")
TORCH_STACK = {"torch", "diffusers", "opacus", "triton", "numpy"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part(module: str) -> str:
    """The layer a module belongs to."""
    names = module.split(".")
    if module in ENTRY_POINTS or len(names) == 1:
        return "entry"
    if names[1] == "diffusion_profile":
        return names[2] if len(names) > 2 and names[2] in ("suite", "plots") else "entry"
    return names[1]


def _longest_module(dotted: str) -> str:
    while dotted not in MODULES and "." in dotted:
        dotted = dotted.rsplit(".", 1)[0]
    return dotted


def _import_nodes(tree: ast.Module, lazy: bool):
    """Every import statement, or (``lazy=False``) only those run when the module is imported (not in functions)."""
    if lazy:
        yield from ast.walk(tree)
        return
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        todo += list(ast.iter_child_nodes(node))


@cache
def imports(module: str, lazy: bool = True) -> tuple[set[str], set[str]]:
    """(memory_test modules, top-level external packages) that ``module`` imports: anywhere in its source, or
    (``lazy=False``) at import time only."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets = []
    for node in _import_nodes(ast.parse(path.read_text()), lazy):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets += [f"{base}.{a.name}" for a in node.names]
    inside = {_longest_module(t) for t in targets if t.startswith("memory_test")}
    outside = {t.split(".")[0] for t in targets if not t.startswith("memory_test")}
    return inside - {module}, outside


def test_every_import_of_memory_test_resolves_to_a_module():
    unknown = {(m, t) for m in MODULES for t in imports(m)[0] if t not in MODULES}
    assert not unknown, sorted(unknown)


def test_imports_go_only_in_the_allowed_directions():
    wrong = []
    for m in MODULES:
        for t in imports(m)[0]:
            if part(t) != part(m) and part(t) not in ALLOWED[part(m)] and t != "memory_test":
                wrong.append(f"{m} ({part(m)}) imports {t} ({part(t)})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_an_entry_point():
    importers = [f"{m} imports {t}" for m in MODULES for t in imports(m)[0] if t in ENTRY_POINTS]
    allowed = {"memory_test.train.__main__ imports memory_test.train.run"}
    assert not [i for i in importers if i not in allowed], importers


def test_no_import_cycles():
    """No cycle among modules. Imports inside functions count too, except within the engine (privacy, kernels),
    where a method may import its own package's subclass lazily (it cannot be imported at module level there)."""

    def edges(m):
        lazy = part(m) not in ("privacy", "kernels")
        return {t for t in imports(m, lazy)[0] if t in MODULES and not _is_parent_package(t, m)}

    graph = {m: edges(m) for m in MODULES}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def _is_parent_package(target: str, module: str) -> bool:
    """A module importing a name from its own package's __init__ (which re-exports the package's API)."""
    return module.startswith(target + ".")


@pytest.mark.parametrize("layer", NO_TORCH)
def test_records_and_plots_never_import_the_torch_stack(layer):
    seen, todo = set(), [m for m in MODULES if part(m) == layer]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [t for t in imports(m)[0] if t in MODULES]
    heavy = {m: imports(m)[1] & TORCH_STACK for m in seen if imports(m)[1] & TORCH_STACK}
    assert not heavy, heavy


def test_records_use_the_standard_library_only():
    external = {m: imports(m)[1] - set(sys.stdlib_module_names) for m in MODULES if part(m) == "records"}
    assert not any(external.values()), external
