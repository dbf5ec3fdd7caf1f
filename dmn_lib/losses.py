"""The loss of each training stage (§4.3). Defined in notebook 07, §1-4.

    §4.3: "We train our method in two stages: at low resolution (i.e., without using the UM) and then
    finetune the UM to obtain high resolution segmentation maps."

Stage 1, "low": the Visual, Language and Synthesis Modules; the Synthesis Module's output R_N goes
  through a 1x1 head to a low-resolution logit map (stride 2^N), compared with the ground-truth mask
  averaged over each cell (`low_res_target`). The Upsampling Module is not run.
Stage 2, "high": the whole network; binary cross-entropy on the full-resolution logits, PLUS (unless
  `low_res_weight=0`) the stage-1 loss on the Synthesis Module's output.

Why keep the low-res loss in stage 2? Measured on a prototype (2 CPU cores, 128 px SynthRef): with the
high-res loss alone the model learned "objectness" but picked the referred object only at chance for
10 minutes; with the low-res loss beside it and positive pixels weighted x3 (`pos_weight`), it reached
0.20 cumulative IoU at 2 minutes and 0.39 at 10. The low-res loss speaks directly to the module that
reads the query, instead of through the whole Upsampling Module. The `paper` spec drops it (§4.3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmn_lib.spec import TrainConfig

__all__ = ["low_res_target", "stage_outputs", "stage_loss"]


def low_res_target(masks: torch.Tensor, size: tuple[int, int], kind: str = "soft") -> torch.Tensor:
    """The ground truth at the Synthesis Module's resolution (notebook 07, §2).

    Area averaging gives each low-res cell the fraction of its pixels inside the mask. "soft" uses
    that fraction as the BCE target (a cell half covered by a thin object is not called "empty");
    "hard" thresholds it at 0.5.
    """
    fraction = F.adaptive_avg_pool2d(masks.float(), size)
    return fraction if kind == "soft" else (fraction > 0.5).float()


def stage_outputs(model: nn.Module, batch: dict, stage: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Forward one batch: (full-resolution logits, or None in stage "low"; low-res logits). Notebook 07, §1."""
    if stage == "low":  # stage 1: the Upsampling Module is not run at all
        return None, model(batch["images"], batch["tokens"], batch["lengths"], stage="low")
    return model(batch["images"], batch["tokens"], batch["lengths"], return_low_res=True)


def stage_loss(logits: torch.Tensor | None, low: torch.Tensor, masks: torch.Tensor,
               config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """The loss of each stage; returns (loss, {"loss_low": ..., "loss_high": ...} as 0-d tensors). Notebook 07, §3.

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
