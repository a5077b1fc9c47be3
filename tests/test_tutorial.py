"""The tutorial (docs/tutorial.ipynb): built from docs/make_tutorial.py's cells, runs top to bottom, writes only to
a temporary directory that it removes, and its Markdown rendering matches the executed notebook."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _maker():
    spec = importlib.util.spec_from_file_location("make_tutorial", ROOT / "docs" / "make_tutorial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tutorial = _maker()


def _figures(nb: nbformat.NotebookNode) -> list[int]:
    """The number of PNG figures each code cell output."""
    return [sum("image/png" in o.get("data", {}) for o in c.outputs) for c in nb.cells if c.cell_type == "code"]


def _figure_calls(nb: nbformat.NotebookNode) -> list[int]:
    """The figures each code cell draws: its calls of show(...) and its top-level plt.show()."""
    pattern = re.compile(r"^\s*show\(|^plt\.show\(\)", re.MULTILINE)
    return [len(pattern.findall(c.source)) for c in nb.cells if c.cell_type == "code"]


def _git_status() -> str | None:
    try:
        return subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout


def test_committed_notebook_is_built_from_the_cells():
    committed = nbformat.read(make_tutorial.NOTEBOOK, as_version=4)
    assert make_tutorial.same_cells(committed, make_tutorial.build()), "run python docs/make_tutorial.py"


def test_committed_notebook_ran_cleanly_and_the_markdown_matches_it(tmp_path):
    nb = nbformat.read(make_tutorial.NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # every cell, in order, once
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert _figures(nb) == _figure_calls(nb) and sum(_figures(nb)) >= 8  # every figure drawn, none lost
    figures = tmp_path / make_tutorial.FIGURES.name
    figures.mkdir()
    assert make_tutorial.render_markdown(nb, figures) == make_tutorial.MARKDOWN.read_text()
    for png in figures.iterdir():
        assert png.read_bytes() == (make_tutorial.FIGURES / png.name).read_bytes()
    assert sorted(p.name for p in figures.iterdir()) == sorted(p.name for p in make_tutorial.FIGURES.iterdir())


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_and_leaves_nothing_behind(tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the kernel's tempfile directory: the notebook's only place to write
    before = _git_status()
    nb = make_tutorial.execute(make_tutorial.build(), cwd=tmp_path)  # raises on the first failing cell
    assert _figures(nb) == _figure_calls(nb)
    leftovers = [p for p in temp.rglob("*") if "facevae-tutorial" in str(p)]
    assert not leftovers, "the last cell removes the notebook's temporary directory"
    assert _git_status() == before, "the notebook wrote into the repository"
    assert [p.name for p in tmp_path.iterdir()] == ["tmp"]  # nothing in the working directory either
