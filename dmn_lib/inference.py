"""Using a trained DMN: evaluation over a split, and the mask of one query on one image.

    result = evaluate(model, make_loader(val_set, vocab))      # notebook 08, §4: metrics at every threshold
    p = predict(model, vocab, image, "the red circle")          # notebook 11, §8: p.probability, p.mask

`evaluate` runs the model over a loader and fills a `ThresholdSweep` (dmn_lib.metrics); under torchrun
each process evaluates its share of the batches and the counts are gathered back in order, so every
process gets exactly the one-process numbers. `predict` is what `python -m dmn_lib predict` and notebook
11's demo call; `probabilities` is its batched form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dmn_lib import checkpoint as ckpt
from dmn_lib.data.transforms import image_to_tensor
from dmn_lib.data.vocab import UNK, Vocabulary, pad_batch, tokenize
from dmn_lib.losses import stage_loss, stage_outputs
from dmn_lib.metrics import DEFAULT_THRESHOLDS, ThresholdSweep, threshold_counts
from dmn_lib.runtime import DistInfo, Runtime, amp_dtype
from dmn_lib.spec import TrainConfig

__all__ = ["evaluate", "probabilities", "predict", "Prediction"]


# =============================================================================================
# Evaluation over a split
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
    runtime: Runtime | None = None,
    original_size: bool = True,
) -> dict:
    """Run `model` over `loader` and measure it at every threshold. Defined in notebook 08, §4.

    Returns {"metrics": summary at `threshold` (or, if None, at the best threshold on THIS set),
             "threshold": that threshold, "best_threshold": the best on this set,
             "loss": mean stage loss (if `loss_config` is given), "sweep": the ThresholdSweep}.
    Pick the threshold on val, apply it to test: `dmn_lib.metrics.threshold_transfer(val_sweep, test_sweep)`.
    stage="low" scores the Synthesis Module's map upsampled bilinearly (training stage 1).
    `runtime` (the trainer's) replaces device and amp; under torchrun the loader must shard its batches
    with `dmn_lib.runtime.ShardedBatches`, and the results are gathered from every process.
    original_size: on a dataset that resizes its images (ReferDataset, which has `original_mask`), measure
    IoU at each image's own size, the probabilities resized back to it (as CRIS and the original code).
    """
    model_ = ckpt.unwrap(model)
    if runtime is None:
        device = torch.device(device) if device is not None else next(model_.parameters()).device
        runtime = Runtime(DistInfo(), device, amp_dtype(device, amp))
    given = {float(threshold)} if threshold is not None else set()
    sweep = ThresholdSweep(sorted({float(t) for t in thresholds} | given))
    index = getattr(loader.batch_sampler, "global_index", lambda k: k)  # the batch's place in one pass
    was_training = model_.training
    model_.eval()
    records = []  # one per batch: its index, loss, counts at every threshold and the samples' meta
    total = min(len(loader), max_batches) if max_batches else len(loader)
    for k, batch in enumerate(tqdm(loader, total=total, desc="evaluate", leave=False, disable=not progress)):
        if max_batches and k >= max_batches:
            break
        batch = runtime.to_device(batch)
        with runtime.autocast():
            logits, low = stage_outputs(model_, batch, stage)
            loss = stage_loss(logits, low, batch["masks"], loss_config)[0].item() if loss_config else None
        if logits is None:  # stage 1: the low-res map, upsampled bilinearly to the mask's size
            logits = F.interpolate(low.float(), size=batch["masks"].shape[-2:], mode="bilinear", align_corners=False)
        inter, union = _counts(torch.sigmoid(logits.float()), batch, sweep.thresholds,
                               getattr(loader.dataset, "original_mask", None) if original_size else None)
        records.append((index(k), loss, inter.cpu().numpy(), union.cpu().numpy(), batch["meta"]))
    model_.train(was_training)
    records = sorted(runtime.gather(records), key=lambda r: r[0])  # every process's batches, in order
    for _, _, inter, union, meta in records:
        sweep.add_counts(inter, union, meta)
    if len(sweep) == 0:
        raise ValueError("evaluate: the loader gave no batches (empty dataset?)")
    losses = [loss for _, loss, *_ in records if loss is not None]
    best = sweep.best_threshold()
    chosen = best if threshold is None else float(threshold)
    return {"metrics": sweep.summary(chosen), "threshold": chosen, "best_threshold": best,
            "loss": float(np.mean(losses)) if losses else None, "sweep": sweep}


def _counts(probs: torch.Tensor, batch: dict, thresholds, original_mask=None):
    """Intersections and unions at every threshold: against the batch's masks, or (`original_mask`, a
    dataset's function of the sample index) at each image's own size."""
    if original_mask is None:
        return threshold_counts(probs, batch["masks"] > 0.5, thresholds)
    counts = []
    for b, meta in enumerate(batch["meta"]):
        mask = torch.from_numpy(original_mask(meta["index"])).to(probs.device)
        prob = F.interpolate(probs[b : b + 1], size=tuple(mask.shape), mode="bilinear", align_corners=False)
        counts.append(threshold_counts(prob, mask[None, None], thresholds))
    return torch.cat([c[0] for c in counts]), torch.cat([c[1] for c in counts])


# =============================================================================================
# One image, one query
# =============================================================================================
@dataclass
class Prediction:
    """What `predict` returns: maps at the image's own size (H x W numpy arrays). Notebook 11, §8."""

    probability: np.ndarray  # float32 in [0, 1]
    mask: np.ndarray  # bool: probability > threshold
    threshold: float
    tokens: list[str]  # the query as the model read it (an unknown word reads as "<unk>")
    unknown: list[str]  # the query's words that are not in the vocabulary
    network_size: int | None  # the side the image was resized to for the network (None: its own size)


def _pixels(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image: expected a PIL image or a uint8 H x W x 3 array, got {array.dtype} {array.shape}")
    return array


@torch.inference_mode()
def probabilities(model: nn.Module, vocab: Vocabulary, images: Sequence, queries: Sequence[str], *,
                  size: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The model's probabilities, B x H x W on the CPU, for images of one size (PIL or uint8 H x W x 3) and
    their queries (unknown words read as <unk>). `size`: the side the network sees (bilinear resize; the
    probabilities come back at the images' size); None = the images as they are. Notebook 11, §3."""
    device = torch.device(device) if device is not None else next(ckpt.unwrap(model).parameters()).device
    arrays = [_pixels(image) for image in images]
    height, width = arrays[0].shape[:2]
    if size is not None and (height, width) != (size, size):
        arrays = [np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in arrays]
    tokens, lengths = pad_batch([vocab.encode(q, strict=False) or [UNK] for q in queries])
    pixels = torch.stack([image_to_tensor(a) for a in arrays]).to(device)
    logits = model(pixels, tokens.to(device), lengths.to(device)).float()
    if logits.shape[-2:] != (height, width):  # back to the images' own size
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[:, 0].cpu()


def predict(model: nn.Module, vocab: Vocabulary, image, query: str, *, threshold: float = 0.5,
            image_size: int | None = None, device: torch.device | str | None = None) -> Prediction:
    """Segment what `query` describes in `image` (PIL or uint8 H x W x 3). Defined in notebook 11, §8.

    image_size: the side the network sees (as it was trained: `saved_spec(record).data.image_size`);
    None = the image as it is. An empty query, or one with no known word, is a ValueError that says so.
    """
    ids = vocab.encode(query, strict=True)
    stride = ckpt.unwrap(model).config.stride
    height, width = _pixels(image).shape[:2]
    if min(height, width) < stride:
        raise ValueError(f"the image is {width}x{height} pixels, smaller than the network's stride of {stride} "
                         "pixels (it would have no cell at the coarsest scale); use a larger image")
    if image_size is not None and (image_size < stride or image_size % stride):
        raise ValueError(f"image_size must be a multiple of the stride {stride}, got {image_size}")
    prob = probabilities(model, vocab, [image], [query], size=image_size, device=device)[0].numpy()
    return Prediction(probability=prob, mask=prob > threshold, threshold=threshold,
                      tokens=[vocab.itos[i] for i in ids], unknown=[w for w in tokenize(query) if w not in vocab],
                      network_size=image_size)
