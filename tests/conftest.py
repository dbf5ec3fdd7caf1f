"""Shared test set-up: deterministic, CPU, two threads (what CI has)."""
import os

import matplotlib

matplotlib.use("Agg")  # this process only; notebook kernels keep the inline backend (../conftest.py)

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when it is first imported (timm, and so dmn_lib, import it): set it before
    # any test module is collected, so the fused SRU's Triton kernels run in the interpreter on the CPU
    # (tests/test_sru_kernels.py). With a GPU they run compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
