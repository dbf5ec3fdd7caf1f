"""Tests for SynthRef (dmn_lib/data/synthetic.py): the sample contract, determinism, split
separation, and that every expression picks out its target (checked by parsing the words back)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from dmn_lib.data import Collate, Vocabulary, tokenize
from dmn_lib.data.synthetic import (
    COLORS,
    KIND_MIX,
    LOCATION_WORDS,
    SHAPE_GROUPS,
    SHAPES,
    VARIANT_SPLITS,
    WORDS,
    SynthRef,
    description_depth,
    matching_objects,
    parse_expression,
)

SIZE = 128  # tests use the small image size
ALL_SPLITS = [(v, s) for v, splits in VARIANT_SPLITS.items() for s in splits]


def sample_digest(ds: SynthRef, i: int) -> str:
    """A hash of everything sample i is: pixels, mask, text and meta."""
    image, mask, text, meta = ds.raw(i)
    h = hashlib.sha1(image.tobytes())
    h.update(np.packbits(mask).tobytes())
    h.update(text.encode())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes():
    """(variant, split) -> [(meta, text)] for 300 samples of every split, without rendering."""
    out = {}
    for variant, split in ALL_SPLITS:
        ds = SynthRef(variant, split, image_size=SIZE)
        out[variant, split] = [ds.scene(i) for i in range(300)]
    return out


# ---- the sample contract ---------------------------------------------------------------------------
def test_sample_contract():
    ds = SynthRef("unc", "val", size=20, image_size=SIZE)
    assert len(ds) == 20
    sample = ds[3]
    assert set(sample) == {"image", "mask", "text", "meta"}
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.float32
    assert sample["image"].mean().abs() < 2  # ImageNet-normalised, not 0-255
    assert sample["mask"].shape == (1, SIZE, SIZE) and set(sample["mask"].unique().tolist()) == {0.0, 1.0}
    assert sample["text"] == ds.text(3)

    image, mask, text, meta = ds.raw(3)
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
    assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
    assert torch.equal(sample["mask"][0], torch.from_numpy(mask).float())
    json.dumps(meta)  # JSON-serialisable
    for key in ("variant", "split", "index", "seed", "objects", "target", "kind", "n_lookalikes", "description"):
        assert key in meta
    assert (meta["variant"], meta["split"], meta["index"], meta["seed"]) == ("unc", "val", 3, 0)
    assert meta["kind"] in ("attribute", "location", "relation", "stuff")
    for obj in meta["objects"]:
        assert obj["shape"] in SHAPES and obj["color"] in COLORS and obj["size"] in ("small", "large")
        assert len(obj["bbox"]) == 4 and obj["area"] > 0

    instances = ds.instance_masks(3)
    assert len(instances) == len(meta["objects"])
    assert np.array_equal(instances[meta["target"]], mask)
    assert [int(m.sum()) for m in instances] == [o["area"] for o in meta["objects"]]
    target = meta["objects"][meta["target"]]
    x0, y0, x1, y1 = target["bbox"]
    assert mask[y0:y1, x0:x1].sum() == mask.sum()  # the bbox holds the whole visible mask
    lookalikes = sum(o["shape"] == target["shape"] for o in meta["objects"]) - 1
    assert meta["n_lookalikes"] == lookalikes


def test_masks_are_visible_parts():
    """Visible masks never overlap, and the target is clearly visible."""
    ds = SynthRef("referit", "train", size=150, image_size=SIZE)
    for i in range(0, 150, 3):
        _, instances, _, meta = ds.render_sample(i)
        total = np.sum(instances, axis=0)
        assert total.max() <= 1, "two visible masks overlap"
        target = meta["objects"][meta["target"]]
        assert target["visible_fraction"] >= 0.5 and target["area"] >= 20


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="valid variants: unc, unc\\+, gref, referit"):
        SynthRef("coco")
    with pytest.raises(ValueError, match="valid splits: train, val, ambiguous"):
        SynthRef("gref", "testA")
    with pytest.raises(ValueError, match="valid splits: train, val, test, ambiguous"):
        SynthRef("referit", "testB")
    for bad in (100, 0, 32, "128", 128.0, True):
        with pytest.raises(ValueError, match="image_size"):
            SynthRef(image_size=bad)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            SynthRef(size=bad)
    with pytest.raises(ValueError, match="seed"):
        SynthRef(seed=-1)
    ds = SynthRef("unc", "val", size=10, image_size=SIZE)
    with pytest.raises(IndexError, match="out of range.*0..9"):
        ds[10]
    with pytest.raises(IndexError):
        ds.text(-11)
    with pytest.raises(TypeError):
        ds["3"]
    assert ds.text(-1) == ds.text(9)


# ---- determinism -----------------------------------------------------------------------------------
def test_same_data_in_any_order_and_any_size():
    small = SynthRef("gref", "train", size=8, image_size=SIZE)
    large = SynthRef("gref", "train", size=1000, image_size=SIZE)
    forward = [sample_digest(small, i) for i in range(8)]
    backward = [sample_digest(large, i) for i in reversed(range(8))][::-1]
    assert forward == backward
    assert len(set(forward)) == 8
    # the scene and the words do not depend on the image size
    assert [SynthRef("unc", "val", image_size=192).scene(i) for i in range(5)] == \
           [SynthRef("unc", "val", image_size=128).scene(i) for i in range(5)]
    # another seed is another dataset
    assert SynthRef("unc", "val", seed=1).scene(0) != SynthRef("unc", "val", seed=0).scene(0)


def test_same_data_in_another_process():
    """A fresh interpreter (with a different Python hash seed) makes the same samples."""
    indices = [0, 7, 123]
    code = (
        "import json, sys; sys.path.insert(0, %r)\n"
        "from test_synthetic import sample_digest\n"
        "from dmn_lib.data.synthetic import SynthRef\n"
        "ds = SynthRef('referit', 'val', image_size=%d)\n"
        "print(json.dumps([sample_digest(ds, i) for i in %r]))\n"
    ) % (os.path.dirname(__file__), SIZE, indices)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    ds = SynthRef("referit", "val", image_size=SIZE)
    assert json.loads(result.stdout) == [sample_digest(ds, i) for i in indices]


def test_same_batches_with_any_number_of_workers():
    ds = SynthRef("unc", "train", size=24, image_size=SIZE)
    vocab = Vocabulary.build(ds.text(i) for i in range(len(ds)))

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=Collate(vocab))
        return list(loader)

    serial, parallel = batches(0), batches(2)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])
        assert torch.equal(a["tokens"], b["tokens"]) and a["meta"] == b["meta"]


def test_splits_share_no_images():
    digests = {}
    for variant, split in ALL_SPLITS:
        if variant in ("unc", "referit"):
            ds = SynthRef(variant, split, image_size=SIZE)
            digests[variant, split] = {hashlib.sha1(ds.raw(i)[0].tobytes()).hexdigest() for i in range(25)}
    seen = set()
    for name, hashes in digests.items():
        assert len(hashes) == 25, f"repeated image within {name}"
        assert not hashes & seen, f"{name} shares an image with another split"
        seen |= hashes


def test_splits_share_no_scenes(scenes):
    """Stronger and cheap: no object layout appears in two splits (300 scenes of every split)."""
    owner = {}
    for name, samples in scenes.items():
        for meta, _ in samples:
            layout = json.dumps(meta["objects"], sort_keys=True)
            assert owner.setdefault(layout, name) == name, f"{name} and {owner[layout]} share a scene"


# ---- every expression picks out its target -----------------------------------------------------------
def test_every_expression_picks_out_its_target(scenes):
    for (variant, split), samples in scenes.items():
        for meta, text in samples:
            description = parse_expression(text)  # what the words say ...
            assert description == meta["description"], text  # ... is what the generator meant
            matches = matching_objects(meta, description)
            if split == "ambiguous":
                assert len(matches) >= 2 and meta["target"] in matches, (variant, text)
                assert len(matching_objects(meta, description, strict=True)) >= 2, (variant, text)
            else:
                assert matches == {meta["target"]}, (variant, split, meta["index"], text)
                assert meta["target"] in matching_objects(meta, description, strict=True)
            assert meta["matches"] == sorted(matches)


def test_verifier_on_a_handmade_scene():
    def obj(shape, color, size, x, y):
        return {"kind": "object", "shape": shape, "color": color, "size": size, "center": [x, y]}

    meta = {"objects": [obj("ring", "red", "small", 0.2, 0.2), obj("ring", "red", "large", 0.8, 0.2),
                        obj("star", "green", "small", 0.5, 0.7), obj("ring", "blue", "small", 0.5, 0.4)]}
    assert matching_objects(meta, parse_expression("the red ring")) == {0, 1}
    assert matching_objects(meta, parse_expression("the small red ring")) == {0}
    assert matching_objects(meta, parse_expression("the left ring")) == {0}
    assert matching_objects(meta, parse_expression("the ring in the middle")) == {3}
    assert matching_objects(meta, parse_expression("the bottom one")) == {2}
    # generous: every ring higher than the star could be meant, so this one is not a SynthRef expression
    assert matching_objects(meta, parse_expression("the ring above the green star")) == {0, 1, 3}
    assert matching_objects(meta, parse_expression("the star below the blue ring")) == {2}
    assert matching_objects(meta, parse_expression("the ring to the right of the blue ring")) == {1}
    assert matching_objects(meta, parse_expression(
        "please find the star below the ring that is right of the small red ring")) == {2}
    with pytest.raises(ValueError, match="unexpected word"):
        parse_expression("the purple elephant")


def test_location_words_and_vocabulary(scenes):
    # unc+ has no location words at all, in any split
    for split in VARIANT_SPLITS["unc+"]:
        for _, text in scenes["unc+", split]:
            assert not set(tokenize(text)) & LOCATION_WORDS, text
    # the other variants do use them (so the check above means something)
    assert any(set(tokenize(t)) & LOCATION_WORDS for _, t in scenes["unc", "train"])
    # the vocabulary of the training split: 60-100 words, all from the documented word list
    train = SynthRef("unc", "train", image_size=SIZE)
    vocab = Vocabulary.build(train.text(i) for i in range(2000))
    words = set(vocab.itos[2:])
    assert 60 <= len(words) <= 100, len(words)
    assert words <= WORDS


def test_testA_and_testB_differ_by_target_shape_group(scenes):
    for variant in ("unc", "unc+"):
        shapes = {split: {m["objects"][m["target"]]["shape"] for m, _ in scenes[variant, split]}
                  for split in ("train", "testA", "testB")}
        assert shapes["testA"] == set(SHAPE_GROUPS["testA"])
        assert shapes["testB"] == set(SHAPE_GROUPS["testB"])
        assert not shapes["testA"] & shapes["testB"]
        assert shapes["train"] == set(SHAPES)


def test_distribution(scenes):
    for variant in VARIANT_SPLITS:
        samples = scenes[variant, "train"]
        kinds = Counter(m["kind"] for m, _ in samples)
        for kind, share in KIND_MIX[variant].items():  # the kind mix is as documented (+-8 points)
            assert abs(kinds[kind] / len(samples) - share) < 0.08, (variant, kind, kinds)
        assert set(kinds) == set(KIND_MIX[variant])
        for meta, _ in samples:
            n_objects = sum(o["kind"] == "object" for o in meta["objects"])
            assert 3 <= n_objects <= 6
            assert len({o["shape"] for o in meta["objects"] if o["kind"] == "object"}) <= 3
            assert len({o["color"] for o in meta["objects"] if o["kind"] == "object"}) <= 3
    unc = scenes["unc", "train"]
    assert np.mean([m["n_lookalikes"] >= 1 for m, _ in unc]) > 0.6  # most targets have look-alikes
    assert np.mean([m["target"] == 0 for m, _ in unc]) < 0.35  # no favourite position in the list
    # gref: longer, with two-step relations; referit: stuff regions as targets
    length = {v: np.mean([len(tokenize(t)) for _, t in scenes[v, "train"]]) for v in VARIANT_SPLITS}
    assert length["gref"] > length["unc"] + 2
    assert any(description_depth(m["description"]) == 2 for m, _ in scenes["gref", "train"])
    stuff = [m for m, _ in scenes["referit", "train"] if m["kind"] == "stuff"]
    assert stuff and all(m["objects"][m["target"]]["kind"] == "stuff" for m in stuff)


def test_stats_script_runs():
    """scripts/synthref_stats.py (the figures in data/README.md) still runs, on a few samples."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "synthref_stats.py"
    spec = importlib.util.spec_from_file_location("synthref_stats", path)
    stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats)

    class InProcess:  # stands in for a multiprocessing pool
        map = staticmethod(lambda f, chunks: list(map(f, chunks)))

    table = stats.difficulty_table("unc", "val", 8, SIZE, 0, InProcess())
    assert "the largest object" in table and "stride 32" in table
    assert "| unc | 20 |" in stats.expression_table(20, 0, InProcess())


