"""Make the student versions of the module notebooks: `notebooks/exercises/NN_*.ipynb`.

    .venv/bin/python scripts/make_exercises.py          # (re)write every exercise copy
    .venv/bin/python scripts/make_exercises.py --check  # exit 1 if a copy is out of date

In a solution notebook, a code cell tagged `solution` is one the student writes. In the copy its
code is replaced by a TODO: the cell's leading comment lines (which say what to write) are kept,
followed by `raise NotImplementedError(...)`. All outputs are cleared. The cells tagged `check`
after it stay as they are, so a student knows when the answer is right; tests/test_exercises.py
checks the copies are up to date and that the solution notebooks pass their checks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXERCISES = NOTEBOOKS / "exercises"
TODO = 'raise NotImplementedError("TODO: write this cell, then run the check below")'


def blank(source: str) -> str:
    """Keep the leading comment block (the instructions), replace the code with a TODO."""
    lines = source.splitlines()
    head = []
    for line in lines:
        if line.startswith("#") or not line.strip():
            head.append(line)
        else:
            break
    while head and not head[-1].strip():
        head.pop()
    return "\n".join(head + ["# TODO", TODO])


def exercise_copy(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.reads(nbformat.writes(solution), as_version=4)  # a deep copy we can edit
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)  # run timestamps: a copy must not change with every run
        if "solution" in cell.metadata.get("tags", []):
            cell.source = blank(cell.source)
    banner = nbformat.v4.new_markdown_cell(
        "> **Exercise version.** Cells ending in `raise NotImplementedError` are yours to write; the "
        "comment above each says what. Run the `check` cell after it to know you got it right. The "
        f"solution is `../{solution.metadata.get('dmn_name', 'the notebook of the same name')}`."
    )
    banner.id = "exercise-banner"  # fixed, so regenerating gives identical files
    nb.cells.insert(0, banner)
    return nb


def solution_notebooks() -> list[Path]:
    paths = []
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if any("solution" in c.metadata.get("tags", []) for c in nb.cells):
            paths.append(path)
    return paths


def render(path: Path) -> str:
    solution = nbformat.read(path, as_version=4)
    solution.metadata["dmn_name"] = path.name
    nb = exercise_copy(solution)
    nb.metadata.pop("dmn_name", None)
    return nbformat.writes(nb)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the copies are up to date")
    args = parser.parse_args(argv)
    EXERCISES.mkdir(exist_ok=True)
    stale = []
    for path in solution_notebooks():
        target = EXERCISES / path.name
        text = render(path)
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(target.relative_to(ROOT))
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")
    if stale:
        print("Out of date (run scripts/make_exercises.py): " + ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
