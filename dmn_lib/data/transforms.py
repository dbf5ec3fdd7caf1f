"""Image and mask conversions shared by every dataset and by `predict`.

Images reach the model as float tensors 3xHxW normalised with ImageNet statistics (what timm
backbones expect); masks as float tensors 1xHxW in {0, 1}. Taught in notebook 01.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUPPORTED_MODES = ("RGB", "L")  # grayscale is replicated to three channels


def image_to_tensor(image: np.ndarray | Image.Image) -> torch.Tensor:
    """uint8 HxWx3 (or HxW grayscale) array / PIL image -> normalised float tensor 3xHxW."""
    if isinstance(image, Image.Image):
        image = np.asarray(check_image_mode(image).convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"Expected an HxWx3 RGB or HxW grayscale image, got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"Expected uint8 pixels (0-255), got {array.dtype}")
    # copy: arrays from PIL are read-only, and torch must not share memory it may not write
    tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `image_to_tensor`: normalised 3xHxW -> uint8 HxWx3 (for plots)."""
    mean = torch.tensor(IMAGENET_MEAN, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tensor.device).view(3, 1, 1)
    rgb = (tensor.detach().float() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """bool/uint8 HxW -> float 1xHxW in {0, 1}."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(mask) > 0)).float().unsqueeze(0)


def check_image_mode(image: Image.Image, source: str = "image") -> Image.Image:
    """Accept RGB and grayscale (L) images; refuse others with the fix."""
    if image.mode not in SUPPORTED_MODES:
        raise ValueError(
            f"{source} has mode {image.mode!r}; DMN takes RGB or grayscale ('L') images. "
            f"Convert it first, e.g. Image.open(path).convert('RGB')"
        )
    return image


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            image = img.copy()
    except Exception as err:  # PIL raises several types for truncated / non-image files
        raise ValueError(f"Could not read image {path}: {err} (is the file truncated or not an image?)") from err
    return check_image_mode(image, source=str(path)).convert("RGB")


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an image (bilinear) and its mask (nearest) to size x size."""
    img = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    if mask is None:
        return img, None
    m = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return img, m
