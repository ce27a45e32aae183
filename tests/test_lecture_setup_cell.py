"""Every lecture starts with the same short setup cell, which installs minidiff only where it is missing."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LECTURES = sorted((REPO / "notebooks").glob("0*.ipynb"))
MARK = "# Setup: installs minidiff"


def _setup_source(path: Path) -> str:
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    return "".join(code[0]["source"])


@pytest.mark.parametrize("path", LECTURES, ids=[p.stem for p in LECTURES])
def test_first_code_cell_is_the_setup_cell(path):
    assert _setup_source(path).startswith(MARK)
    assert _setup_source(path) == _setup_source(LECTURES[0])


def _run(source: str, cwd: Path, monkeypatch, installed: bool) -> list:
    calls = []
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if installed else None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    exec(source, {})  # noqa: S102 -- the lecture's own setup cell
    return calls


def test_setup_cell_does_nothing_where_minidiff_is_installed(monkeypatch):
    assert _run(_setup_source(LECTURES[0]), REPO / "notebooks", monkeypatch, installed=True) == []


def test_setup_cell_installs_the_checkout_it_sits_in(monkeypatch):
    calls = _run(_setup_source(LECTURES[0]), REPO / "notebooks", monkeypatch, installed=False)
    assert len(calls) == 1 and calls[0][-3:] == ["-q", "-e", str(REPO)]


def test_setup_cell_outside_a_checkout_says_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(ModuleNotFoundError, match="clone the course repository and run `pip install -e .`"):
        _run(_setup_source(LECTURES[0]), tmp_path, monkeypatch, installed=False)
