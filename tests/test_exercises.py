"""The student copies in notebooks/exercises/ are generated from the solution notebooks.

The solution notebooks themselves pass their `check` cells under `pytest --nbval` (their stored
outputs include the ✓ lines); here we check the copies are current and really have blanks.
"""
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_exercises  # noqa: E402

SOLUTIONS = make_exercises.solution_notebooks()


def test_exercise_copies_are_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_exercises.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_copy_blanks_every_solution_cell_and_keeps_the_checks(solution):
    original = nbformat.read(solution, as_version=4)
    copy = nbformat.read(make_exercises.EXERCISES / solution.name, as_version=4)
    tags = lambda cell: cell.metadata.get("tags", [])  # noqa: E731
    solutions = [c for c in original.cells if "solution" in tags(c)]
    blanks = [c for c in copy.cells if "solution" in tags(c)]
    assert len(solutions) == len(blanks) > 0
    for cell in blanks:
        assert cell.source.rstrip().endswith(make_exercises.TODO)
        assert not cell.outputs
    checks = [c.source for c in original.cells if "check" in tags(c)]
    assert checks, f"{solution.name} has solution cells but no check cell"
    assert checks == [c.source for c in copy.cells if "check" in tags(c)]


def test_blank_keeps_the_instructions():
    source = "# Write eq. 5: the cell state.\n# Use f and c_prev.\nc = f * c_prev + (1 - f) * x\n"
    assert make_exercises.blank(source).splitlines() == [
        "# Write eq. 5: the cell state.", "# Use f and c_prev.", "# TODO", make_exercises.TODO,
    ]
