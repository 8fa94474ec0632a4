"""The package's layers, and imports that point only down them.

Every import of a ``lawa_suite`` module counts: at module level, inside functions and under ``TYPE_CHECKING``
(a deferred import is still a dependency; deferring one only hides it). Importing ``a.b.c`` from outside ``a``
also runs ``a/__init__`` and ``a/b/__init__``, so those count too. The rule: a module imports only modules of its
own layer or of the layers below it, and no import cycle exists at all (within a layer either).

Layers, from the bottom (a module belongs to the first layer with a prefix matching its dotted name):
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lawa_suite"

# (layer, module prefixes); prefixes are relative to lawa_suite. A prefix names a module or a package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "files", "overrides", "registry", "config", "run_lock", "rundir", "checkpoints",
                    "module_folders", "threads", "plotting")),
    ("data", ("data",)),
    ("evaluators", ("evaluators",)),
    ("averagers", ("averagers",)),
    ("tasks", ("tasks",)),
    ("report", ("report",)),  # reads run folders; the training loop writes a run's report through it
    ("training", ("training", "integrations")),
    ("posthoc", ("posthoc",)),
    ("evaluation", ("evaluation", "causal_lm", "export")),
    ("bench", ("bench",)),
    ("interface", ("cli", "testing")),
]
TOP = ("lawa_suite",)

# Modules that may import the package inside a function, and why: each keeps a light path from loading torch or
# another slow import. Anywhere else an import goes at the top, where the next reader sees the dependency.
DEFERRED_ALLOWED = {
    "lawa_suite.cli": "`suite --help` imports no torch (tests/test_config.py checks it)",
    "lawa_suite.bench.runner": "`suite bench --dry-run` and `emit=` plan cells and write scripts without torch",
    "lawa_suite.bench.sweeps": "imported by bench's planning; the sweeps themselves need torch only when they run",
    "lawa_suite.report.run": "a run's report reads files: torch loads only to say why an averager was never ready",
    "lawa_suite.evaluators.fid": "its offline stand-in network imports torch-fidelity (seconds) only when used",
}  # the package's own __init__: lazy re-exports only, above everything

__doc__ += "\n".join(f"  {name}: {', '.join(prefixes)}" for name, prefixes in LAYERS)


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file, with the packages those imports run."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            wanted = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in wanted:
            while target and target not in modules:  # lawa_suite.x.attr -> lawa_suite.x
                target = target.rpartition(".")[0]
            while target and target != name and not name.startswith(target + "."):
                targets.add(target)  # and each package whose __init__ the import runs, outside our own
                target = target.rpartition(".")[0]
    targets.discard("lawa_suite")
    return targets


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    relative = module.removeprefix("lawa_suite.")
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(relative == p or relative.startswith(p + ".") for p in prefixes):
            return index
    if module in TOP:
        return len(LAYERS)
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                  for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle_even_through_deferred_imports():
    assert cycles(import_graph()) == []


def deferred_imports(package: Path = PACKAGE) -> dict[str, list[str]]:
    """module -> the package modules it imports inside a function."""
    found: dict[str, list[str]] = {}
    for name, path in module_files(package).items():
        for function in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                found.setdefault(name, []).extend(t for t in targets if t.split(".")[0] == "lawa_suite")
    return {name: sorted(set(targets)) for name, targets in found.items() if targets}


def test_package_imports_inside_functions_only_where_start_up_needs_them():
    assert {m: t for m, t in deferred_imports().items() if m not in DEFERRED_ALLOWED} == {}


def test_the_contract_catches_a_wrong_way_import_a_deferred_one_and_a_cycle(tmp_path):
    package = tmp_path / "lawa_suite"
    (package / "averagers").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "averagers" / "__init__.py").write_text("from lawa_suite.averagers.ema import X\n")
    (package / "averagers" / "ema.py").write_text("def f():\n    from lawa_suite.training import loop\n")  # upward
    (package / "training").mkdir()
    (package / "training" / "__init__.py").write_text("")
    (package / "training" / "loop.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                  "    from lawa_suite.averagers.ema import X\n")
    graph = import_graph(package)
    # importing averagers.ema from the loop also runs averagers/__init__; inside the package it does not count
    assert graph["lawa_suite.training.loop"] == {"lawa_suite.averagers", "lawa_suite.averagers.ema"}
    assert upward_imports(graph) == ["lawa_suite.averagers.ema (averagers) imports lawa_suite.training (training)",
                                     "lawa_suite.averagers.ema (averagers) imports lawa_suite.training.loop (training)"]
    assert cycles(graph) == [["lawa_suite.averagers", "lawa_suite.averagers.ema", "lawa_suite.training.loop"]]
    assert deferred_imports(package) == {"lawa_suite.averagers.ema": ["lawa_suite.training"]}
