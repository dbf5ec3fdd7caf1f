"""The Dynamic Multimodal Network (paper §3.1, Fig. 2): VM + LM -> SM -> UM.

    logits = DMN(config)(images, tokens, lengths)      # B x 1 x H x W; sigmoid -> mask

Taught across notebooks 02-06 (one module each) and assembled from them at the end of notebook 06 (MyDMN);
trained in notebook 07.
"""
from __future__ import annotations

import torch
from torch import nn

from dmn_lib.config import DMNConfig
from dmn_lib.models.language import LanguageModule
from dmn_lib.models.synthesis import LOC_CHANNELS, SynthesisModule
from dmn_lib.models.upsampling import UpsamplingModule
from dmn_lib.models.visual import VisualModule


class DMN(nn.Module):
    def __init__(self, config: DMNConfig):
        super().__init__()
        self.config = config
        self.visual = VisualModule(config)
        top_channels = self.visual.channels[-1]  # I_N
        if config.use_language:
            filter_channels = top_channels + (LOC_CHANNELS if config.use_loc else 0)
            self.language = LanguageModule(config, filter_channels)
            r_size = self.language.r_size
        else:
            self.language, r_size = None, 0  # "Only VM": the query is never read
        self.synthesis = SynthesisModule(config, top_channels, r_size)
        self.upsampling = UpsamplingModule(config, self.visual.channels)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        stage: str = "high",
        return_low_res: bool = False,
        return_steps: bool = False,
    ):
        """images B x 3 x H x W (normalised); tokens B x T (right-padded with 0); lengths B.

        stage="low"          -> low-res logits only (B x 1 x H/2^N x W/2^N): training stage 1 (§4.3)
        return_low_res=True  -> (logits, low-res logits)
        return_steps=True    -> (logits, step logits B x T x 1 x H x W: the mask after each word)
        """
        if stage not in ("low", "high"):
            raise ValueError(f"stage must be 'low' or 'high', got {stage!r}")
        tokens, lengths = self.check_inputs(images, tokens, lengths)
        features = self.visual(images)
        r = filters = None
        if self.language is not None:
            r, filters = self.language(tokens)
        R, steps = self.synthesis(features[-1], r, filters, lengths, return_steps=return_steps)
        low = self.synthesis.low_res_head(R)
        if stage == "low":
            return low
        size = tuple(images.shape[-2:])
        logits = self.upsampling(R, features, size)
        outputs = [logits]
        if return_low_res:
            outputs.append(low)
        if return_steps:
            outputs.append(self._upsample_steps(steps, features, size))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _upsample_steps(self, steps: torch.Tensor, features: list[torch.Tensor], size) -> torch.Tensor:
        """Run the UM on the mSRU output after every word (for 'the mask word by word')."""
        batch, length = steps.shape[:2]
        repeated = [f.repeat_interleave(length, dim=0) for f in features]
        out = self.upsampling(steps.flatten(0, 1), repeated, size)
        return out.view(batch, length, *out.shape[1:])

    def check_inputs(self, images, tokens, lengths):
        """Clear errors for wrong inputs, instead of a shape error deep inside a conv."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a B x 3 x H x W tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be float and normalised (dmn_lib.data.image_to_tensor), got {images.dtype}"
            )
        stride = self.config.stride
        height, width = images.shape[-2:]
        if min(height, width) < stride:
            raise ValueError(
                f"Image of {height}x{width} pixels is too small: the backbone downsamples by {stride} "
                f"(num_scales={self.config.num_scales}); resize it to at least {stride}x{stride} "
                f"(the course uses 128-192 px)."
            )
        if self.language is None:
            return tokens, torch.ones(images.shape[0], dtype=torch.long, device=images.device)
        if tokens is None or lengths is None:
            raise ValueError("This model reads the query: pass tokens (B x T) and lengths (B)")
        if tokens.dim() != 2 or tokens.shape[0] != images.shape[0]:
            raise ValueError(f"tokens must be B x T with B={images.shape[0]}, got {tuple(tokens.shape)}")
        if tokens.dtype != torch.long:
            raise ValueError(f"tokens must be torch.long ids, got {tokens.dtype}")
        lengths = torch.as_tensor(lengths, device=tokens.device)
        if lengths.shape != (tokens.shape[0],):
            raise ValueError(f"lengths must have one entry per sample ({tokens.shape[0]}), got {tuple(lengths.shape)}")
        if (lengths < 1).any():
            raise ValueError("A query is empty (length 0): every sample needs at least one word")
        if (lengths > tokens.shape[1]).any():
            raise ValueError(f"lengths {lengths.tolist()} exceed the token matrix width {tokens.shape[1]}")
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise ValueError(
                f"Token ids must be in [0, {self.config.vocab_size}); got up to {int(tokens.max())}. "
                "Were the queries encoded with a different vocabulary than this model's?"
            )
        return tokens, lengths
