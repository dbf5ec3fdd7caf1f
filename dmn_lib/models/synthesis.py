"""Synthesis Module (SM), paper §3.4, eq. 9-10: merge the image and the words into R_N.

    LOC        8 coordinate channels per cell of I_N (following Hu et al. [3])
    F_t        = {f_k,t * [I_N; LOC]}_k  the responses to the K dynamic filters (1x1 convolutions)
    M_t        = Conv1x1([I_N, F_t, LOC, r_t])             (eq. 9; r_t tiled over the map)
    R_N        = mSRU({M_t}_t) at the last word            (eq. 10)

The multimodal SRU (mSRU) is an SRU whose "1x1 convolution" shares weights over pixels: it runs
over the words t *independently at every pixel* (the pixels are the batch). The original release
(batch 1) flattened all pixels x words into ONE pixel-major sequence (for each pixel in raster order,
its words in order) and read R_N from the last H'W' steps of it, so the state leaks from pixel to
pixel and, for T > 1, the read-out mixes pixels and words. `msru_order="flattened"` reproduces that
exactly, batched (tested on tagged tensors, tests/test_msru_order.py), for notebook 05's exercise.
Taught in notebook 05; the design document (docs/design.md, "paper vs original vs ours") compares both.
"""
from __future__ import annotations

import torch
from torch import nn

from dmn_lib.config import DMNConfig
from dmn_lib.models.recurrent import make_rnn

LOC_CHANNELS = 8


