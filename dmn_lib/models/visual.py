"""Visual Module (VM), paper §3.2, eq. 1:  {I_n}_{n=1..N} = VM(I).

A timm backbone built with `features_only=True` returns the feature maps at strides
2, 4, ..., 2^N. With DPN92 (the paper's backbone) and N = 5 their channels are
64, 336, 704, 1552, 2688. Taught in notebook 02.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from dmn_lib.config import DMNConfig


class VisualModule(nn.Module):
    def __init__(self, config: DMNConfig):
        super().__init__()
        self.num_scales = config.num_scales
        self.backbone = create_backbone(config)
        self.channels: list[int] = self.backbone.feature_info.channels()
        self.strides: list[int] = self.backbone.feature_info.reduction()
        expected = [2 ** (n + 1) for n in range(config.num_scales)]
        if self.strides != expected:
            raise ValueError(
                f"Backbone {config.backbone!r} gives feature strides {self.strides}; DMN needs {expected} "
                "(one map per halving of the image). Pick a backbone with a stride-2 stem, e.g. a DPN or ResNet."
            )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images B x 3 x H x W -> [I_1, ..., I_N], I_n of size about H/2^n x W/2^n."""
        return self.backbone(images)


def create_backbone(config: DMNConfig) -> nn.Module:
    """timm.create_model(..., features_only=True) for the first N scales, with clear weight errors."""
    kwargs = dict(features_only=True, out_indices=tuple(range(config.num_scales)), **config.backbone_kwargs)
    if config.pretrained_file:
        # timm reads local weights through the pretrained config's `file` entry: no network needed.
        kwargs["pretrained_cfg_overlay"] = dict(file=str(config.pretrained_file))
    pretrained = config.pretrained or bool(config.pretrained_file)
    try:
        return timm.create_model(config.backbone, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError, ImportError) as err:
        if not pretrained:
            raise
        if config.pretrained_file:
            raise RuntimeError(
                f"Could not load backbone weights for {config.backbone!r} from {config.pretrained_file}: {err}"
            ) from err
        raise RuntimeError(
            f"pretrained=True needs to download ImageNet weights for {config.backbone!r}, which failed "
            f"(no network?): {type(err).__name__}: {err}. Supply local weights instead: download the timm "
            "checkpoint on a machine with internet and pass DMNConfig(pretrained_file='path/to/weights.pth' "
            "or '.safetensors'), or train from scratch with pretrained=False."
        ) from err
