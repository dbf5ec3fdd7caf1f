"""Where and how a run executes: device, mixed precision, torchrun/DDP, seeding, samplers and loaders.

Defined in notebook 07, §7-8 (the trainer's infrastructure; none of it is in §4.3 of the paper):
  * `Runtime.start(config)` joins torchrun's process group (nccl on GPUs, gloo on CPUs), picks this
    process's device (`cuda:<LOCAL_RANK>`), the autocast dtype (bf16 on Ampere/Hopper, else fp16 with a
    GradScaler) and the memory layout (channels_last: faster convolutions on CUDA and on CPUs);
  * `ResumableSampler`: a data order that is a pure function of (seed, epoch), resumable mid-epoch;
  * `ShardedBatches`: evaluation under torchrun, each process a share of the batches of one sequential
    pass, gathered back in order, so the metrics equal a one-process evaluation exactly;
  * `make_loader`, `to_device`, `seed_everything`.
"""
from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dmn_lib.data.vocab import Collate, Vocabulary

__all__ = [
    "DistInfo", "Runtime", "distributed_from_env", "resolve_device", "init_distributed", "amp_dtype", "autocast",
    "seed_everything", "ResumableSampler", "ShardedBatches", "make_loader", "to_device",
]


# =============================================================================================
# Processes and devices
# =============================================================================================
@dataclass
class DistInfo:
    """This process's place under torchrun (rank 0 of 1 without it). Notebook 07, §7."""

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
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts. Notebook 07, §7."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU if there is one, else the CPU; "cuda" -> cuda:<local_rank> (under
    torchrun every process gets its own GPU); "cuda:N" and "cpu" as given. Notebook 07, §7."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={spec!r} was asked for, but this machine has no CUDA GPU; use 'auto' or 'cpu'")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    if device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device cuda:{device.index} was asked for (device={spec!r}, LOCAL_RANK={local_rank}), but "
                           f"this machine has {torch.cuda.device_count()} GPU(s); start fewer processes per node")
    return device


def init_distributed(device_spec: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when started by torchrun (nccl on GPUs, gloo on CPUs). Notebook 07, §7."""
    info = distributed_from_env()
    if info.enabled and device_spec.startswith("cuda:"):
        raise ValueError(f"device={device_spec!r} under torchrun would put every process on one GPU; use "
                         "'cuda' or 'auto': each process takes the GPU of its LOCAL_RANK")
    device = resolve_device(device_spec, info.local_rank)
    if info.enabled and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype: bf16 on GPUs with bf16 tensor cores (compute capability 8.0+: Ampere, Hopper),
    no loss scaling needed; fp16 with a GradScaler on older GPUs (where torch would emulate bf16 slowly);
    None = full precision (always on the CPU). Notebook 07, §7."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in `dtype` on `device` (off for None). Notebook 07, §7."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (every CUDA device's too). Notebook 07, §7."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class Runtime:
    """One process's share of a run: its rank, device, autocast dtype and memory layout. Notebook 07, §7.

    The trainer calls it for everything a GPU or torchrun needs, so its loop reads as §4.3."""

    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def start(cls, device: str = "auto", amp: bool = True, channels_last: bool = True) -> Runtime:
        dist, dev = init_distributed(device)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick its fastest kernels
        return cls(dist, dev, amp_dtype(dev, amp), channels_last)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def prepare(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the model on this device, the module to call in training: a DDP wrapper under torchrun)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if not self.dist.enabled:
            return model, model
        # find_unused_parameters: stage "low" never runs the Upsampling Module, and ablations
        # (e.g. use_language=False) leave other parameters without gradients.
        return model, nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=True)

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, on only for fp16 (bf16 has float32's range)."""
        return torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.device, self.channels_last)

    def pin_memory(self) -> bool:
        return self.device.type == "cuda"  # page-locked batches: the copies to the GPU run asynchronously

    # --- the collectives a run needs (no-ops in one process) -----------------------------------
    def any(self, flag: bool) -> bool:
        """True if `flag` is True in any process (e.g. "out of time": all must stop together, or DDP hangs)."""
        value = torch.tensor(float(flag), device=self.device)
        if self.dist.enabled:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, obj):
        """Rank 0's `obj`, in every process."""
        if not self.dist.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated (rank 0's first), in every process."""
        if not self.dist.enabled:
            return items
        parts = [None] * self.dist.world_size
        torch.distributed.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics in every process. DDP broadcasts them at each training forward;
        after the last step each process has updated its own, and evaluation must use rank 0's."""
        if self.dist.enabled:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.dist.enabled:
            torch.distributed.barrier()


# =============================================================================================
# Data order and loaders
# =============================================================================================
class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler, which can also start in the middle of an epoch. Notebook 07, §8.

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


class ShardedBatches(Sampler):
    """The batches of one sequential pass over `n` samples (the first `max_batches`, if given): process
    `rank` takes batches rank, rank + world_size, ... Batch k of this process is batch
    `rank + k * world_size` of the pass, so gathered results can be put back in order. Notebook 07, §7."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, max_batches: int = 0):
        total = math.ceil(n / batch_size)
        total = min(total, max_batches) if max_batches else total
        self.rank, self.world_size = rank, world_size
        self.batches = [list(range(b * batch_size, min(n, (b + 1) * batch_size)))
                        for b in range(rank, total, world_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def global_index(self, k: int) -> int:
        return self.rank + k * self.world_size


def make_loader(dataset: Dataset, vocab: Vocabulary, batch_size: int = 16, *, sampler=None, batch_sampler=None,
                num_workers: int = 0, drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """A DataLoader with DMN's Collate (notebook 07, §7). It gets its own torch.Generator: otherwise each new
    iterator draws its worker seed from the global RNG, and resuming would change every later random number."""
    batching = dict(batch_sampler=batch_sampler) if batch_sampler is not None else dict(
        batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last)
    return DataLoader(dataset, num_workers=num_workers, collate_fn=Collate(vocab), pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False, **batching)


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """A batch's tensors on `device` (asynchronous copies from pinned memory on CUDA). Notebook 07, §7."""
    out = dict(batch)
    non_blocking = device.type == "cuda"
    for key in ("images", "masks", "tokens", "lengths"):
        out[key] = batch[key].to(device, non_blocking=non_blocking)
    if channels_last:
        out["images"] = out["images"].contiguous(memory_format=torch.channels_last)
    return out
