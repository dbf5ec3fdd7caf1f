"""The course's run modes: one switch, `DMN_MODE`, read once near the top of every notebook.

    fast    (default) CI and the stored notebook outputs: seconds to ~2 minutes per notebook on
            2 CPU cores. Small data, few steps; trained results are loaded from `results/`.
    course  a student's laptop CPU: minutes; notebook 07 trains the course preset for real.
    full    a GPU: the full-size runs (also produced by `python -m dmn_lib experiment ...`).

Notebook 00 explains the modes; every notebook's parameters cell does
    DMN_MODE = os.environ.get("DMN_MODE", "fast");  S = course.settings(DMN_MODE)
(papermill can set DMN_MODE too: `papermill nb.ipynb out.ipynb -p DMN_MODE course`).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MODES = ("fast", "course", "full")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
FIGURES_DIR = REPO_ROOT / "figures"


@dataclass(frozen=True)
class ModeSettings:
    mode: str
    image_size: int  # SynthRef images (DESIGN §4.1: 128 px for tests, 192 px for course results)
    train_size: int  # training samples generated
    eval_size: int  # samples per evaluated split
    train_minutes: float  # wall-clock budget of notebook 07's training run
    batch_size: int
    num_workers: int
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def settings(mode: str | None = None) -> ModeSettings:
    """The knobs of one mode (default: the DMN_MODE environment variable, else 'fast')."""
    mode = (mode or os.environ.get("DMN_MODE") or "fast").strip().lower()
    if mode not in MODES:
        raise ValueError(f"DMN_MODE={mode!r} is not a mode; choose one of {MODES}")
    cuda = torch.cuda.is_available()
    if mode == "full" and not cuda:
        raise RuntimeError(
            "DMN_MODE=full trains at full size and needs a GPU (none found). Use DMN_MODE=course on a "
            "CPU, or run `python -m dmn_lib experiment ... --device cuda` on a GPU machine."
        )
    table = {
        "fast": ModeSettings("fast", 128, 600, 200, 0.75, 16, 0, "cpu"),
        "course": ModeSettings("course", 192, 20000, 1000, 15.0, 16, 1, "cuda" if cuda else "cpu"),
        "full": ModeSettings("full", 192, 60000, 2000, 60.0, 64, 8, "cuda"),
    }
    return table[mode]


def figure_path(name: str) -> Path:
    """Where a notebook saves a figure (figures/ at the top of the repository)."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    return FIGURES_DIR / name