def location_map(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """LOC: 8 x H' x W' — at cell (h, w): xmin, ymin, xmax, ymax, xctr, yctr, 1/W', 1/H'.

    Coordinates are normalised to [-1, 1] (docs/design.md), so the same query ("the left ring") maps
    to the same numbers whatever the image size.
    """
    w = torch.arange(width, device=device, dtype=dtype).view(1, width).expand(height, width)
    h = torch.arange(height, device=device, dtype=dtype).view(height, 1).expand(height, width)
    xmin, xmax = 2 * w / width - 1, 2 * (w + 1) / width - 1
    ymin, ymax = 2 * h / height - 1, 2 * (h + 1) / height - 1
    return torch.stack(
        [
            xmin, ymin, xmax, ymax,
            (xmin + xmax) / 2, (ymin + ymax) / 2,
            torch.full_like(w, 1.0 / width), torch.full_like(h, 1.0 / height),
        ]
    )


class SynthesisModule(nn.Module):
    def __init__(self, config: DMNConfig, visual_channels: int, r_size: int):
        super().__init__()
        self.config = config
        self.use_language = config.use_language
        self.use_loc = config.use_loc
        loc = LOC_CHANNELS if config.use_loc else 0
        # The parts of eq. 9's concatenation, in order; an ablation sets its part to 0 channels.
        self.parts = {
            "visual": visual_channels,
            "responses": config.num_filters if (config.use_language and config.dynamic_filters) else 0,
            "loc": loc,
            "words": r_size if (config.use_language and config.concat_rt) else 0,
        }
        self.fusion = nn.Conv2d(sum(self.parts.values()), config.sm_channels, kernel_size=1)
        if config.use_language:
            self.msru = make_rnn(
                config.rnn, config.sm_channels, config.msru_hidden, config.msru_layers, config.sru_activation
            )
        else:
            # "Only VM" (Table 1, row 1): no words, so no recurrence; a 1x1 conv keeps R_N's size.
            self.msru = None
            self.visual_only = nn.Conv2d(config.sm_channels, config.msru_hidden, kernel_size=1)
        # The first training stage (§4.3) scores R_N directly, without the Upsampling Module.
        self.low_res_head = nn.Conv2d(config.msru_hidden, 1, kernel_size=1)

    # ------------------------------------------------------------------------------------------
    def fuse(self, visual: torch.Tensor, r: torch.Tensor | None, filters: torch.Tensor | None) -> torch.Tensor:
        """eq. 9 for every word at once: M is B x T x sm_channels x H' x W' (T = 1 without language).

        Conv1x1 of a concatenation equals the sum of 1x1 convs of its parts, so the image and LOC
        parts are computed once rather than T times, and r_t (constant over the map) is a matrix
        product plus a broadcast. Notebook 05 checks this equals the explicit concatenation.
        """
        batch, _, height, width = visual.shape
        weights = dict(zip(self.parts, self.fusion.weight.flatten(1).split(list(self.parts.values()), dim=1)))
        out = torch.einsum("oc,bchw->bohw", weights["visual"], visual) + self.fusion.bias.view(1, -1, 1, 1)
        map_ = visual
        if self.use_loc:
            loc = location_map(height, width, visual.device, visual.dtype)
            out = out + torch.einsum("oc,chw->ohw", weights["loc"], loc)
            map_ = torch.cat([visual, loc.expand(batch, -1, -1, -1)], dim=1)  # [I_N; LOC]
        out = out.unsqueeze(1)  # B x 1 x O x H' x W', broadcast over words
        if self.parts["responses"]:
            responses = torch.einsum("btkc,bchw->btkhw", filters, map_)  # F_t: the K filter responses
            out = out + torch.einsum("ok,btkhw->btohw", weights["responses"], responses)
        if self.parts["words"]:
            out = out + torch.einsum("or,btr->bto", weights["words"], r)[..., None, None]
        return out

    def forward(
        self,
        visual: torch.Tensor,
        r: torch.Tensor | None,
        filters: torch.Tensor | None,
        lengths: torch.Tensor | None,
        return_steps: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> R_N (B x msru_hidden x H' x W') and, with return_steps, the mSRU output after every
        word (B x T x msru_hidden x H' x W')."""
        M = self.fuse(visual, r, filters)
        if self.msru is None:
            R = self.visual_only(M[:, 0])
            return R, (R.unsqueeze(1) if return_steps else None)
        if self.config.msru_order == "flattened":
            R = self._flattened(M, lengths)
            steps = None
            if return_steps:  # the original's R_N had the query stopped after word t
                steps = torch.stack([self._flattened(M, lengths.clamp(max=t)) for t in range(1, M.shape[1] + 1)], 1)
            return R, steps
        steps = self._per_pixel(M)
        # R_N: each sample's output at its last real word (right padding never reaches it: causal).
        last = (lengths - 1).view(-1, 1, 1, 1, 1).expand(-1, 1, *steps.shape[2:])
        R = steps.gather(1, last).squeeze(1)
        return R, (steps if return_steps else None)

    def _per_pixel(self, M: torch.Tensor) -> torch.Tensor:
        """eq. 10 as the paper means it: the pixels are the batch, the words are the sequence.
        M: B x T x C x H' x W' -> the output after every word, B x T x hidden x H' x W'."""
        batch, length, channels, height, width = M.shape
        seq = M.permute(1, 0, 3, 4, 2).reshape(length, batch * height * width, channels)
        out = self.msru(seq)  # T x (B*H'*W') x hidden
        return out.view(length, batch, height, width, -1).permute(1, 0, 4, 2, 3)

    def _flattened(self, M: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The original release: ONE sequence per image, pixel-major (for each pixel in raster order,
        its words in order), and R_N read from its LAST H'*W' steps. -> B x hidden x H' x W'.

        Batched exactly as the original ran each image alone: sample b's sequence holds its own
        H'W' x lengths[b] steps, and its padding words are moved to the end, where the causal SRU never
        lets them reach the read-out.
        """
        batch, length, channels, height, width = M.shape
        pixels = height * width
        seq = M.permute(3, 4, 1, 0, 2).reshape(pixels * length, batch, channels)  # step p*T + t
        index = original_sequence_index(lengths, length, pixels)  # (H'W'T) x B
        seq = seq.gather(0, index.unsqueeze(-1).expand(-1, -1, channels))
        out = self.msru(seq)  # (H'W'T) x B x hidden
        first = (pixels * (lengths - 1)).view(1, batch)  # where sample b's last H'W' steps start
        readout = first + torch.arange(pixels, device=M.device).view(pixels, 1)
        R = out.gather(0, readout.unsqueeze(-1).expand(-1, -1, out.shape[-1]))  # H'W' x B x hidden
        return R.permute(1, 2, 0).reshape(batch, -1, height, width)


def original_sequence_index(lengths: torch.Tensor, length: int, pixels: int) -> torch.Tensor:
    """(pixels*length) x B: for each sample, the steps p*length + t of its real words in the original's
    pixel-major order (p outer, t inner), followed by its padding steps."""
    t = torch.arange(length, device=lengths.device)
    step = torch.arange(pixels * length, device=lengths.device)
    padding = (t.repeat(pixels).unsqueeze(0) >= lengths.view(-1, 1))  # B x (pixels*length)
    key = step.unsqueeze(0) + padding * (pixels * length)  # real steps first, in order
    return key.argsort(dim=1).t()
