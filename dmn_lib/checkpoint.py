"""Saving and loading DMN checkpoints: atomically, safely, and with errors that say what is wrong.

Defined in notebook 07, §8 (training) and used by notebook 08 (evaluation) and `python -m dmn_lib`.

A checkpoint is one `torch.save` file holding only tensors and plain containers (dict, list,
tuple, str, int, float, bool, None), so it loads with `torch.load(path, weights_only=True)`:
loading it can never run code hidden in the file. It holds

    format         "dmn_lib.checkpoint/1"
    model          the model's state_dict
    config         DMNConfig.to_dict()          - the model is rebuilt from it
    data           DataSpec.to_dict() or None   - the data it was trained on
    train_config   TrainConfig.to_dict() or None  (config, data and train_config: the run's spec, `saved_spec`)
    vocab          Vocabulary.to_dict()         - the words the model was trained with
    optimizer, scheduler, scaler                - to resume training exactly (None in exports)
    progress       TrainState.to_dict(): where training stands (step, stage, epoch, batch_in_epoch,
                   the threshold picked on val, ...); the data order is a function of (seed, epoch),
                   so (epoch, batch_in_epoch) is the whole state of the data-order generator
    rng            torch / CUDA / numpy / python random states
    history        the training log (lists of dicts of numbers)
    extra          provenance, plain values only: the command, the spec's name, the experiment's row
    versions       torch, timm, sru, numpy, python, dmn_lib

Files written before dmn_lib 0.2 kept the data settings and the threshold in `extra`; `saved_spec` and
`TrainState.from_checkpoint` read both.

Three rules keep checkpoints trustworthy:
  * written atomically (temp file in the same folder, fsync, os.replace): a crash or Ctrl-C while
    saving leaves the previous checkpoint intact, never a half-written one;
  * a checkpoint that does not fit the model is an error naming every missing, unexpected and
    mis-shaped weight and the config fields that differ (the original DMN code skipped such
    weights silently, so a wrong checkpoint "loaded" and then gave nonsense);
  * a truncated or corrupted file is an error naming the file.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = "dmn_lib.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or that does not belong to the model at hand. Notebook 07, §8."""


