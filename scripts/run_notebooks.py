"""Regenerate the stored outputs of the course notebooks, exactly as CI checks them.

    .venv/bin/python scripts/run_notebooks.py              # all notebooks, in order
    .venv/bin/python scripts/run_notebooks.py 03 05        # only those whose name starts so
    .venv/bin/python scripts/run_notebooks.py --mode course --out results/course/notebooks 07

Runs each notebook top to bottom in place with DMN_MODE=fast, on the CPU, with this machine's own
CPU kernels and 2 threads (the "store" setting), and prints how long each took. Never save notebook
outputs by hand or from a GPU run: `pytest --nbval` compares against what this script stores.

Stored outputs must not depend on the CPU (notebooks/CONTRIBUTING.md says how). `make test` therefore
checks them under ANOTHER setting, "check": PyTorch's portable kernels (ATEN_CPU_CAPABILITY=default),
MKL and oneDNN capped at AVX2, one thread (conftest.py). An output that depends on the machine fails
there, on the machine that stored it, before it fails on a student's laptop. The other way round:

    .venv/bin/python scripts/run_notebooks.py --setting check     # store under the check setting
    DMN_NBVAL_SETTING=store .venv/bin/pytest notebooks/            # check under the store setting

With --mode course (or full) the notebook runs in that mode and the executed copy is written to
--out, never over the stored fast-mode outputs: the record of a real course-mode run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# What every notebook run shares: fast mode, no GPU, a fixed hash seed, inline figures, quiet bars.
BASE_ENV = {
    "DMN_MODE": "fast",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "TQDM_MININTERVAL": "1000",  # bars print their start and end, not every refresh
}
SETTINGS = {
    # where the stored outputs are made: the machine's own kernels (AVX2 / AVX-512 ...), 2 threads
    "store": {**BASE_ENV, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    # where `make test` checks them: another machine, simulated on this one
    "check": {**BASE_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
              "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


# What a stored output must never show: a traceback or a warning (something broke, or was about to), and
# an absolute path of the machine that made it (tests/test_stored_outputs.py scans every stored file too).
NOISE = re.compile(r"Traceback \(most recent call last\)|Exception ignored in|\w+Warning: ")
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])(?:/(?:home|root|work|tmp|Users|usr|opt|var|mnt|private|srv|scratch)/"
                           r"[\w.+-]+|[A-Za-z]:\\[\w.+-]+)")


def output_text(output: dict) -> str:
    """The text of one notebook output (images and widget state are not text)."""
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", [])) + f"\n{output.get('ename')}: {output.get('evalue')}"
    text = output.get("text", "")
    data = output.get("data", {})
    parts = [text] + [data.get(key, "") for key in ("text/plain", "text/html", "text/markdown")]
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def stored_output_problems(nb: dict) -> list[str]:
    """Each output of a notebook (a dict as json.load reads it) that holds a traceback, an error, a warning
    or an absolute path: [] when the notebook is fit to be stored."""
    problems = []
    for index, cell in enumerate(nb.get("cells", [])):
        for output in cell.get("outputs", []):
            text = output_text(output)
            if output.get("output_type") == "error" or NOISE.search(text):
                problems.append(f"cell {index}: a traceback, error or warning: {text.strip()[:200]!r}")
            for match in ABSOLUTE_PATH.finditer(text):
                problems.append(f"cell {index}: an absolute path of this machine: {match.group()!r}")
    return problems


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
    problems = stored_output_problems(json.loads(nbformat.writes(nb)))
    if problems:
        rejected = (out or path.parent) / f"{path.stem}.rejected.ipynb"
        nbformat.write(nb, rejected)
        sys.exit(f"\n{path.name}: not stored, its outputs show what no stored output may "
                 f"(notebooks/CONTRIBUTING.md):\n  " + "\n  ".join(problems[:10])
                 + f"\nThe executed copy is in {rejected.relative_to(ROOT)} for a look; fix the cause and run again.")
    nbformat.write(nb, out / path.name if out else path)
    return elapsed


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="notebook name prefixes, e.g. 03 05 (default: all)")
    parser.add_argument("--mode", choices=("fast", "course", "full"), default="fast")
    parser.add_argument("--out", type=Path, help="folder for the executed copies (required unless --mode fast)")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="store",
                        help="CPU setting to run under (default: store; see the module docstring)")
    args = parser.parse_args(argv)
    if args.mode != "fast" and args.out is None:
        parser.error("--mode course/full needs --out DIR: the stored outputs are fast-mode outputs")
    os.environ.update(SETTINGS[args.setting])
    if args.mode != "fast":  # the student's machine: its own threads (and GPU, in full mode)
        os.environ["DMN_MODE"] = args.mode
        for key in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY",
                    "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
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
