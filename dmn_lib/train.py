"""Training DMN in two stages, as in the paper's §4.3. Defined in notebook 07, §7 (checkpoints: §8).

    §4.3: "We train our method in two stages: at low resolution (i.e., without using the UM)
    and then finetune the UM to obtain high resolution segmentation maps. Training is done with
    Adam [...], a scheduler that waits 2 epochs for loss stagnation to reduce the learning rate
    by a factor of 10 [...]"

    from dmn_lib.spec import spec
    from dmn_lib.train import train
    history = train(model, train_set, vocab, spec("course").train, val_set=val_set)

`Trainer.run` is that paragraph as a loop: for every step, the stage's batch, loss (dmn_lib.losses),
backward pass and Adam update; now and then a validation, which steps the plateau scheduler, and a
checkpoint. The rest a real trainer needs is one call away:
  * dmn_lib.runtime: the device, mixed precision (bf16, or fp16 with a GradScaler), channels_last,
    torchrun/DDP (one data shard per process, rank 0 writes), the resumable data order;
  * dmn_lib.checkpoint: atomic checkpoints with everything needed to resume EXACTLY (model,
    optimizer, scheduler, `TrainState`, RNG states);
  * dmn_lib.inference.evaluate: the validation metrics (notebook 08).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dmn_lib import checkpoint as ckpt
from dmn_lib.checkpoint import TrainState
from dmn_lib.data.vocab import Vocabulary
from dmn_lib.inference import evaluate
from dmn_lib.losses import stage_loss, stage_outputs
from dmn_lib.runtime import ResumableSampler, Runtime, ShardedBatches, make_loader, seed_everything
from dmn_lib.spec import DataSpec, TrainConfig

__all__ = ["CHECKPOINT_NAME", "HISTORY_NAME", "TrainConfig", "Trainer", "train", "make_optimizer", "write_json"]

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"


def make_optimizer(model: nn.Module, config: TrainConfig, stage: str, stage_steps: int = 0,
                   clock: Callable[[], float] | None = None):
    """Adam and the learning-rate schedule of one stage (§4.3; notebook 07, §5): the one place a run's
    optimiser and schedule are made. Stage 2 may use its own rate, `lr_high`; the Visual Module may run at
    a fraction of it (`backbone_lr_scale`). The paper's schedule is the plateau scheduler, stepped at every
    validation; the others are functions of the stage's progress, stepped after every update: the step
    within the stage (`stage_steps` long), or `clock()`, the fraction of a time budget spent."""
    lr = config.lr_high if (stage == "high" and config.lr_high) else config.lr
    optimizer = torch.optim.Adam(parameter_groups(model, lr, config.backbone_lr_scale), lr=lr,
                                 weight_decay=config.weight_decay)
    if config.lr_schedule == "plateau":
        mode = "min" if config.plateau_metric == "val_loss" else "max"
        return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=config.plateau_factor, patience=config.plateau_patience)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, stage_steps, clock() if clock else None))


def parameter_groups(model: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict]:
    """Adam's parameter groups: the Visual Module's at lr x backbone_lr_scale, the rest at lr."""
    model = ckpt.unwrap(model)
    visual = getattr(model, "visual", None)
    if visual is None or backbone_lr_scale == 1.0:
        return [{"params": list(model.parameters()), "lr": lr}]
    ids = {id(p) for p in visual.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr},
            {"params": list(visual.parameters()), "lr": lr * backbone_lr_scale}]


def lr_factor(config: TrainConfig, step: int, stage_steps: int, fraction: float | None = None) -> float:
    """The learning rate at `step` of a stage of `stage_steps` (or `fraction` of its time budget spent),
    as a fraction of the stage's rate."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    progress = min(1.0, step / max(stage_steps, 1) if fraction is None else fraction)
    if config.lr_schedule == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))
    if config.lr_schedule == "wsd":  # warm-up, stable, decay: linear to 0 over the last decay_fraction
        return warmup * min(1.0, (1 - progress) / config.decay_fraction)
    return warmup


