"""Regenerate the stored outputs of the course notebooks, exactly as CI checks them.

    .venv/bin/python scripts/run_notebooks.py              # all notebooks, in order
    .venv/bin/python scripts/run_notebooks.py 03 05        # only those whose name starts so
    .venv/bin/python scripts/run_notebooks.py --mode course --out results/course/notebooks 07

Runs each notebook top to bottom in place with DMN_MODE=fast, on the CPU, with 2 threads
(what CI has), and prints how long each took. Never save notebook outputs by hand or from a
GPU run: `pytest --nbval` compares against what this script stores.

With --mode course (or full) the notebook runs in that mode and the executed copy is written to
--out, never over the stored fast-mode outputs: the record of a real course-mode run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
FIXED_ENV = {
    "DMN_MODE": "fast",
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "TQDM_MININTERVAL": "1000",  # bars print their start and end, not every refresh
}


def notebooks(prefixes: list[str]) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(x) for x in prefixes)]
    if not found:
        sys.exit(f"No notebooks match {prefixes} in {NOTEBOOKS}")
    return found


def run(path: Path, out: Path | None = None, timeout: int = 900) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, out / path.name if out else path)
    return elapsed


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="notebook name prefixes, e.g. 03 05 (default: all)")
    parser.add_argument("--mode", choices=("fast", "course", "full"), default="fast")
    parser.add_argument("--out", type=Path, help="folder for the executed copies (required unless --mode fast)")
    args = parser.parse_args(argv)
    if args.mode != "fast" and args.out is None:
        parser.error("--mode course/full needs --out DIR: the stored outputs are fast-mode outputs")
    os.environ.update(FIXED_ENV)
    if args.mode != "fast":  # the student's machine: its own threads (and GPU, in full mode)
        os.environ["DMN_MODE"] = args.mode
        for key in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.pop(key, None)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for path in notebooks(args.prefixes):
        print(f"{path.name:<40}", end=" ", flush=True)
        seconds = run(path, args.out, timeout=900 if args.mode == "fast" else 4 * 3600)
        total += seconds
        print(f"{seconds:6.1f} s", flush=True)
    print(f"{'total':<40} {total:6.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
