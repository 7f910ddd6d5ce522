"""The package's import graph: no cycles between modules (every ``import``, module- or
function-level, counts), checked from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is package) for megatron_hbp and kernels/ (as megatron_hbp.kernels)."""
    mods = {}
    for path in sorted([*(ROOT / "megatron_hbp").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        rel = path.relative_to(ROOT).with_suffix("")
        if "tests" in rel.parts:
            continue
        parts = list(rel.parts)
        if parts[0] == "kernels":
            parts = ["megatron_hbp", *parts]
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                # `from pkg import sub` imports the sub-module (its package is implied, not a cycle).
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [module, *subs]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    # function-level: the command line imports the training loop inside main()
    assert "megatron_hbp.mcore.loop" in graph["megatron_hbp.mcore.cli"]
    # relative, one folder per op
    assert (
        "megatron_hbp.kernels.cross_entropy.kernel"
        in graph["megatron_hbp.kernels.cross_entropy.fused_linear"]
    )


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], f"import cycle(s): {[sorted(c) for c in found]}; move the shared piece down a layer"


def test_broken_cycles_stay_broken():
    graph = import_graph()
    assert not any(d.startswith("megatron_hbp.convert") for d in graph["megatron_hbp.model_config"])
    assert "megatron_hbp.costmodel.select" not in graph["megatron_hbp.costmodel.profiler"]
    assert "megatron_hbp.costmodel.model" not in graph["megatron_hbp.costmodel.hardware"]
