"""Words to integers: `tokenize`, `Vocabulary` and the batch `Collate` (right padding + lengths).

Taught in notebook 04. The original DMN code turned every space into an `<unk>` token; we use
plain word tokens: lower-case, punctuation split off, `<pad>` = 0, `<unk>` = 1.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

PAD, UNK = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """'The man, on the RIGHT!' -> ['the', 'man', ',', 'on', 'the', 'right', '!']"""
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a string, got {type(text).__name__}")
    return _TOKEN_RE.findall(text.lower())


class Vocabulary:
    """A word list; index 0 is `<pad>` and 1 is `<unk>`."""

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = [PAD_TOKEN, UNK_TOKEN]
        for word in words:
            if word not in (PAD_TOKEN, UNK_TOKEN) and word not in self.itos:
                self.itos.append(word)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> "Vocabulary":
        """Words of a training split seen at least `min_count` times, most frequent first."""
        counts = Counter(tok for text in texts for tok in tokenize(text))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words: {' '.join(self.itos[2:12])} ...)"

    def encode(self, text: str, strict: bool = True) -> list[int]:
        """Token ids of `text`. With strict=True an empty or all-unknown query is an error."""
        ids = [self.stoi.get(tok, UNK) for tok in tokenize(text)]
        if strict:
            if not ids:
                raise ValueError("The query is empty: type a referring expression such as 'the red circle'")
            if all(i == UNK for i in ids):
                sample = ", ".join(self.itos[2:14])
                raise ValueError(
                    f"None of the words in {text!r} is in the model's vocabulary ({len(self)} words, e.g. "
                    f"{sample}); rephrase the query with known words"
                )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i != PAD)

    # --- saved inside checkpoints and next to results ---------------------------------------------
    def to_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        itos = d["itos"]
        if itos[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError("Not a DMN vocabulary: it must start with '<pad>', '<unk>'")
        return cls(itos[2:])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_dict(json.loads(Path(path).read_text()))


def pad_batch(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists with PAD: returns tokens BxT (long) and lengths B (long)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max()) if len(sequences) else 0), PAD, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, lengths


class Collate:
    """DataLoader collate_fn: stacks images and masks, tokenizes and right-pads the queries.

    A query with no known word keeps one `<unk>` token (so the batch stays aligned); the count of
    such samples is kept in `self.all_unknown` so evaluation can report it.
    """

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.all_unknown = 0

    def __call__(self, samples: list[dict]) -> dict:
        ids = []
        for s in samples:
            seq = self.vocab.encode(s["text"], strict=False) or [UNK]
            self.all_unknown += all(i == UNK for i in seq)
            ids.append(seq)
        tokens, lengths = pad_batch(ids)
        return {
            "images": torch.stack([s["image"] for s in samples]),
            "masks": torch.stack([s["mask"] for s in samples]),
            "tokens": tokens,
            "lengths": lengths,
            "texts": [s["text"] for s in samples],
            "meta": [s.get("meta", {}) for s in samples],
        }
