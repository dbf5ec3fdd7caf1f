"""A `DataSpec` made real: the splits of SynthRef or of a REFER dataset, and the training vocabulary.

Defined in notebook 01, §1 (SynthRef's splits) and notebook 04, §1 (the vocabulary of the training split).

    from dmn_lib.data.datasets import build_vocabulary, make_dataset
    train_set = make_dataset(spec.data, "train")          # spec.data.train_size samples
    vocab = build_vocabulary(train_set)                    # the model's vocab_size is len(vocab)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from torch.utils.data import Dataset

from dmn_lib.data.vocab import Vocabulary

__all__ = ["make_dataset", "split_size", "dataset_texts", "build_vocabulary"]


def split_size(data, split: str) -> int | None:
    """How many samples of `split` a DataSpec asks for: train_size, val_size, or test_size for the others
    (None = the whole split). Notebook 01, §4."""
    size = {"train": data.train_size, "val": data.val_size}.get(split, data.test_size)
    return size or None


def make_dataset(data, split: str, size: int | None = None) -> Dataset:
    """Split `split` of the data a `DataSpec` names, `size` samples (default: `split_size`). A missing
    REFER folder is an error that says where to get the data. Notebook 01, §4."""
    size = split_size(data, split) if size is None else size
    if data.source == "synthref":
        from dmn_lib.data.synthetic import SynthRef

        cache = data.cache and split == "train"  # the split a run reads more than once
        return SynthRef(data.variant, split, size=size, image_size=data.image_size, seed=data.data_seed, cache=cache)
    from dmn_lib.data.refer import ReferDataset

    root = Path(data.data_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"REFER data not found: {root} does not exist. Put the datasets there in the layout of "
            "data/README.md ('Real datasets'), e.g. with `bash data/download_refer.sh --root "
            f"{root}`, or pass --data-root DIR. (Without real data use --data synthref.)"
        )
    dataset = ReferDataset(root, data.dataset, split, split_by=data.split_by, image_size=data.image_size)
    return _First(dataset, size) if size is not None and size < len(dataset) else dataset


class _First(Dataset):
    """The first `size` samples of a dataset (keeps `.texts` for the vocabulary)."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, size
        self.texts = list(dataset.texts[:size])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        return self.dataset[i]


def dataset_texts(dataset: Dataset) -> Iterable[str]:
    """Every query of a dataset, cheaply when it can (SynthRef.text(i), ReferDataset.texts). Notebook 04, §1."""
    if hasattr(dataset, "texts"):
        return list(dataset.texts)
    if hasattr(dataset, "text"):
        return [dataset.text(i) for i in range(len(dataset))]
    return [dataset[i]["text"] for i in range(len(dataset))]  # loads every image: slow


def build_vocabulary(dataset: Dataset, min_count: int = 1) -> Vocabulary:
    """The vocabulary of a training split (the model's vocab_size is len(vocab)). Notebook 04, §1."""
    return Vocabulary.build(dataset_texts(dataset), min_count=min_count)
