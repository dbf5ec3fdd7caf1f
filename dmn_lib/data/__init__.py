"""Datasets for DMN: SynthRef (generated, the course's default) and the real REFER datasets.

Every dataset returns samples as dicts:
    image: float tensor 3xHxW, ImageNet-normalised   mask: float tensor 1xHxW in {0, 1}
    text:  the referring expression (str)            meta: a JSON-serialisable dict
and `raw(i)` gives (uint8 HxWx3 image, bool HxW mask, text, meta) for plots and export.
Taught in notebook 01.
"""
from dmn_lib.data.datasets import build_vocabulary, make_dataset
from dmn_lib.data.transforms import image_to_tensor, load_image, mask_to_tensor, tensor_to_image
from dmn_lib.data.vocab import PAD, UNK, Collate, Vocabulary, tokenize

__all__ = [
    "PAD", "UNK", "Collate", "Vocabulary", "tokenize", "build_vocabulary", "make_dataset",
    "image_to_tensor", "load_image", "mask_to_tensor", "tensor_to_image",
]