@dataclass
class TrainState:
    """Where a run stands: a checkpoint's "progress". With the weights, the optimizer's and the RNGs'
    states, it is all that resuming exactly needs. Defined in notebook 07, §8."""

    step: int = 0  # optimizer steps done, over both stages
    stage: str | None = None  # the stage the saved optimizer belongs to ("low" or "high")
    total_steps: int = 0
    steps_low: int = 0  # stage 1's length: steps 0..steps_low-1 are stage "low"
    epoch: int = 0  # step = epoch * steps_per_epoch + batch_in_epoch
    batch_in_epoch: int = 0
    elapsed: float = 0.0  # wall-clock seconds of training, summed over resumed calls
    stage_started: float = 0.0  # `elapsed` when the current stage began (time-based schedules)
    since_eval: list = field(default_factory=list)  # training losses since the last validation
    world_size: int = 1  # torchrun processes (the data order depends on it)
    threshold: float | None = None  # the probability threshold picked on val at the last validation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> TrainState:
        """The state of a checkpoint or `load_model` record (older files kept the threshold in `extra`)."""
        progress = dict(checkpoint.get("progress") or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if set(progress) - known:
            raise CheckpointError(f"progress keys {sorted(set(progress) - known)} are unknown to this dmn_lib")
        progress.setdefault("threshold", (checkpoint.get("extra") or {}).get("threshold"))
        return cls(**progress)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save to `path` so that readers see either the old file or the complete new one.

    We write a temporary file in the same folder (os.replace is only atomic within one file
    system), flush it to disk with fsync, then rename it over the target.
    Notebook 12, §5 (used in notebook 07, §8).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; use the usual mode
        os.replace(tmp, path)
    except BaseException:  # also on KeyboardInterrupt: never leave temp files behind
        with _suppress():
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        with _suppress():
            dir_fd = os.open(path.parent, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def library_versions() -> dict:
    """Versions of what produced a checkpoint (stored for provenance, shown by `load_model`). Notebook 07, §8."""
    import timm

    from dmn_lib import __version__ as dmn_version

    try:
        from importlib.metadata import version

        sru_version = version("sru")
    except Exception:  # not installed: only LSTM / from-scratch models
        sru_version = None
    return {
        "dmn_lib": dmn_version,
        "torch": str(torch.__version__),  # a TorchVersion object, which weights_only refuses
        "timm": timm.__version__,
        "sru": sru_version,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    vocab,
    *,
    data=None,
    train_config=None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler=None,
    progress: TrainState | None = None,
    rng: dict | None = None,
    history: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint of `model` (a DMN, or a DDP-wrapped DMN) atomically to `path`.

    data: the run's DataSpec, train_config its TrainConfig (with the model's config: the run's spec).
    Notebook 07, §8."""
    model = unwrap(model)
    checkpoint = {
        "format": FORMAT,
        "model": model.state_dict(),
        "config": model.config.to_dict(),
        "data": data.to_dict() if data is not None else None,
        "vocab": vocab.to_dict(),
        "train_config": train_config.to_dict() if train_config is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": (progress or TrainState()).to_dict(),
        "rng": rng,
        "history": history,
        "extra": dict(extra or {}),
        "versions": library_versions(),
    }
    # The state_dict is tensors already (and keeps its version _metadata); check all the rest.
    checkpoint = {k: (v if k == "model" else to_plain(v, k)) for k, v in checkpoint.items()}
    return atomic_torch_save(checkpoint, path)


def to_plain(value, where: str = "checkpoint"):
    """Tensors and plain containers only, so `torch.load(weights_only=True)` can read the file:
    numpy numbers become Python numbers, numpy arrays tensors, paths and str subclasses str. Notebook 07, §8."""
    if value is None or torch.is_tensor(value) or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):  # e.g. torch.__version__ is a TorchVersion
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {to_plain(k, where): to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, int):  # subclasses such as IntEnum (bool is never subclassed)
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise TypeError(
        f"{where} holds a {type(value).__module__}.{type(value).__name__}, which "
        "torch.load(weights_only=True) cannot read; store plain numbers, strings, lists, dicts or tensors"
    )


def export_model(checkpoint_path: str | Path, out_path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """A small file for sharing results: weights cast to `dtype`, no optimizer or RNG state.

    `load_model` reads it like any checkpoint (weights are cast back to the model's float32).
    Notebook 07, §8.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint["model"] = {
        k: (v.to(dtype) if v.is_floating_point() else v) for k, v in checkpoint["model"].items()
    }
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        checkpoint[key] = None
    return atomic_torch_save(checkpoint, out_path)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint with `weights_only=True`; clear errors for missing or damaged files. Notebook 07, §8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle / zip errors for truncated files, UnpicklingError for code
        raise CheckpointError(
            f"Could not read checkpoint {path}: {type(err).__name__}: {_reason(err)}. The file is "
            "truncated, corrupted or not a DMN checkpoint; use another checkpoint or retrain."
        ) from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a DMN checkpoint (format {found!r}, expected {FORMAT!r}). A bare state_dict "
            "can be loaded with model.load_state_dict(torch.load(path, weights_only=True))."
        )
    return checkpoint


def _reason(err: Exception) -> str:
    """The informative line of torch.load's error (its weights_only errors are a page long)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line
    return lines[0] if lines else "no details"


def config_differences(saved: dict, current: dict) -> list[str]:
    """'field: saved -> current' for every DMNConfig field that differs. Notebook 07, §8."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if _plain(a) != _plain(b):
            out.append(f"{key}: checkpoint {a!r} vs model {b!r}")
    return out


def _plain(value):
    """Tuples and lists compare equal (a config saved as a list reads back as a list)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def load_model_state(model: nn.Module, checkpoint: dict, source: str = "checkpoint") -> None:
    """Load `checkpoint["model"]` into `model` strictly, or raise a CheckpointError that names
    every missing, unexpected and mis-shaped key and the config fields that differ. Notebook 07, §8."""
    model = unwrap(model)
    state = checkpoint["model"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit this model:"]
        diffs = config_differences(checkpoint.get("config", {}), model.config.to_dict())
        if diffs:
            lines.append("  config fields that differ: " + "; ".join(diffs))
        for title, items in (
            ("missing from the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + _listing(items))
        lines.append(
            "  Build the model from the checkpoint's own config: dmn_lib.checkpoint.load_model(path) "
            "or DMN(DMNConfig.from_dict(checkpoint['config']))."
        )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def load_model(path: str | Path, map_location="cpu"):
    """Rebuild the model a checkpoint was saved from: -> (model in eval mode, vocab, record). Notebook 08, §4.

    `record` is the checkpoint without the weights and optimizer state: config, data, train_config,
    progress, history, extra and versions; `saved_spec(record)` and `TrainState.from_checkpoint(record)`
    read them (e.g. `.threshold`, picked on val).
    """
    from dmn_lib.config import DMNConfig
    from dmn_lib.data.vocab import Vocabulary
    from dmn_lib.models.dmn import DMN

    checkpoint = load_checkpoint(path, map_location=map_location)
    try:
        config = DMNConfig.from_dict(checkpoint["config"])
        vocab = Vocabulary.from_dict(checkpoint["vocab"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its config or vocabulary cannot be read by this dmn_lib: {err}") from err
    # The weights come from the checkpoint: do not read the backbone's ImageNet file again (it may
    # not exist on this machine); the config keeps the record of where they came from.
    model = DMN(config.replace(pretrained=False, pretrained_file=None))
    model.config = config
    load_model_state(model, checkpoint, source=str(path))
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
    record = {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng")}
    record["path"] = str(path)
    return model, vocab, record


def saved_data(checkpoint: dict):
    """The DataSpec a checkpoint (or `load_model` record) was trained on, or None if it has no record of it.
    Notebook 08, §4."""
    from dmn_lib.spec import DataSpec

    data = checkpoint.get("data") or (checkpoint.get("extra") or {}).get("data")  # before 0.2: extra["data"]
    return DataSpec.from_dict(data) if data else None


def saved_spec(checkpoint: dict):
    """The RunSpec a checkpoint was trained with: its model config, data and train config (notebook 08, §4).
    Parts the file does not record are the defaults."""
    from dmn_lib.config import DMNConfig
    from dmn_lib.spec import DataSpec, RunSpec, TrainConfig

    train = checkpoint.get("train_config")
    return RunSpec(model=DMNConfig.from_dict(checkpoint["config"]), data=saved_data(checkpoint) or DataSpec(),
                   train=TrainConfig.from_dict(train) if train else TrainConfig())


def unwrap(model: nn.Module) -> nn.Module:
    """The DMN inside a DistributedDataParallel (or torch.compile) wrapper. Notebook 07, §8."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------
# Random number generator states (for resuming a run exactly)
# ---------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """Every global RNG training may draw from, as tensors and plain values. Notebook 07, §8."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` saved (CUDA states only on as many GPUs). Notebook 07, §8."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value
