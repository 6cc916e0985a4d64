"""The import layering of nanochat/: no module imports one that imports it back (lazily inside a function
included), and the checkpoint package stays torch-free at import (`nanochat-run status` lists checkpoints in a
second). Reads the real source files; the torch check runs a real interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.runs import REPO_ROOT


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported(tree: ast.AST) -> set[str]:
    """Every module name an import statement anywhere in `tree` may load, except under `if TYPE_CHECKING:`."""
    names: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:  # `from a import b`: b may be a module a.b
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        names |= imported(node)
    return names


def import_graph(top: Path) -> dict[str, set[str]]:
    """{module: the modules of `top` it imports}. Importing a.b.c also runs the packages a.b and a, unless the
    importer is inside them (then they are already being imported)."""
    files = {module_name(p): p for p in top.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in imported(ast.parse(path.read_text())):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in files and dep != name and not name.startswith(dep + "."):
                    deps.add(dep)
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node], path[len(path) :] = "open", [node]
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        state[node] = "done"
        path.pop()

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_nanochat_has_no_import_circle() -> None:
    graph = import_graph(REPO_ROOT / "nanochat")
    assert {"nanochat.checkpoint", "nanochat.checkpoint.snapshots", "nanochat.locks"} <= graph.keys()
    assert "nanochat.checkpoint.snapshots" in graph["nanochat.checkpoint.resolve"]  # the resolver is above both
    assert "nanochat.checkpoint.discovery" in graph["nanochat.checkpoint.resolve"]
    assert circles(graph) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # (the check itself)


def test_the_checkpoint_package_and_locks_import_without_torch() -> None:
    code = "import sys, nanochat.checkpoint, nanochat.locks; print(sorted(m for m in sys.modules if 'torch' in m))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr or proc.stdout
