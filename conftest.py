"""Repository-wide pytest set-up, also for `pytest --nbval` on notebooks/.

Every notebook kernel that nbval starts runs under the "check" setting of scripts/run_notebooks.py
(one definition, `SETTINGS`, shared with the script that stores the outputs): fast mode, no GPU, and a
CPU setting that differs from the one the outputs were stored under (PyTorch's portable kernels, MKL and
oneDNN capped at AVX2, one thread). An output that depends on the CPU therefore fails `make test` on
any machine, the one that stored it included. `DMN_NBVAL_SETTING=store` checks under the store setting
instead (to show the other direction). The kernels save their figures into a temporary folder
(DMN_FIGURES_DIR), so a test run leaves figures/ as it was. The unit tests' own process is not affected.
"""
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from run_notebooks import SETTINGS  # noqa: E402

FIGURES = tempfile.TemporaryDirectory(prefix="dmn_nbval_figures_")


def notebook_env() -> dict:
    name = os.environ.get("DMN_NBVAL_SETTING", "check")
    if name not in SETTINGS:
        raise pytest.UsageError(f"DMN_NBVAL_SETTING={name!r} is not one of {sorted(SETTINGS)}")
    return {**SETTINGS[name], "DMN_FIGURES_DIR": FIGURES.name}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """nbval starts a notebook's kernel while setting up its first cell: give that kernel the setting."""
    if type(item).__name__ != "IPyNbCell":
        yield
        return
    saved = dict(os.environ)
    os.environ.update(notebook_env())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
