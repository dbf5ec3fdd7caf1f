"""The course's run modes: one switch, `DMN_MODE`, read once near the top of every notebook.

Defined in notebook 00, §4. Each mode runs one named spec (dmn_lib.spec), with the notebooks' own data
sizes and time budget on top (`ModeSettings.run_spec()` is that spec):

    fast    (default) CI and the stored notebook outputs: seconds to ~2 minutes per notebook on
            2 CPU cores. The `fast` spec with 128 px images and 600 training samples; trained
            results are loaded from `results/`.
    course  a student's laptop CPU: minutes; notebook 07 trains the `course` spec for real, for 15
            minutes by the clock at 128 px: the run of results/course/unc15.
    full    a GPU: the `paper` spec (also run by `python -m dmn_lib experiment ... --spec paper`).

Every notebook's parameters cell does
    DMN_MODE = os.environ.get("DMN_MODE", "fast");  S = course.settings(DMN_MODE)
(papermill can set DMN_MODE too: `papermill nb.ipynb out.ipynb -p DMN_MODE course`).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dmn_lib.spec import RunSpec, spec

MODES = ("fast", "course", "full")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
FIGURES_DIR = REPO_ROOT / "figures"


@dataclass(frozen=True)
class ModeSettings:
    """The knobs of one mode (notebook 00, §4)."""

    mode: str
    spec: str  # the named spec this mode runs (dmn_lib.spec)
    image_size: int  # SynthRef images of the notebooks (128 px: the course spec's)
    train_size: int  # training samples generated
    eval_size: int  # samples per evaluated split
    train_minutes: float  # wall-clock budget of notebook 07's training run
    batch_size: int
    num_workers: int
    device: str

    def as_dict(self) -> dict:
        return asdict(self)

    def run_spec(self) -> RunSpec:
        """The mode's spec: the named one with this mode's data sizes, batch, workers, device and time budget."""
        return spec(self.spec, data={"image_size": self.image_size, "train_size": self.train_size,
                                     "val_size": self.eval_size, "test_size": self.eval_size},
                    train={"batch_size": self.batch_size, "num_workers": self.num_workers, "device": self.device,
                           "max_minutes": self.train_minutes})


def settings(mode: str | None = None) -> ModeSettings:
    """The knobs of one mode (default: the DMN_MODE environment variable, else 'fast'). Notebook 00, §4."""
    mode = (mode or os.environ.get("DMN_MODE") or "fast").strip().lower()
    if mode not in MODES:
        raise ValueError(f"DMN_MODE={mode!r} is not a mode; choose one of {MODES}")
    cuda = torch.cuda.is_available()
    if mode == "full" and not cuda:
        raise RuntimeError(
            "DMN_MODE=full trains at full size and needs a GPU (none found). Use DMN_MODE=course on a "
            "CPU, or run `python -m dmn_lib experiment ... --spec paper --device cuda` on a GPU machine."
        )
    table = {
        "fast": dict(spec="fast", image_size=128, train_size=600, eval_size=200, train_minutes=0.75, batch_size=16,
                     num_workers=0, device="cpu"),
        "course": dict(spec="course", image_size=128, train_size=20000, eval_size=1000, train_minutes=15.0,
                       batch_size=16, num_workers=1, device="cuda" if cuda else "cpu"),
        "full": dict(spec="paper", image_size=192, train_size=60000, eval_size=2000, train_minutes=60.0,
                     batch_size=64, num_workers=8, device="cuda"),
    }
    return ModeSettings(mode, **table[mode])


def results_command(run: str = "unc") -> str:
    """The command that makes a committed course run (notebooks print it where the run is missing):
    "unc" the flagship of notebooks 04, 05, 08 and 11 (the course spec for 60 minutes of training, resumable),
    "unc15" the 15-minute run of notebook 07 and its image-only twin."""
    experiment = {"unc": "flagship", "unc15": "unc15"}.get(run)
    if experiment is None:
        raise ValueError(f"No committed course run {run!r}; choose 'unc' (the flagship) or 'unc15'")
    return f".venv/bin/python -m dmn_lib experiment {experiment} --spec course --device cpu --out results/course"


def figure_path(name: str) -> Path:
    """Where a notebook saves a figure: figures/ at the top of the repository, or the folder named by
    $DMN_FIGURES_DIR (the regression check points it at a temporary folder, so `make test` leaves the
    checkout as it found it). Notebook 00, §2."""
    folder = Path(os.environ.get("DMN_FIGURES_DIR") or FIGURES_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
