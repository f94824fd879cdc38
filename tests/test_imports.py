"""The package's imports flow one way: no module imports one that imports it back,
directly or around a loop, counting imports inside functions too (an import moved
into a function to dodge a cycle at import time is still a cycle of design)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grpo_jax",)


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its source (a name imported
    from a package counts as its submodule when there is one, else the package)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` also runs a and a.b; the deepest known module is the edge.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and "grpo_jax.model.gemma3" in graph
    assert "grpo_jax.sharding" in graph["grpo_jax.model.gemma3"]  # the graph sees edges
    assert cycles(graph) == []


def test_cycle_finder_finds_a_loop_through_function_local_imports(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text("from a import y\n")
    graph = {n: imported_modules(n, tmp_path / f"{n}.py", {"a", "b", "c"}) for n in "abc"}
    assert cycles(graph) == [["a", "b", "c"]]


def test_kernels_import_nothing_of_grpo_jax_but_themselves():
    graph = import_graph()
    kernels = [n for n in graph if n.startswith("grpo_jax.kernels.")]
    assert len(kernels) >= 5
    for name in kernels:
        assert all(d.startswith("grpo_jax.kernels") or d == "grpo_jax" for d in graph[name]), name


def test_library_imports_have_no_global_side_effects():
    """Importing every library module leaves the interpreter's global hooks, the root
    logger and JAX's platform choice as they were: those belong to the CLI entry."""
    code = f"""
import logging, sys
before = (sys.unraisablehook, sys.excepthook, None,
          [list(logging.getLogger(n).filters) for n in ("asyncio", "absl")])
import importlib
for name in {sorted(n for n in module_files() if not n.endswith('__main__'))!r}:
    importlib.import_module(name)
after = (sys.unraisablehook, sys.excepthook, None,
         [list(logging.getLogger(n).filters) for n in ("asyncio", "absl")])
assert before[0] is after[0], "sys.unraisablehook replaced at import"
assert before[1] is after[1], "sys.excepthook replaced at import"
assert before[3] == after[3], "logging filters installed at import"
import jax
assert jax.config.jax_platforms in (None, "", "cpu"), jax.config.jax_platforms
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
