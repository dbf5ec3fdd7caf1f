"""Shared pieces of the issue-17 exploration scripts (not part of dmn_lib).

Data is generated once with dmn_lib's SynthRef and kept as uint8 tensors (cached under runs/explore_cache),
the model is dmn_lib's DMN, the loss dmn_lib.train.stage_loss and the metrics dmn_lib.metrics.ThresholdSweep,
so every number means what it means in the library.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmn_lib.config import DMNConfig
from dmn_lib.data.synthetic import SynthRef, matching_objects
from dmn_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dmn_lib.data.vocab import Vocabulary, pad_batch, tokenize
from dmn_lib.metrics import DEFAULT_THRESHOLDS, ThresholdSweep, iou
from dmn_lib.models.dmn import DMN

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "runs" / "explore_cache"
META_KEYS = ("kind", "target", "objects", "description", "n_lookalikes", "index")


def cached_split(split: str, n: int, image_size: int = 128, variant: str = "unc", instances: bool = False) -> dict:
    """The first n samples of a SynthRef split as uint8 images / bool masks (+ texts, metas, instance masks)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{variant}_{split}_{n}_{image_size}{'_inst' if instances else ''}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    ds = SynthRef(variant, split, size=n, image_size=image_size)
    images = torch.empty(n, image_size, image_size, 3, dtype=torch.uint8)
    masks = torch.empty(n, image_size, image_size, dtype=torch.bool)
    texts, metas, inst = [], [], []
    t0 = time.perf_counter()
    for i in range(n):
        image, visible, text, meta = ds.render_sample(i)
        images[i] = torch.from_numpy(image)
        masks[i] = torch.from_numpy(visible[meta["target"]])
        texts.append(text)
        metas.append({k: meta[k] for k in META_KEYS})
        if instances:
            inst.append(torch.from_numpy(np.stack(visible)))
    data = {"images": images.permute(0, 3, 1, 2).contiguous(), "masks": masks, "texts": texts, "metas": metas,
            "instances": inst if instances else None, "seconds": time.perf_counter() - t0}
    torch.save(data, path)
    return data


def vocabulary(variant: str = "unc") -> Vocabulary:
    """The vocabulary of the full 20,000-sample train split, as dmn_lib.train.build_vocabulary makes it."""
    ds = SynthRef(variant, "train")
    return Vocabulary.build(ds.text(i) for i in range(len(ds)))


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W -> ImageNet-normalised float (what image_to_tensor gives)."""
    return (images_u8.float() - _MEAN) / _STD


def encode(vocab: Vocabulary, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch([vocab.encode(t, strict=False) or [1] for t in texts])


def make_batch(data: dict, idx, vocab: Vocabulary, texts=None) -> dict:
    idx = torch.as_tensor(idx)
    tokens, lengths = encode(vocab, texts if texts is not None else [data["texts"][i] for i in idx.tolist()])
    return {"images": normalise(data["images"][idx]), "masks": data["masks"][idx].unsqueeze(1).float(),
            "tokens": tokens, "lengths": lengths, "meta": [data["metas"][i] for i in idx.tolist()]}


def weights_file() -> str:
    from dmn_lib.experiment import efficientnet_lite0_weights

    return str(efficientnet_lite0_weights())


def model_config(vocab_size: int, backbone: str = "efficientnet_lite0", pretrained: bool = True, **overrides) -> DMNConfig:
    if backbone == "efficientnet_lite0":
        base = dict(backbone="efficientnet_lite0", backbone_kwargs={},
                    pretrained_file=weights_file() if pretrained else None)
    elif backbone == "small_dpn":
        base = {}
    else:
        raise ValueError(backbone)
    return DMNConfig.preset("course", vocab_size=vocab_size, **{**base, **overrides})


def trim_backbone(model: DMN) -> int:
    """timm's EfficientNetFeatures runs every block even when out_indices stops earlier: drop the unused
    tail (blocks after the last returned feature). Returns the number of blocks dropped."""
    bb = model.visual.backbone
    if not hasattr(bb, "blocks") or not hasattr(bb, "feature_info"):
        return 0
    # feature_info modules look like 'blocks.4': keep blocks up to that index
    names = bb.feature_info.module_name()  # of the returned features only
    keep = max(int(n.split(".")[1]) for n in names if n.startswith("blocks.")) + 1
    dropped = len(bb.blocks) - keep
    if dropped > 0:
        bb.blocks = bb.blocks[:keep]
    return dropped


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------------------------------------------
# Evaluation: cumulative IoU / Pr@X at the best val threshold, per kind; the flip test
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_probs(model, data, idx, vocab, texts=None, batch_size=50, autocast_dtype=None) -> torch.Tensor:
    out = []
    idx = list(idx)
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        b = make_batch(data, chunk, vocab, None if texts is None else texts[s:s + batch_size])
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(b["images"], b["tokens"], b["lengths"])
        out.append(torch.sigmoid(logits.float())[:, 0])
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, data, vocab, n=None, batch_size=50, autocast_dtype=None) -> dict:
    was = model.training
    model.eval()
    n = n or len(data["texts"])
    sweep = ThresholdSweep(DEFAULT_THRESHOLDS)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        probs = predict_probs(model, data, idx, vocab, batch_size=batch_size, autocast_dtype=autocast_dtype)
        sweep.update(probs, data["masks"][idx], meta=[data["metas"][i] for i in idx])
    model.train(was)
    thr = sweep.best_threshold()
    s = sweep.summary(thr)
    kinds = sweep.summary_by("kind", thr)
    return {"threshold": thr, "cum_iou": s["cum_iou"], "mean_iou": s["mean_iou"], "Pr@0.5": s["Pr@0.5"],
            "Pr@0.7": s["Pr@0.7"], "Pr@0.9": s["Pr@0.9"], "n": s["n"],
            "kinds": {k: {"cum_iou": round(v["cum_iou"], 4), "Pr@0.5": round(v["Pr@0.5"], 4), "n": v["n"]}
                      for k, v in kinds.items()}}


OPPOSITE = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost", "top": "bottom",
            "bottom": "top", "topmost": "bottommost", "bottommost": "topmost", "upper": "lower", "lower": "upper",
            "above": "below", "below": "above", "over": "under", "under": "over", "beneath": "above"}
OPPOSITE_LOCATION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
OPPOSITE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def flip_place(text: str) -> str | None:
    """Notebook 11's place-word flip: every place word replaced by its opposite (None if none)."""
    words = tokenize(text)
    return " ".join(OPPOSITE.get(w, w) for w in words) if any(w in OPPOSITE for w in words) else None