class Trainer:
    """Holds what one training run needs; `run()` does the two stages. Use `train(...)` for short.

    Steps are counted over the whole run: steps 0..steps_low-1 are stage "low", the rest "high".
    The data is one endless stream of epochs whose order depends only on (seed, epoch), so the
    batch of every step is known from the step number alone — that is what makes resuming exact.
    `data` (the DataSpec the datasets were made from) is recorded in the checkpoints.
    Notebook 07, §7.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, vocab: Vocabulary, config: TrainConfig,
                 val_set: Dataset | None = None, *, data: DataSpec | None = None, resume: bool | str | Path = False,
                 extra: dict | None = None, callbacks: Iterable[Callable[[Trainer], None]] = ()):
        if getattr(model, "config", None) is not None and model.config.vocab_size != len(vocab):
            raise ValueError(f"model.config.vocab_size={model.config.vocab_size} but the vocabulary has {len(vocab)} "
                             "words: build the model with DMNConfig(..., vocab_size=len(vocab))")
        if config.plateau_metric == "val_iou" and val_set is None:
            raise ValueError("plateau_metric='val_iou' needs a val_set (or use plateau_metric='val_loss')")
        self.config, self.vocab, self.data = config, vocab, data
        self.extra, self.callbacks = dict(extra or {}), list(callbacks)
        self.runtime = Runtime.start(config.device, config.amp, config.channels_last)
        self.model, self.ddp_model = self.runtime.prepare(model)
        self._make_loaders(train_set, val_set)
        self.steps_low = config.steps_low or math.ceil(config.epochs_low * self.steps_per_epoch)
        self.steps_high = config.steps_high or math.ceil(config.epochs_high * self.steps_per_epoch)
        self.total_steps = self.steps_low + self.steps_high
        if self.total_steps == 0:
            raise ValueError("Nothing to train: set steps_low/steps_high or epochs_low/epochs_high")
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.state = TrainState(total_steps=self.total_steps, steps_low=self.steps_low,
                                world_size=self.runtime.dist.world_size)
        self.optimizer = self.scheduler = None  # made when a stage starts
        self.scaler = self.runtime.grad_scaler()
        self.history: dict = {"train": [], "val": []}
        self._resume_from: dict | None = None
        # Training draws random numbers only from these (and the sampler's own generator); seeding
        # them here makes a run repeatable. Resuming replaces them by the checkpoint's states.
        seed_everything(config.seed + self.runtime.dist.rank)
        if resume:
            self._resume(resume)

    def _make_loaders(self, train_set: Dataset, val_set: Dataset | None) -> None:
        """Every process sees its own shard of the training data, in batches of one size (drop_last)."""
        c, dist, pin = self.config, self.runtime.dist, self.runtime.pin_memory()
        self.sampler = ResumableSampler(train_set, dist.world_size, dist.rank, seed=c.seed)
        self.train_loader = make_loader(train_set, self.vocab, c.batch_size, sampler=self.sampler,
                                        num_workers=c.num_workers, drop_last=True, pin_memory=pin)
        self.steps_per_epoch = self.sampler.num_samples // c.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"The training set ({len(train_set)} samples over {dist.world_size} process(es)) is "
                             f"smaller than one batch ({c.batch_size}); use a smaller batch_size or more data")
        # Validation: every process its share of the batches. In the main process (num_workers=0):
        # worker processes forked while the training loader's workers are alive inherit that loader's
        # iterator, whose cleanup then fails in them at every validation. Validation sets are small.
        self.val_loader = None if val_set is None else make_loader(
            val_set, self.vocab, pin_memory=pin,
            batch_sampler=ShardedBatches(len(val_set), c.batch_size, dist.rank, dist.world_size, c.eval_batches))

    # --- the names a caller reads ------------------------------------------------------------------
    step = property(lambda self: self.state.step)
    device = property(lambda self: self.runtime.device)
    dist = property(lambda self: self.runtime.dist)
    is_main = property(lambda self: self.runtime.is_main)
    threshold = property(lambda self: self.state.threshold, doc="the best threshold on val, at the last validation")

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir else None

    def stage_of(self, step: int) -> str:
        return "low" if step < self.steps_low else "high"

    def batches(self):
        """The endless stream of batches, from the current step on."""
        epoch, batch = divmod(self.state.step, self.steps_per_epoch)
        while True:
            self.sampler.set_position(epoch, batch * self.config.batch_size)
            self.train_loader.generator.manual_seed(self.config.seed + epoch)  # worker seeds, if any
            yield from self.train_loader
            epoch, batch = epoch + 1, 0

    # --- §4.3 ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from the current step to the end of stage 2; returns the history (also in out_dir)."""
        self._start_time = time.perf_counter() - self.state.elapsed
        call_start = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.config.progress and self.is_main))
        stream = self.batches()
        self.model.train()
        while self.step < self.total_steps and not self._budget_spent():
            stage = self.stage_of(self.step)
            if stage != self.state.stage:
                self.start_stage(stage)  # a fresh Adam and scheduler: stage 2 "finetunes"
            row = self.train_step(next(stream), stage)
            self._log_step(row, stage, bar)
            end_of_stage = self.step in (self.steps_low, self.total_steps)
            out_of_time = self._out_of_time(call_start)
            validate = self.step % (self.config.eval_every or self.steps_per_epoch) == 0 or end_of_stage or out_of_time
            if validate:
                self.validate(stage)
            save = (self.step % self.config.ckpt_every == 0) if self.config.ckpt_every else validate
            if save or end_of_stage or out_of_time:
                self.save()
            for callback in self.callbacks:
                callback(self)
            if out_of_time:
                self._say(f"Stopped at step {self.step}/{self.total_steps}: the schedule's "
                          f"{self.config.lr_schedule_minutes:g} minutes are over" if self._budget_spent() else
                          f"Stopped at step {self.step}/{self.total_steps}: max_minutes="
                          f"{self.config.max_minutes:g} reached (resume=True goes on)")
                break
        bar.close()
        self.runtime.barrier()  # nobody leaves before rank 0 has written
        return self.history

    def start_stage(self, stage: str) -> None:
        """The stage's optimizer and scheduler: new ones, or the saved ones when resuming inside that stage."""
        stage_steps = self.steps_low if stage == "low" else self.steps_high
        clock = self._time_spent if (stage == "high" and self.config.lr_schedule_minutes) else None
        self.optimizer, self.scheduler = make_optimizer(self.model, self.config, stage, stage_steps, clock)
        saved, self._resume_from = self._resume_from, None
        if saved is None or saved["progress"].get("stage") != stage:
            self.state.stage_started = self.state.elapsed
        if saved is not None and saved["progress"].get("stage") == stage:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
        self.state.stage = stage

    def train_step(self, batch: dict, stage: str) -> dict:
        """One optimizer step: forward, loss, backward, (clip), update."""
        batch = self.runtime.to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.autocast():
            logits, low = stage_outputs(self.ddp_model, batch, stage)
            loss, parts = stage_loss(logits, low, batch["masks"], self.config)
        row = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        if not math.isfinite(row["loss"]):  # stop before a NaN reaches the weights
            raise FloatingPointError(f"The loss became {row['loss']} at step {self.step}: lower the learning rate "
                                     f"(lr={self.config.lr}) or set grad_clip (e.g. 1.0)")
        self.scaler.scale(loss).backward()
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        row["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        if self.config.lr_schedule != "plateau":  # a function of the step: stepped after every update
            self.scheduler.step()
        return row

    def validate(self, stage: str) -> dict:
        """Validation loss and metrics (every process evaluates its share; all get the same numbers and
        step their schedulers alike); without a val set, the mean training loss since the last validation."""
        if self.val_loader is not None:
            self.runtime.sync_buffers(self.model)
            result = evaluate(self.model, self.val_loader, stage=stage, loss_config=self.config, runtime=self.runtime,
                              progress=self.config.progress and self.is_main)
            m = result["metrics"]
            row = {"loss": result["loss"], "cum_iou": m["cum_iou"], "mean_iou": m["mean_iou"], "Pr@0.5": m["Pr@0.5"],
                   "threshold": result["threshold"]}
            self.state.threshold = row["threshold"]
        else:  # rank 0's training losses, so that every process steps its scheduler alike
            losses = self.state.since_eval
            row = self.runtime.broadcast({"loss": float(np.mean(losses)) if losses else None})
        self.state.since_eval = []
        watched = row.get("cum_iou") if self.config.plateau_metric == "val_iou" else row["loss"]
        if watched is not None and self.config.lr_schedule == "plateau":
            self.scheduler.step(watched)
        record = {"step": self.step, "stage": stage, "epoch": self.step / self.steps_per_epoch,
                  **{f"val_{k}": v for k, v in row.items()}, "lr": self.optimizer.param_groups[0]["lr"],
                  "time": round(time.perf_counter() - self._start_time, 3)}
        self.history["val"].append(record)
        self.model.train()
        return record

    def _log_step(self, row: dict, stage: str, bar) -> None:
        self.state.step += 1
        self.state.elapsed = time.perf_counter() - self._start_time
        row = {"step": self.step, "stage": stage, **row,
               "time": round(self.state.elapsed, 3)}
        self.history["train"].append(row)
        self.state.since_eval.append(row["loss"])
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}")

    def _time_spent(self) -> float:
        """The fraction of stage 2's time (lr_schedule_minutes in all, less what stage 1 took) spent so far."""
        budget = 60 * self.config.lr_schedule_minutes - self.state.stage_started
        return (self.state.elapsed - self.state.stage_started) / max(budget, 1e-9)

    def _out_of_time(self, call_start: float) -> bool:
        """Past max_minutes in this call, or past the whole run's lr_schedule_minutes (its schedule is over)?
        Every process must agree, or DDP would hang."""
        call = bool(self.config.max_minutes) and time.perf_counter() - call_start > 60 * self.config.max_minutes
        return (bool(self.config.max_minutes) or bool(self.config.lr_schedule_minutes)) and self.runtime.any(
            call or self._budget_spent())

    def _budget_spent(self) -> bool:
        """A run scheduled by the clock is over when its lr_schedule_minutes are (its rate is 0 then)."""
        return bool(self.config.lr_schedule_minutes) and self.state.elapsed >= 60 * self.config.lr_schedule_minutes

    def _say(self, message: str) -> None:
        if self.is_main and self.config.progress:
            tqdm.write(message)

    # --- checkpoints -----------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint + history.json (rank 0 only; atomic, see checkpoint.py)."""
        if not self.is_main or self.out_dir is None:
            return
        self.state.epoch, self.state.batch_in_epoch = divmod(self.step, self.steps_per_epoch)
        ckpt.save_checkpoint(
            self.checkpoint_path, self.model, self.vocab, data=self.data, train_config=self.config,
            optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler if self.scaler.is_enabled() else None, progress=self.state,
            rng=ckpt.get_rng_state(), history=self.history, extra=self.extra)
        write_json(self.out_dir / HISTORY_NAME, self.history)

    def _resume(self, resume: bool | str | Path) -> None:
        """Continue from a checkpoint (resume=True: out_dir's, if there is one)."""
        path = Path(resume) if isinstance(resume, (str, Path)) else self.checkpoint_path
        if path is None or not path.is_file():
            if not isinstance(resume, bool):
                raise FileNotFoundError(f"Checkpoint to resume from not found: {path}")
            return self._say(f"No checkpoint at {path}: starting from step 0")
        saved = ckpt.load_checkpoint(path, map_location="cpu")
        ckpt.load_model_state(self.model, saved, source=str(path))
        state = TrainState.from_checkpoint(saved)
        # These decide which batch and which stage every step gets; steps_high may grow (train longer).
        was = {**(saved.get("train_config") or {}), "steps_low": state.steps_low, "world_size": state.world_size}
        now = {"seed": self.config.seed, "batch_size": self.config.batch_size, "steps_low": self.steps_low,
               "world_size": self.runtime.dist.world_size}
        for key, value in now.items():
            if was.get(key, value) != value:
                raise ckpt.CheckpointError(
                    f"Cannot resume {path}: it was trained with {key}={was[key]!r}, this run has {key}={value!r}, "
                    "so the data order or stages would not match. Use the same value, or a new out_dir to start "
                    "afresh.")
        # The optimizer and scheduler are restored when their stage starts (state.stage None: not yet).
        self.state = dataclasses.replace(state, stage=None, total_steps=self.total_steps)
        self.history = saved.get("history") or {"train": [], "val": []}
        if saved.get("rng") is not None:
            ckpt.set_rng_state(saved["rng"])
        self._resume_from = saved
        self._say(f"Resuming from {path} at step {self.step} of {self.total_steps}")


