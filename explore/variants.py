"""Options of OURS tested for issue 17 (brief Y), applied to a dmn_lib DMN from outside (not part of dmn_lib).

Each one keeps the model a DMN (VM, LM with SRUs, SM with dynamic filters + mSRU, UM) and changes one thing:

    visual_norm   the SM's copy of I_N normalised before eq. 9 (the UM's skip connections keep the raw I_N)
                  "l2":  unit L2 norm over channels at every location (Hu et al. 2016, the paper's ref [3])
                  "l2s": the same times sqrt(C) (every channel of RMS ~1, the scale of LOC and of r_t)
                  "bn":  a BatchNorm2d over I_N's channels (learned affine)
                  "std": per-channel standardisation with fixed statistics measured on training images
    r_norm        r_t L2-normalised (times sqrt(size)) before eq. 9
    response_scale  the dynamic filters' responses F_t multiplied by this (e.g. 1/sqrt(channels)): the
                  sigmoid weights are all positive, so a response sums ~120 same-signed terms
    dice          a soft-IoU (Dice) term beside the BCE (losses.py's stage_loss is unchanged)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FixedStandardise(nn.Module):
    """(x - mean_c) / std_c with statistics set once (`calibrate`), kept as buffers."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class L2Norm(nn.Module):
    def __init__(self, channels: int, rescale: bool):
        super().__init__()
        self.scale = math.sqrt(channels) if rescale else 1.0

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale


class NormedSynthesis(nn.Module):
    """The SM, reading a normalised I_N (DMN.forward calls `synthesis(...)` and `synthesis.low_res_head`)."""

    def __init__(self, inner: nn.Module, norm: nn.Module):
        super().__init__()
        self.inner, self.norm = inner, norm
        self.low_res_head = inner.low_res_head

    def forward(self, visual, r, filters, lengths, return_steps=False):
        return self.inner(self.norm(visual), r, filters, lengths, return_steps=return_steps)


class ScaledLanguage(nn.Module):
    """The LM with its outputs rescaled: F_t = response_scale * (f_k,t * [I_N; LOC]); r_t optionally
    L2-normalised (times sqrt(size), so its scale stays that of a unit-variance vector)."""

    def __init__(self, inner: nn.Module, response_scale: float, r_norm: bool):
        super().__init__()
        self.inner, self.response_scale, self.r_norm = inner, response_scale, r_norm
        self.r_size = inner.r_size

    def forward(self, tokens):
        r, f = self.inner(tokens)
        if self.r_norm:
            r = F.normalize(r, dim=-1) * math.sqrt(r.shape[-1])
        if f is not None and self.response_scale != 1.0:
            f = f * self.response_scale
        return r, f


def apply_variants(model, visual_norm: str = "none", response_scale: float = 1.0, r_norm: bool = False):
    """Wrap the model's SM / LM in place; returns the model. response_scale < 0 means 1/sqrt(channels)."""
    channels = model.visual.channels[-1]
    if visual_norm != "none":
        norm = {"l2": lambda: L2Norm(channels, False), "l2s": lambda: L2Norm(channels, True),
                "bn": lambda: nn.BatchNorm2d(channels), "std": lambda: FixedStandardise(channels)}[visual_norm]()
        model.synthesis = NormedSynthesis(model.synthesis, norm)
    if response_scale < 0:
        response_scale = 1.0 / math.sqrt(model.language.filter_channels)
    if response_scale != 1.0 or r_norm:
        model.language = ScaledLanguage(model.language, response_scale, r_norm)
    return model


@torch.no_grad()
def calibrate_standardise(model, images: torch.Tensor, batch_size: int = 50) -> None:
    """Set FixedStandardise's statistics from I_N of these (normalised) training images."""
    norm = getattr(model.synthesis, "norm", None)
    if not isinstance(norm, FixedStandardise):
        return
    was = model.training
    model.eval()
    feats = torch.cat([model.visual(images[s:s + batch_size])[-1] for s in range(0, len(images), batch_size)])
    norm.mean.copy_(feats.mean(dim=(0, 2, 3), keepdim=True))
    norm.std.copy_(feats.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3))
    model.train(was)


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per sample (sum over pixels), averaged over the batch; masks may be soft (low-res)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    g = masks.float().flatten(1)
    return (1 - (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).mean()
