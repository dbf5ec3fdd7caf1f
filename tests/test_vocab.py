"""tokenize, Vocabulary and Collate (dmn_lib/data/vocab.py)."""
from __future__ import annotations

import json

import pytest
import torch

from dmn_lib.data import PAD, UNK, Collate, Vocabulary, tokenize
from dmn_lib.data.vocab import pad_batch

TEXTS = ["The red circle", "the RED square, left of the circle!", "a small red star"]


def test_tokenize_lower_cases_and_splits_punctuation():
    assert tokenize("The man, on the RIGHT!") == ["the", "man", ",", "on", "the", "right", "!"]
    assert tokenize("  two   spaces\tand\nlines ") == ["two", "spaces", "and", "lines"]  # no space tokens
    assert tokenize("man's hat (left)") == ["man's", "hat", "(", "left", ")"]
    assert tokenize("2nd car") == ["2nd", "car"]
    assert tokenize("") == []
    with pytest.raises(TypeError):
        tokenize(None)


def test_build_orders_by_frequency_and_reserves_pad_and_unk():
    vocab = Vocabulary.build(TEXTS)
    assert vocab.itos[:2] == ["<pad>", "<unk>"] and PAD == 0 and UNK == 1
    assert vocab.itos[2:5] == ["red", "the", "circle"]  # most frequent first, ties alphabetical
    assert len(vocab) == 2 + len(set(tok for t in TEXTS for tok in tokenize(t)))
    assert "square" in vocab and "triangle" not in vocab
    rare = Vocabulary.build(TEXTS, min_count=2)
    assert rare.itos[2:] == ["red", "the", "circle"]


def test_encode_decode():
    vocab = Vocabulary.build(TEXTS)
    ids = vocab.encode("The red TRIANGLE")
    assert ids[0] == vocab.stoi["the"] and ids[1] == vocab.stoi["red"] and ids[2] == UNK
    assert vocab.decode(ids) == "the red <unk>"
    assert vocab.decode(ids + [PAD, PAD]) == "the red <unk>"  # padding is dropped


def test_strict_encode_refuses_empty_and_all_unknown_queries():
    vocab = Vocabulary.build(TEXTS)
    with pytest.raises(ValueError, match="empty"):
        vocab.encode("   ")
    with pytest.raises(ValueError, match="None of the words"):
        vocab.encode("purple hexagon")
    assert vocab.encode("purple hexagon", strict=False) == [UNK, UNK]
    assert vocab.encode("", strict=False) == []


def test_save_load_and_dict_round_trip(tmp_path):
    vocab = Vocabulary.build(TEXTS)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert json.loads(path.read_text())["itos"] == vocab.itos
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.stoi == vocab.stoi
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    with pytest.raises(ValueError, match="<pad>"):
        Vocabulary.from_dict({"itos": ["red", "the"]})
    assert vocab != Vocabulary(["red"]) and "Vocabulary(" in repr(vocab)


def test_pad_batch_right_pads_with_zero():
    tokens, lengths = pad_batch([[5, 6, 7], [8], [9, 10]])
    assert tokens.dtype == torch.long and lengths.dtype == torch.long
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert lengths.tolist() == [3, 1, 2]


def test_collate_stacks_and_pads_mixed_lengths():
    vocab = Vocabulary.build(TEXTS)
    texts = ["the red circle", "red", "a small red star , left", "purple hexagon"]
    samples = [
        {"image": torch.full((3, 4, 4), float(i)), "mask": torch.zeros(1, 4, 4), "text": t, "meta": {"i": i}}
        for i, t in enumerate(texts)
    ]
    collate = Collate(vocab)
    batch = collate(samples)
    assert batch["images"].shape == (4, 3, 4, 4) and batch["images"][2, 0, 0, 0] == 2.0
    assert batch["masks"].shape == (4, 1, 4, 4)
    assert batch["lengths"].tolist() == [3, 1, 6, 2]
    assert batch["tokens"].shape == (4, 6)
    for row, text in enumerate(texts):
        n = batch["lengths"][row]
        assert batch["tokens"][row, :n].tolist() == vocab.encode(text, strict=False)
        assert (batch["tokens"][row, n:] == PAD).all()  # right padding
    assert batch["texts"] == texts and [m["i"] for m in batch["meta"]] == [0, 1, 2, 3]
    assert collate.all_unknown == 1  # "purple hexagon"
    empty = collate([{**samples[0], "text": ""}])
    assert empty["tokens"].tolist() == [[UNK]] and empty["lengths"].tolist() == [1]  # kept aligned
