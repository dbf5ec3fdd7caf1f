"""Training DMN in two stages, as in the paper's §4.3 — taught in notebook 07 (evaluation: notebook 08).

    §4.3: "We train our method in two stages: at low resolution (i.e., without using the UM)
    and then finetune the UM to obtain high resolution segmentation maps. Training is done with
    Adam [...], a scheduler that waits 2 epochs for loss stagnation to reduce the learning rate
    by a factor of 10 [...]"

    from dmn_lib.train import TrainConfig, train
    history = train(model, train_set, vocab, TrainConfig(steps_low=300, steps_high=900), val_set=val_set)

Stage 1, "low": the Visual, Language and Synthesis Modules; the Synthesis Module's output R_N goes
  through a 1x1 head to a low-resolution logit map (stride 2^N) and is compared with the ground-truth
  mask averaged over each cell (`low_res_target`). The Upsampling Module is not run.
Stage 2, "high": the whole network; binary cross-entropy on the full-resolution logits, PLUS
  (unless `low_res_weight=0`) the stage-1 loss on the Synthesis Module's output.

Why keep the low-res loss in stage 2? Measured on a prototype (2 CPU cores, 128 px SynthRef): with the
high-res loss alone the model learned "objectness" but picked the referred object only at chance for
10 minutes; with the low-res loss beside it and positive pixels weighted x3 (`pos_weight`), it reached
0.20 cumulative IoU at 2 minutes and 0.39 at 10. The low-res loss speaks directly to the module that
reads the query, instead of through the whole Upsampling Module. `TrainConfig.preset("paper")` gives
the paper's settings (lr 1e-5, batch 1, no extra loss) for comparison.

Everything else a real trainer needs is here too, each piece small:
  * `ReduceLROnPlateau` on the validation loss (or IoU), checked at every validation;
  * checkpoints written atomically with everything needed to resume EXACTLY (model, optimizer,
    scheduler, step, RNG states; the data order is a function of (seed, step)) — see checkpoint.py;
  * tqdm progress bars; a history of losses, metrics, learning rate and wall time, saved as JSON;
  * on a GPU: mixed precision (bf16, or fp16 with a GradScaler) and channels_last;
  * under `torchrun`: DistributedDataParallel, one data shard per process, rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from dmn_lib import checkpoint as ckpt
from dmn_lib.data.vocab import Collate, Vocabulary
from dmn_lib.metrics import DEFAULT_THRESHOLDS, ThresholdSweep

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"


# =============================================================================================
# The training configuration: data, saved in every checkpoint
# =============================================================================================
@dataclass
class TrainConfig:
    # --- how long: each stage in optimizer steps, or (if steps are 0) in epochs ------------------
    steps_low: int = 0  # stage 1 (§4.3): low resolution, no Upsampling Module
    steps_high: int = 0  # stage 2: the Upsampling Module on
    epochs_low: float = 0.0  # used when steps_low == 0
    epochs_high: float = 0.0  # used when steps_high == 0
    batch_size: int = 16  # per process; the paper used 1 (and BatchNorm in train mode at test)
    max_minutes: float = 0.0  # wall-clock budget of one call (0 = none): stops early, validates,
    #                           saves; call again with resume=True to go on

    # --- optimisation (§4.3: Adam, lr 1e-5, plateau scheduler: patience 2 epochs, factor 10) ------
    lr: float = 1e-3  # course default; the paper's 1e-5 with batch 1 is far too slow on a CPU
    lr_high: float | None = None  # stage 2's learning rate ("finetune the UM"); None = lr
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    plateau_metric: str = "val_loss"  # "val_loss" (the paper: "loss stagnation") or "val_iou"
    plateau_patience: int = 2  # validations without improvement before lr *= plateau_factor
    plateau_factor: float = 0.1

    # --- the loss -------------------------------------------------------------------------------
    pos_weight: float = 3.0  # weight of foreground pixels in the BCE (targets are small)
    low_res_weight: float = 1.0  # weight of the low-res loss kept in stage 2 (0 = the paper)
    low_res_target: str = "soft"  # "soft": fraction of each cell inside the mask; "hard": > 0.5

    # --- validation and checkpoints (in optimizer steps) -----------------------------------------
    eval_every: int = 0  # 0 = once per epoch (so plateau_patience counts epochs, as in the paper)
    eval_batches: int = 0  # batches of the val set per validation; 0 = all of it
    ckpt_every: int = 0  # 0 = at every validation; checkpoints are also written at each stage's end
    out_dir: str | None = "runs/dmn"  # None: keep everything in memory (no files)

    # --- system ---------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # "auto": CUDA if present, else CPU; or "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # mixed precision on CUDA (never on CPU)
    channels_last: bool = True  # memory layout that suits tensor cores (CUDA only)
    num_workers: int = 0  # DataLoader worker processes
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        problems = []
        if self.plateau_metric not in ("val_loss", "val_iou"):
            problems.append(f"plateau_metric={self.plateau_metric!r} is not 'val_loss' or 'val_iou'")
        if self.low_res_target not in ("soft", "hard"):
            problems.append(f"low_res_target={self.low_res_target!r} is not 'soft' or 'hard'")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be at least 1")
        for name in ("steps_low", "steps_high", "epochs_low", "epochs_high", "eval_every", "ckpt_every",
                     "eval_batches", "num_workers", "max_minutes", "grad_clip", "low_res_weight", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must not be negative")
        if self.pos_weight <= 0 or self.lr <= 0 or (self.lr_high is not None and self.lr_high <= 0):
            problems.append("pos_weight, lr and lr_high must be positive")
        if problems:
            raise ValueError("Invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        """"course" (the defaults: what trains in minutes on a CPU) or "paper" (§4.3 as written)."""
        presets = {
            "course": {},
            # §4.3: Adam 1e-5, batch 1, patience 2 epochs, factor 10, plain BCE, no extra loss.
            "paper": dict(lr=1e-5, batch_size=1, pos_weight=1.0, low_res_weight=0.0, plateau_patience=2),
        }
        if name not in presets:
            raise ValueError(f"Unknown TrainConfig preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


# =============================================================================================
# The loss of each stage (§4.3)
# =============================================================================================
def low_res_target(masks: torch.Tensor, size: tuple[int, int], kind: str = "soft") -> torch.Tensor:
    """The ground truth at the Synthesis Module's resolution.

    Area averaging gives each low-res cell the fraction of its pixels inside the mask. "soft" uses
    that fraction as the BCE target (a cell half covered by a thin object is not called "empty");
    "hard" thresholds it at 0.5.
    """
    fraction = F.adaptive_avg_pool2d(masks.float(), size)
    return fraction if kind == "soft" else (fraction > 0.5).float()


def stage_outputs(model: nn.Module, batch: dict, stage: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Forward one batch: (full-resolution logits or None in stage "low", low-res logits)."""
    if stage == "low":  # stage 1: the Upsampling Module is not run at all
        return None, model(batch["images"], batch["tokens"], batch["lengths"], stage="low")
    return model(batch["images"], batch["tokens"], batch["lengths"], return_low_res=True)


