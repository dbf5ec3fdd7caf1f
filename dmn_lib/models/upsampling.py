"""Upsampling Module (UM), paper §3.5: back from R_N to a full-resolution mask.

For n = N, ..., 1:  R_{n-1} = Upsample×2( Conv3x3( [R_n, I_n] ) )   — skip connections to the VM
and finally a 1x1 conv over R_0 gives one channel (sigmoid -> mask). Concatenating I_n at every
scale lets fine detail lost by the stride-2^N map come back (Table 1, row 3 removes it).
Each stage convolves first and then scales by 2, in the paper's order, so the 3x3 conv runs on
the smaller map. Taught in notebook 06.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmn_lib.config import DMNConfig


class UpsamplingModule(nn.Module):
    def __init__(self, config: DMNConfig, visual_channels: list[int]):
        super().__init__()
        self.skip_connections = config.skip_connections
        self.activation = nn.ReLU(inplace=True) if config.um_activation == "relu" else nn.Identity()
        stages, in_channels = [], config.msru_hidden
        # Stage i works at scale n = N - i and (with skips) also reads I_n.
        for i, out_channels in enumerate(config.um_channels):
            n = config.num_scales - i
            skip = visual_channels[n - 1] if config.skip_connections else 0
            stages.append(nn.Conv2d(in_channels + skip, out_channels, kernel_size=3, padding=1))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(self, R: torch.Tensor, features: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        """R: R_N; features: [I_1..I_N]; -> logits B x 1 x out_size."""
        for i, conv in enumerate(self.stages):
            n = len(self.stages) - i  # current scale
            if self.skip_connections:
                R = torch.cat([R, features[n - 1]], dim=1)
            R = self.activation(conv(R))
            # x2, snapped to the next skip map's exact size (odd image sizes) or to the image.
            target = features[n - 2].shape[-2:] if n >= 2 else out_size
            R = F.interpolate(R, size=tuple(target), mode="bilinear", align_corners=False)
        return self.classifier(R)
