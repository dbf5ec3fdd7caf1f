"""What is stored in the repository must not show a traceback, a warning, or a path of the machine that made it.

A stored record with a traceback tells a student that something broke; an absolute path
(/home/someone/..., a virtualenv's site-packages) is meaningless on any other machine. Every stored
notebook (notebooks/, their exercise copies, the records under results/) and every results JSON file is
scanned. `scripts/run_notebooks.py` runs the same scan before it stores a notebook.
"""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebooks import ABSOLUTE_PATH, stored_output_problems  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").rglob("*.ipynb")) + sorted((ROOT / "results").rglob("*.ipynb"))
RESULT_FILES = sorted((ROOT / "results").rglob("*.json"))


def strings(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])
def test_stored_notebook_outputs_are_clean(path):
    problems = stored_output_problems(json.loads(path.read_text()))
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", RESULT_FILES, ids=[str(p.relative_to(ROOT)) for p in RESULT_FILES])
def test_results_hold_no_machine_paths(path):
    found = [m.group() for s in strings(json.loads(path.read_text())) for m in ABSOLUTE_PATH.finditer(s)]
    assert not found, f"{path.relative_to(ROOT)} holds absolute paths {found[:5]}: store them relative to the repo"


@pytest.mark.parametrize("bad", [
    {"output_type": "error", "ename": "ValueError", "evalue": "x", "traceback": []},
    {"output_type": "stream", "name": "stderr", "text": "Exception ignored in: <function f>\n"},
    {"output_type": "stream", "name": "stderr", "text": "Traceback (most recent call last):\n"},
    {"output_type": "stream", "name": "stderr", "text": "x.py:3: UserWarning: careful\n"},
    {"output_type": "stream", "name": "stdout", "text": "saved to /home/ana/dmn/runs/a.pt\n"},
    {"output_type": "execute_result", "data": {"text/plain": "'/work/main/.venv/lib/python3.11/site-packages/torch'"}},
    {"output_type": "stream", "name": "stdout", "text": "C:\\Users\\ana\\dmn\n"},
])
def test_the_scan_finds_what_it_must(bad):
    assert stored_output_problems({"cells": [{"cell_type": "code", "outputs": [bad]}]})


def test_the_scan_passes_what_is_fine():
    fine = [{"output_type": "stream", "name": "stdout", "text": "results/course/unc/model.pt: 946 steps\n"},
            {"output_type": "stream", "name": "stderr", "text": "train: 100%|##########| 45/45\n"},
            {"output_type": "display_data", "data": {"image/png": "iVBOR/9j/home/x", "text/plain": "<Figure>"}}]
    assert stored_output_problems({"cells": [{"cell_type": "code", "outputs": fine}]}) == []