def stage_loss(logits: torch.Tensor | None, low: torch.Tensor, masks: torch.Tensor,
               config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """The loss of each stage; returns (loss, {"loss_low": ..., "loss_high": ...} as 0-d tensors).

    stage "low"  (logits is None):  BCE(low-res logits, mask averaged to the low-res grid)
    stage "high":                   BCE(full-res logits, mask) + low_res_weight * the stage-"low" loss
    """
    pos_weight = torch.tensor(config.pos_weight, device=masks.device)

    def bce(x, target):  # in float32 even under autocast
        return F.binary_cross_entropy_with_logits(x.float(), target, pos_weight=pos_weight)

    loss_low = bce(low, low_res_target(masks, low.shape[-2:], config.low_res_target))
    if logits is None:
        return loss_low, {"loss_low": loss_low.detach()}
    loss_high = bce(logits, masks)
    loss = loss_high + config.low_res_weight * loss_low if config.low_res_weight else loss_high
    return loss, {"loss_low": loss_low.detach(), "loss_high": loss_high.detach()}


# =============================================================================================
# Data: a reproducible, resumable order
# =============================================================================================
class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler, which can also start in the middle of an epoch.

    DistributedSampler shuffles with a torch.Generator seeded by (seed + epoch) and gives process
    `rank` every `num_replicas`-th index — so the data order is a pure function of (seed, epoch),
    with no hidden generator state to save. Starting `start` samples into the epoch is what resuming
    from a checkpoint taken mid-epoch needs. Without torchrun it is used with one replica.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def make_loader(dataset: Dataset, vocab: Vocabulary, batch_size: int, *, sampler=None,
                num_workers: int = 0, drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """A DataLoader with DMN's Collate. It gets its own torch.Generator: otherwise each new iterator
    draws its worker seed from the global RNG and resuming would change every later random number."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
        collate_fn=Collate(vocab), drop_last=drop_last, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0), persistent_workers=False,
    )


def dataset_texts(dataset: Dataset) -> Iterable[str]:
    """Every query of a dataset, cheaply when it can (SynthRef.text(i), ReferDataset.texts)."""
    if hasattr(dataset, "texts"):
        return list(dataset.texts)
    if hasattr(dataset, "text"):
        return [dataset.text(i) for i in range(len(dataset))]
    return [dataset[i]["text"] for i in range(len(dataset))]  # loads every image: slow


def build_vocabulary(dataset: Dataset, min_count: int = 1) -> Vocabulary:
    """The vocabulary of a training split (the model's vocab_size is len(vocab))."""
    return Vocabulary.build(dataset_texts(dataset), min_count=min_count)


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out = dict(batch)
    non_blocking = device.type == "cuda"
    for key in ("images", "masks", "tokens", "lengths"):
        out[key] = batch[key].to(device, non_blocking=non_blocking)
    if channels_last:
        out["images"] = out["images"].contiguous(memory_format=torch.channels_last)
    return out


# =============================================================================================
# Devices, mixed precision and torchrun
# =============================================================================================
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> DistInfo:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec!r} was asked for, but this machine has no CUDA GPU; use 'auto' or 'cpu'")
    return device


def init_distributed(device_spec: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when started by torchrun (nccl on GPUs, gloo on CPUs)."""
    info = distributed_from_env()
    device = resolve_device(device_spec, info.local_rank)
    if info.enabled and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 where the GPU supports it (no loss scaling needed), else fp16; None = full precision."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# =============================================================================================
# Evaluation (notebook 08): probabilities -> ThresholdSweep -> cumulative IoU, Pr@X, threshold
# =============================================================================================
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    *,
    threshold: float | None = None,
    stage: str = "high",
    loss_config: TrainConfig | None = None,
    device: torch.device | str | None = None,
    max_batches: int = 0,
    progress: bool = False,
    amp: bool = True,
) -> dict:
    """Run `model` over `loader` and measure it at every threshold.

    Returns {"metrics": summary at `threshold` (or, if None, at the best threshold on THIS set),
             "threshold": that threshold, "best_threshold": the best on this set,
             "loss": mean stage loss (if `loss_config` is given), "sweep": the ThresholdSweep}.
    Pick the threshold on val (threshold=None), then evaluate test with threshold=<val's best>.
    stage="low" scores the Synthesis Module's map upsampled bilinearly (training stage 1).
    """
    model_ = ckpt.unwrap(model)
    device = torch.device(device) if device is not None else next(model_.parameters()).device
    dtype = amp_dtype(device, amp)
    thresholds = sorted(set(float(t) for t in thresholds) | ({float(threshold)} if threshold is not None else set()))
    sweep = ThresholdSweep(thresholds)
    was_training = model_.training
    model_.eval()
    losses = []
    total = min(len(loader), max_batches) if max_batches else len(loader)
    bar = tqdm(loader, total=total, desc="evaluate", leave=False, disable=not progress)
    for i, batch in enumerate(bar):
        if max_batches and i >= max_batches:
            break
        batch = to_device(batch, device)
        with autocast(device, dtype):
            logits, low = stage_outputs(model_, batch, stage)
            if loss_config is not None:
                losses.append(stage_loss(logits, low, batch["masks"], loss_config)[0].item())
        if logits is None:  # stage 1: the low-res map, upsampled bilinearly to the mask's size
            logits = F.interpolate(low.float(), size=batch["masks"].shape[-2:], mode="bilinear", align_corners=False)
        sweep.update(torch.sigmoid(logits.float()), batch["masks"] > 0.5, meta=batch["meta"])
    bar.close()
    model_.train(was_training)
    if len(sweep) == 0:
        raise ValueError("evaluate: the loader gave no batches (empty dataset?)")
    best = sweep.best_threshold()
    chosen = best if threshold is None else float(threshold)
    return {
        "metrics": sweep.summary(chosen),
        "threshold": chosen,
        "best_threshold": best,
        "loss": float(np.mean(losses)) if losses else None,
        "sweep": sweep,
    }


# =============================================================================================
# The trainer
# =============================================================================================
class Trainer:
    """Holds what one training run needs; `run()` does the two stages. Use `train(...)` for short.

    Steps are counted over the whole run: steps 0..steps_low-1 are stage "low", the rest "high".
    The data is one endless stream of epochs whose order depends only on (seed, epoch), so the
    batch of every step is known from the step number alone — that is what makes resuming exact.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        vocab: Vocabulary,
        config: TrainConfig,
        val_set: Dataset | None = None,
        *,
        resume: bool | str | Path = False,
        extra: dict | None = None,
        callbacks: Iterable[Callable[["Trainer"], None]] = (),
    ):
        self.config = config
        self.vocab = vocab
        self.extra = dict(extra or {})
        self.callbacks = list(callbacks)
        self.dist, self.device = init_distributed(config.device)
        self.is_main = self.dist.is_main
        if getattr(model, "config", None) is not None and model.config.vocab_size != len(vocab):
            raise ValueError(
                f"model.config.vocab_size={model.config.vocab_size} but the vocabulary has {len(vocab)} "
                "words: build the model with DMNConfig(..., vocab_size=len(vocab))"
            )
        self.amp_dtype = amp_dtype(self.device, config.amp)
        self.channels_last = config.channels_last and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick its fastest kernels

        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp_model = self.model
        if self.dist.enabled:
            # find_unused_parameters: stage "low" never runs the Upsampling Module, and ablations
            # (e.g. use_language=False) leave other parameters without gradients.
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )

        # Data: every process sees its own shard; batches of the same size (drop_last).
        self.sampler = ResumableSampler(train_set, self.dist.world_size, self.dist.rank, seed=config.seed)
        pin = self.device.type == "cuda"
        self.train_loader = make_loader(train_set, vocab, config.batch_size, sampler=self.sampler,
                                        num_workers=config.num_workers, drop_last=True, pin_memory=pin)
        self.steps_per_epoch = self.sampler.num_samples // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"The training set ({len(train_set)} samples over {self.dist.world_size} process(es)) is "
                f"smaller than one batch ({config.batch_size}); use a smaller batch_size or more data"
            )
        if config.plateau_metric == "val_iou" and val_set is None:
            raise ValueError("plateau_metric='val_iou' needs a val_set (or use plateau_metric='val_loss')")
        self.val_loader = None
        if val_set is not None and self.is_main:  # rank 0 validates and shares the result
            # In the main process (num_workers=0): validation runs while the training loader's workers
            # are alive, and worker processes forked then inherit that loader's iterator, whose cleanup
            # fails in them ("AssertionError: can only test a child process", printed at every
            # validation). Validation sets are small; generating or decoding them here costs little.
            self.val_loader = make_loader(val_set, vocab, config.batch_size, num_workers=0, pin_memory=pin)
        self.steps_low = config.steps_low or math.ceil(config.epochs_low * self.steps_per_epoch)
        self.steps_high = config.steps_high or math.ceil(config.epochs_high * self.steps_per_epoch)
        self.total_steps = self.steps_low + self.steps_high
        if self.total_steps == 0:
            raise ValueError("Nothing to train: set steps_low/steps_high or epochs_low/epochs_high")

        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.step = 0
        self.stage: str | None = None  # the stage the optimizer below belongs to
        self.optimizer = self.scheduler = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.history: dict = {"train": [], "val": []}
        self.threshold: float | None = None  # best on val at the last validation
        self.elapsed = 0.0  # wall-clock seconds of training, summed over resumed runs
        self._since_eval: list[float] = []  # train losses since the last validation
        self._resume_state: dict | None = None

        # Training draws random numbers only from these (and the sampler's own generator); seeding
        # them here makes a run repeatable. Resuming replaces them by the checkpoint's states.
        seed_everything(config.seed + self.dist.rank)
        if resume:
            path = Path(resume) if isinstance(resume, (str, Path)) else self.checkpoint_path
            if path is not None and path.is_file():
                self._load(path)
            elif not isinstance(resume, bool):
                raise FileNotFoundError(f"Checkpoint to resume from not found: {path}")
            elif self.is_main and config.progress:
                tqdm.write(f"No checkpoint at {path}: starting from step 0")

    # ---------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir else None

    def stage_of(self, step: int) -> str:
        return "low" if step < self.steps_low else "high"

    def _start_stage(self, stage: str) -> None:
        """A fresh Adam and plateau scheduler for each stage (the second stage "finetunes"), or the
        saved ones when resuming inside that stage."""
        lr = self.config.lr_high if (stage == "high" and self.config.lr_high) else self.config.lr
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=self.config.weight_decay)
        mode = "min" if self.config.plateau_metric == "val_loss" else "max"
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode=mode, factor=self.config.plateau_factor, patience=self.config.plateau_patience)
        saved = self._resume_state
        if saved is not None and saved["progress"].get("stage") == stage:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
        self._resume_state = None
        self.stage = stage

    def batches(self):
        """The endless stream of batches, from the current step on."""
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        while True:
            self.sampler.set_position(epoch, batch * self.config.batch_size)
            self.train_loader.generator.manual_seed(self.config.seed + epoch)  # worker seeds, if any
            for data in self.train_loader:
                yield data
            epoch, batch = epoch + 1, 0

    # ---------------------------------------------------------------------------------------------
    def train_step(self, batch: dict, stage: str) -> dict:
        """One optimizer step: forward, loss, backward, (clip), update."""
        batch = to_device(batch, self.device, self.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            logits, low = stage_outputs(self.ddp_model, batch, stage)
            loss, parts = stage_loss(logits, low, batch["masks"], self.config)
        row = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        if not math.isfinite(row["loss"]):  # stop before a NaN reaches the weights
            raise FloatingPointError(
                f"The loss became {row['loss']} at step {self.step}: lower the learning rate "
                f"(lr={self.config.lr}) or set grad_clip (e.g. 1.0)"
            )
        self.scaler.scale(loss).backward()
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return row

    def validate(self, stage: str) -> dict:
        """Validation loss and metrics on rank 0 (every rank gets the numbers, to step its scheduler
        identically); without a val set, the mean training loss since the last validation."""
        row = None
        if self.is_main:
            if self.val_loader is not None:
                result = evaluate(self.model, self.val_loader, stage=stage, loss_config=self.config,
                                  device=self.device, max_batches=self.config.eval_batches,
                                  progress=self.config.progress, amp=self.config.amp)
                m = result["metrics"]
                row = {"loss": result["loss"], "cum_iou": m["cum_iou"], "mean_iou": m["mean_iou"],
                       "Pr@0.5": m["Pr@0.5"], "threshold": result["threshold"]}
            else:
                row = {"loss": float(np.mean(self._since_eval)) if self._since_eval else None}
        if self.dist.enabled:
            box = [row]
            torch.distributed.broadcast_object_list(box, src=0)
            row = box[0]
        self._since_eval = []
        if self.config.plateau_metric == "val_iou" and "cum_iou" in row:
            self.scheduler.step(row["cum_iou"])
        elif row["loss"] is not None:
            self.scheduler.step(row["loss"])
        if "threshold" in row:
            self.threshold = row["threshold"]
        return row

    def run(self) -> dict:
        """Train from the current step to the end of stage 2; returns the history (also in out_dir)."""
        start_time = time.perf_counter() - self.elapsed
        call_start = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.config.progress and self.is_main))
        stream = self.batches()
        self.model.train()
        while self.step < self.total_steps:
            stage = self.stage_of(self.step)
            if stage != self.stage:
                self._start_stage(stage)
            row = self.train_step(next(stream), stage)
            self.step += 1
            self.elapsed = time.perf_counter() - start_time
            row = {"step": self.step, "stage": stage, **row,
                   "lr": self.optimizer.param_groups[0]["lr"], "time": round(self.elapsed, 3)}
            self.history["train"].append(row)
            self._since_eval.append(row["loss"])
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}")

            end_of_stage = self.step in (self.steps_low, self.total_steps)
            out_of_time = self._out_of_time(call_start)
            every = self.config.eval_every or self.steps_per_epoch
            validated = False
            if self.step % every == 0 or end_of_stage or out_of_time:
                val = self.validate(stage)
                self.history["val"].append({"step": self.step, "stage": stage, "epoch": self.step / self.steps_per_epoch,
                                            **{f"val_{k}": v for k, v in val.items()},
                                            "lr": self.optimizer.param_groups[0]["lr"],
                                            "time": round(time.perf_counter() - start_time, 3)})
                validated = True
                self.model.train()
            save_due = (self.step % self.config.ckpt_every == 0) if self.config.ckpt_every else validated
            if save_due or end_of_stage or out_of_time:
                self.save()
            for callback in self.callbacks:
                callback(self)
            if out_of_time:
                if self.is_main and self.config.progress:
                    tqdm.write(f"Stopped at step {self.step}/{self.total_steps}: max_minutes="
                               f"{self.config.max_minutes:g} reached (resume=True goes on)")
                break
        bar.close()
        if self.dist.enabled:
            torch.distributed.barrier()  # nobody leaves before rank 0 has written
        return self.history

    def _out_of_time(self, call_start: float) -> bool:
        """Past max_minutes in this call? Every process must agree, or DDP would hang."""
        if not self.config.max_minutes:
            return False
        flag = torch.tensor(float(time.perf_counter() - call_start > 60 * self.config.max_minutes))
        if self.dist.enabled:
            flag = flag.to(self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    # ---------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint + history.json (rank 0 only; atomic, see checkpoint.py)."""
        if not self.is_main or self.out_dir is None:
            return
        ckpt.save_checkpoint(
            self.checkpoint_path, self.model, self.vocab, train_config=self.config,
            optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler if self.scaler.is_enabled() else None,
            progress={"step": self.step, "stage": self.stage, "total_steps": self.total_steps,
                      "steps_low": self.steps_low, "epoch": self.step // self.steps_per_epoch,
                      "batch_in_epoch": self.step % self.steps_per_epoch, "elapsed": self.elapsed,
                      "since_eval": list(self._since_eval), "world_size": self.dist.world_size},
            rng=ckpt.get_rng_state(), history=self.history,
            extra={**self.extra, "threshold": self.threshold,
                   "threshold_from": "val" if self.threshold is not None else None},
        )
        write_json(self.out_dir / HISTORY_NAME, self.history)

    def _load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, map_location="cpu")
        ckpt.load_model_state(self.model, state, source=str(path))
        progress = state["progress"]
        # These decide which batch and which stage every step gets; steps_high may grow (train longer).
        saved = {**(state.get("train_config") or {}), "steps_low": progress.get("steps_low"),
                 "world_size": progress.get("world_size", 1)}
        now = {"seed": self.config.seed, "batch_size": self.config.batch_size, "steps_low": self.steps_low,
               "world_size": self.dist.world_size}
        for key, value in now.items():
            if saved.get(key, value) != value:
                raise ckpt.CheckpointError(
                    f"Cannot resume {path}: it was trained with {key}={saved[key]!r}, this run has "
                    f"{key}={value!r}, so the data order or stages would not match. Use the same value, "
                    "or a new out_dir to start afresh."
                )
        self.step = int(progress["step"])
        self.elapsed = float(progress.get("elapsed", 0.0))
        self._since_eval = list(progress.get("since_eval", []))
        self.history = state.get("history") or {"train": [], "val": []}
        self.threshold = (state.get("extra") or {}).get("threshold")
        if state.get("rng") is not None:
            ckpt.set_rng_state(state["rng"])
        self._resume_state = state  # optimizer/scheduler are restored when their stage starts
        if self.is_main and self.config.progress:
            tqdm.write(f"Resuming from {path} at step {self.step} of {self.total_steps}")