def test_cache_returns_the_same_samples_without_rendering_again(monkeypatch):
    from dmn_lib.data import synthetic

    plain = SynthRef("unc", "train", size=4, image_size=64)
    cached = SynthRef("unc", "train", size=4, image_size=64, cache=True)
    first = cached.raw(2)
    calls = []
    monkeypatch.setattr(synthetic, "render", lambda *a, **k: calls.append(1))  # a second rendering would fail
    again = cached.raw(2)
    assert not calls
    for a, b in zip(first[:2], again[:2]):
        np.testing.assert_array_equal(a, b)
    assert first[2:] == again[2:]
    again[0][:] = 0  # callers may modify what they get: the cache keeps its own copy
    assert cached.raw(2)[0].any()
    monkeypatch.undo()
    np.testing.assert_array_equal(plain.raw(2)[0], first[0])


def test_of_kinds_keeps_the_samples_of_those_kinds():
    from dmn_lib.data.synthetic import of_kinds

    ds = SynthRef("unc", "val", size=40, image_size=64)
    attributes = of_kinds(ds, ("attribute",))
    assert 0 < len(attributes) < len(ds) and of_kinds(ds, ()) is ds
    assert all(ds.scene(i)[0]["kind"] == "attribute" for i in attributes.indices)
    assert len(of_kinds(ds, ("attribute", "location", "relation"))) == len(ds)
    with pytest.raises(ValueError, match="Unknown expression kinds.*'place'"):
        of_kinds(ds, ("place",))
