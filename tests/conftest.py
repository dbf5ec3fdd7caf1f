"""Shared test set-up: deterministic, CPU, two threads (what CI has)."""
import os

import matplotlib

matplotlib.use("Agg")  # this process only; notebook kernels keep the inline backend (../conftest.py)

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
