"""The layering of ARCHITECTURE.md: no import cycle, no import up the layers, no module over 400 lines.

The layers and other contracts are written once, in pyproject.toml's [tool.importlinter]
(also run by `make lint`); this test reads them from there. The cycle check walks the
whole import graph (lazy imports inside functions included), across packages too.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def cycles(package: str) -> list[list[str]]:
    """Every group of modules of `package` that import each other, directly or through others."""
    graph = grimp.build_graph(package, cache_dir=None)
    edges = nx.DiGraph()
    for module in graph.modules:
        edges.add_node(module)
        edges.add_edges_from((module, imported) for imported in graph.find_modules_directly_imported_by(module))
    return sorted(sorted(group) for group in nx.strongly_connected_components(edges) if len(group) > 1)


def test_no_module_imports_another_that_imports_it_back():
    assert cycles("colaft") == []


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: a package whose modules import each other (one lazily) is caught."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n")
    (package / "b.py").write_text("def f():\n    from cyclic import c\n")
    (package / "c.py").write_text("import cyclic.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cycles("cyclic") == [["cyclic.a", "cyclic.b", "cyclic.c"]]


def test_every_import_linter_contract_is_kept():
    """The layers, the forbidden imports, the independent backends (pyproject.toml), checked by
    import-linter as `make lint` does; its report names any broken contract and the import chain."""
    out = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True)
    assert "Layers: each imports only those below it KEPT" in out.stdout
    assert out.returncode == 0, out.stdout[-3000:]


@pytest.mark.parametrize("folder", ["colaft"])
def test_no_module_is_over_400_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_library_imports_without_the_application():
    """`import colaft` (the library) loads no command line, service, HTTP or database package."""
    code = ("import sys, colaft; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('typer', 'fastapi', 'sqlalchemy', 'uvicorn', 'httpx', 'ray') or m.split('.')[:2] == ['colaft', 'app']"
            " or m.split('.')[:2] == ['colaft', 'serve']); print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
