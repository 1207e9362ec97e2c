"""The layers of DESIGN.md section 1, checked on the source: core <- converters <- backends <- command line.

Every ``.py`` file of the five packages is parsed with ``ast`` (imports inside functions count too),
so an upward import fails here even when no test happens to execute it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ricefm", "converters", "ricefm_jax", "ricefm_npu", "ricefm_cli")
# what each package may not import (directly or inside a function)
FORBIDDEN = {"ricefm": {"ricefm_jax", "ricefm_npu", "converters", "ricefm_cli"},
             "converters": {"ricefm_jax", "ricefm_npu", "ricefm_cli"},
             "ricefm_jax": {"ricefm_cli", "ricefm_npu"},
             "ricefm_npu": {"ricefm_cli", "ricefm_jax"}}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import statement in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def package_imports() -> dict[str, list[tuple[str, int, str]]]:
    """package -> [(file, line, imported package)] for imports of another of the five packages."""
    edges: dict[str, list[tuple[str, int, str]]] = {p: [] for p in PACKAGES}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for line, target in imported_packages(path):
                if target in PACKAGES and target != pkg:
                    edges[pkg].append((str(path.relative_to(REPO)), line, target))
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each listed once from its smallest node."""
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.append(path[:])
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_layers_point_one_way():
    bad = [f"{f}:{line} imports {target}" for pkg, rows in package_imports().items() for f, line, target in rows
           if target in FORBIDDEN.get(pkg, ())]
    assert not bad, "upward imports (core <- converters <- backends <- cli):\n" + "\n".join(bad)


def test_no_import_cycles_between_packages():
    graph = {pkg: {t for _, _, t in rows} for pkg, rows in package_imports().items()}
    assert not cycles(graph), cycles(graph)


def test_cycle_finder_sees_cycles():
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"a"}}) == [["a", "b"], ["a", "b", "c"]]


if __name__ == "__main__":  # a report: core -> backend/converter import statements and cycles
    edges = package_imports()
    core = [r for r in edges["ricefm"] if r[2] in FORBIDDEN["ricefm"]]
    found = cycles({pkg: {t for _, _, t in rows} for pkg, rows in edges.items()})
    print(f"core -> backends/converters/cli import statements: {len(core)}")
    for f, line, target in core:
        print(f"  {f}:{line} {target}")
    print(f"package import cycles: {len(found)}")
    for c in found:
        print("  " + " -> ".join(c + c[:1]))