def train(model: nn.Module, train_set: Dataset, vocab: Vocabulary, config: TrainConfig | None = None,
          val_set: Dataset | None = None, *, data: DataSpec | None = None, resume: bool | str | Path = False,
          extra: dict | None = None, callbacks: Iterable[Callable[[Trainer], None]] = ()) -> dict:
    """Train `model` in two stages (§4.3; notebook 07, §7); returns the history (also out_dir/history.json):

        {"train": [{"step", "stage", "loss", "loss_low", "loss_high", "lr", "time"}, ...],   one per step
         "val":   [{"step", "stage", "epoch", "val_loss", "val_cum_iou", "val_mean_iou", "val_Pr@0.5",
                    "val_threshold", "lr", "time"}, ...]}                                  one per validation
    (pandas.DataFrame(history["train"]) makes a table; `time` is wall-clock seconds of training.)

    resume=True continues from `config.out_dir/checkpoint.pt` if it exists (a path: from that file).
    The result of an interrupted-and-resumed run is identical to an uninterrupted one (same device,
    one process). `callbacks` are called with the Trainer after every step (e.g. for live plots).
    `data`, the DataSpec the datasets were made from, is recorded in the checkpoint.
    """
    trainer = Trainer(model, train_set, vocab, config or TrainConfig(), val_set, data=data,
                      resume=resume, extra=extra, callbacks=callbacks)
    return trainer.run()


def write_json(path: Path, data) -> None:
    """JSON written atomically (a temp file renamed over the target). Notebook 07, §8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


# Names that lived here before dmn_lib 0.2 (notebooks and scripts import them from their new homes).
_MOVED = {"low_res_target": "dmn_lib.losses", "evaluate": "dmn_lib.inference", "make_loader": "dmn_lib.runtime",
          "ResumableSampler": "dmn_lib.runtime", "resolve_device": "dmn_lib.runtime", "to_device": "dmn_lib.runtime",
          "amp_dtype": "dmn_lib.runtime", "autocast": "dmn_lib.runtime", "seed_everything": "dmn_lib.runtime",
          "distributed_from_env": "dmn_lib.runtime", "init_distributed": "dmn_lib.runtime",
          "DistInfo": "dmn_lib.runtime", "build_vocabulary": "dmn_lib.data.datasets",
          "dataset_texts": "dmn_lib.data.datasets"}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"dmn_lib.train.{name} is now {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'dmn_lib.train' has no attribute {name!r}")
