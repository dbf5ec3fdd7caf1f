"""Repository-wide pytest set-up, also for `pytest --nbval` on notebooks/.

The notebook kernels inherit this environment: the very settings (fast mode, CPU, two threads,
inline figures) that scripts/run_notebooks.py used when it stored the outputs nbval compares
against — one definition, `FIXED_ENV`, so the two cannot drift apart. Variables the caller has set
win (setdefault). Unit tests switch matplotlib to Agg themselves (tests/conftest.py).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from run_notebooks import FIXED_ENV  # noqa: E402

for key, value in FIXED_ENV.items():
    os.environ.setdefault(key, value)