def train(
    model: nn.Module,
    train_set: Dataset,
    vocab: Vocabulary,
    config: TrainConfig | None = None,
    val_set: Dataset | None = None,
    *,
    resume: bool | str | Path = False,
    extra: dict | None = None,
    callbacks: Iterable[Callable[[Trainer], None]] = (),
) -> dict:
    """Train `model` in two stages (§4.3); returns the history (also saved as out_dir/history.json):

        {"train": [{"step", "stage", "loss", "loss_low", "loss_high", "lr", "time"}, ...],   one per step
         "val":   [{"step", "stage", "epoch", "val_loss", "val_cum_iou", "val_mean_iou", "val_Pr@0.5",
                    "val_threshold", "lr", "time"}, ...]}                                  one per validation
    (pandas.DataFrame(history["train"]) makes a table; `time` is wall-clock seconds of training.)

    resume=True continues from `config.out_dir/checkpoint.pt` if it exists (a path: from that file).
    The result of an interrupted-and-resumed run is identical to an uninterrupted one (same device,
    one process). `callbacks` are called with the Trainer after every step (e.g. for live plots).
    """
    trainer = Trainer(model, train_set, vocab, config or TrainConfig(), val_set,
                      resume=resume, extra=extra, callbacks=callbacks)
    return trainer.run()


def write_json(path: Path, data) -> None:
    """JSON written atomically (a temp file renamed over the target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)