def flipped_description(d: dict) -> dict:
    d = dict(d)
    if d["location"] in OPPOSITE_LOCATION:
        d["location"] = OPPOSITE_LOCATION[d["location"]]
    if d["relation"] is not None:
        d["relation"] = {"name": OPPOSITE_RELATION[d["relation"]["name"]], "landmark": d["relation"]["landmark"]}
    return d


@torch.no_grad()
def flip_test(model, data, vocab, threshold, max_per_kind=400, batch_size=50) -> dict:
    """For location/relation val samples: flip the place words, predict both.

    moved   : IoU(mask before, mask after) < 0.5 (notebook 11's criterion)
    correct : the flipped expression picks out exactly one other object (dmn_lib's verifier, generous), and
              the flipped mask has IoU > 0.5 with that object (counted over the samples that have one)
    """
    was = model.training
    model.eval()
    out = {}
    for kind in ("location", "relation"):
        idx, flipped = [], []
        for i, m in enumerate(data["metas"]):
            if m["kind"] != kind:
                continue
            q = flip_place(data["texts"][i])
            if q is None:
                continue
            idx.append(i)
            flipped.append(q)
            if len(idx) >= max_per_kind:
                break
        if not idx:
            continue
        p0 = predict_probs(model, data, idx, vocab, batch_size=batch_size) > threshold
        p1 = predict_probs(model, data, idx, vocab, texts=flipped, batch_size=batch_size) > threshold
        moved, correct, has_other = 0, 0, 0
        for k, i in enumerate(idx):
            moved += float(iou(p0[k], p1[k])) < 0.5
            meta = data["metas"][i]
            if data["instances"] is not None:
                others = matching_objects(meta, flipped_description(meta["description"]))
                if len(others) == 1 and meta["target"] not in others:
                    has_other += 1
                    (j,) = others
                    correct += float(iou(p1[k], data["instances"][i][j])) > 0.5
        out[kind] = {"n": len(idx), "moved": round(moved / len(idx), 4),
                     "n_other": has_other, "correct": round(correct / max(has_other, 1), 4)}
    model.train(was)
    return out
