"""ReferDataset, export_refer and data/download_refer.sh on format-exact fixtures (tests/refer_fixtures.py)."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from refer_fixtures import compressed_rle, disk, make_refer_root, py2_pickle, rect, rect_polygon, uncompressed_rle  # noqa: E402

from dmn_lib.data import Collate, Vocabulary  # noqa: E402
from dmn_lib.data.refer import DEFAULT_SPLIT_BY, SPLITS, ReferDataset, decode_segmentation, export_refer, load_refs  # noqa: E402
from dmn_lib.data.transforms import image_to_tensor, resize_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "download_refer.sh"
ALL_SPLITS = [(f, sb, s) for f, schemes in SPLITS.items() for sb, splits in schemes.items() for s in splits]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Every dataset and split scheme, built once (read-only for the tests that use it)."""
    return make_refer_root(tmp_path_factory.mktemp("refer"))


# ------------------------------------------------------------------------------------------------
# Reading every dataset / split scheme / split
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder,split_by,split", ALL_SPLITS)
def test_every_split_reads_back_what_was_drawn(fx, folder, split_by, split):
    ds = ReferDataset(fx.root, folder, split, split_by=split_by, image_size=None)
    expected = fx.expected[(folder, split_by, split)]
    assert len(ds) == len(expected)  # one sample per sentence
    assert ds.texts == [e["text"] for e in expected]
    for i, e in enumerate(expected):
        image, mask, text, meta = ds.raw(i)
        assert text == e["text"]
        assert mask.dtype == bool and np.array_equal(mask, fx.masks[(folder, e["ann_id"])])
        saved = fx.images[(folder, e["image_id"])]
        assert image.dtype == np.uint8 and image.shape == saved.shape[:2] + (3,)
        if saved.ndim == 2:  # grayscale file: three identical channels
            assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
            saved = np.repeat(saved[:, :, None], 3, axis=2)
        assert np.abs(image.astype(int) - saved.astype(int)).mean() < 4  # JPEG, quality 95
        for key in ("ref_id", "ann_id", "image_id", "sent_id"):
            assert meta[key] == e[key]
        assert (meta["dataset"], meta["split"], meta["split_by"]) == (folder, split, split_by)
        assert meta["category_id"] in (1, 2, 3) and meta["category"] in ("person", "chair", "dog")
        assert meta["file_name"].endswith(".jpg")
        json.dumps(meta)  # JSON-serialisable


def test_fixture_covers_every_segmentation_form_and_grayscale(fx):
    instances = {f: json.loads((fx.root / f / "instances.json").read_text()) for f in SPLITS}
    segs = [a["segmentation"] for d in instances.values() for a in d["annotations"]]
    assert any(isinstance(s, list) and len(s) == 1 and isinstance(s[0], list) for s in segs)  # polygon
    assert any(isinstance(s, list) and len(s) == 2 and isinstance(s[0], list) for s in segs)  # multi-part
    assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segs)  # uncompressed RLE
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs)  # compressed RLE
    assert any(isinstance(s, list) and isinstance(s[0], dict) for s in segs)  # refclef: list of RLEs
    assert any(a.ndim == 2 for a in fx.images.values())  # grayscale images
    ds = ReferDataset(fx.root, "unc", "train", image_size=None)
    assert max(len(r["sentences"]) for r in ds.refs) > 1  # several sentences per ref


def test_names_and_default_split_schemes(fx):
    for name, folder, split_by in [("unc", "refcoco", "unc"), ("unc+", "refcoco+", "unc"),
                                   ("gref", "refcocog", "umd"), ("referit", "refclef", "berkeley"),
                                   ("refcoco", "refcoco", "unc"), ("refcocog", "refcocog", "umd"),
                                   ("REFCLEF", "refclef", "berkeley")]:
        ds = ReferDataset(fx.root, name, "val", image_size=None)
        assert (ds.dataset, ds.split_by) == (folder, split_by)
        assert DEFAULT_SPLIT_BY[folder] == split_by
    assert ReferDataset(fx.root, "gref", "val", split_by="google").split_by == "google"


def test_python2_pickle_with_utf8_bytes_is_decoded(fx):
    refs = load_refs(fx.root / "refcoco" / "refs(unc).p")  # written in Python 2's exact format
    assert all(isinstance(k, str) for r in refs for k in r)
    assert "the café table , left of the man" in ReferDataset(fx.root, "unc", "train").texts


def test_refclef_unc_test_refs_can_belong_to_two_test_sets(fx):
    # A ref stored with split "testAB" is in testA and in testB (as in lichengunc/refer).
    a = ReferDataset(fx.root, "referit", "testA", split_by="unc", image_size=None)
    b = ReferDataset(fx.root, "referit", "testB", split_by="unc", image_size=None)
    shared = {r["ref_id"] for r in a.refs} & {r["ref_id"] for r in b.refs}
    assert len(shared) == 1


def test_getitem_follows_the_sample_contract(fx):
    ds = ReferDataset(fx.root, "unc", "train", image_size=None)
    sample = ds[0]
    image, mask, text, meta = ds.raw(0)
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3,) + image.shape[:2]
    assert torch.allclose(sample["image"], image_to_tensor(image))
    assert sample["mask"].shape == (1,) + mask.shape and set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(sample["mask"][0].bool(), torch.from_numpy(mask))
    assert sample["text"] == text and sample["meta"] == meta
    assert "refcoco" in repr(ds) and "sentences" in repr(ds)


def test_resize_to_a_square_so_batches_stack(fx):
    ds = ReferDataset(fx.root, "gref", "train", image_size=16)
    native = ReferDataset(fx.root, "gref", "train", image_size=None)
    for i in range(len(ds)):
        image, mask, _, _ = ds.raw(i)
        image0, mask0, _, _ = native.raw(i)
        assert image.shape == (16, 16, 3) and mask.shape == (16, 16)
        want_image, want_mask = resize_pair(image0, mask0, 16)  # bilinear image, nearest mask
        assert np.array_equal(image, want_image) and np.array_equal(mask, want_mask)
    shapes = {native.raw(i)[0].shape for i in range(len(native))}
    assert len(shapes) > 1  # image_size=None keeps every image's own size

    vocab = Vocabulary.build(ds.texts)
    batch = Collate(vocab)([ds[i] for i in range(len(ds))])
    assert batch["images"].shape == (len(ds), 3, 16, 16) and batch["masks"].shape == (len(ds), 1, 16, 16)


def test_image_size_must_be_positive(fx):
    with pytest.raises(ValueError, match="image_size"):
        ReferDataset(fx.root, "unc", "train", image_size=0)


# ------------------------------------------------------------------------------------------------
# Masks: every segmentation form
# ------------------------------------------------------------------------------------------------
def test_decode_segmentation_forms():
    h, w = 20, 24
    a, b = (2, 7, 3, 9), (12, 18, 14, 22)
    assert np.array_equal(decode_segmentation([rect_polygon(*a)], h, w), rect(h, w, *a))
    two = decode_segmentation([rect_polygon(*a), rect_polygon(*b)], h, w)
    assert np.array_equal(two, rect(h, w, *a) | rect(h, w, *b))  # union of the parts
    blob = disk(h, w, 10, 12, 5)
    assert np.array_equal(decode_segmentation(uncompressed_rle(blob), h, w), blob)
    assert np.array_equal(decode_segmentation(compressed_rle(blob), h, w), blob)
    parts = decode_segmentation([compressed_rle(blob), compressed_rle(rect(h, w, *a))], h, w)
    assert np.array_equal(parts, blob | rect(h, w, *a))
    # Overlapping parts: still a plain union, not a sum.
    assert np.array_equal(decode_segmentation([rect_polygon(*a), rect_polygon(*a)], h, w), rect(h, w, *a))
    assert not decode_segmentation([], h, w).any()
    assert not decode_segmentation([[1.0, 2.0, 3.0, 4.0]], h, w).any()  # degenerate polygon skipped
    with pytest.raises(ValueError, match="does not match"):
        decode_segmentation(compressed_rle(blob), h + 1, w)
    with pytest.raises(ValueError):
        decode_segmentation("not a segmentation", h, w)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ------------------------------------------------------------------------------------------------
def test_unknown_dataset_split_or_split_by_lists_the_valid_ones(fx):
    with pytest.raises(ValueError, match=r"'unc'.*'unc\+'.*'gref'.*'referit'"):
        ReferDataset(fx.root, "flickr30k", "train")
    with pytest.raises(ValueError, match=r"'train', 'val', 'testA', 'testB'"):
        ReferDataset(fx.root, "unc", "test")
    with pytest.raises(ValueError, match=r"'google', 'umd'"):
        ReferDataset(fx.root, "gref", "train", split_by="unc")
    with pytest.raises(ValueError, match=r"'train', 'val'\."):
        ReferDataset(fx.root, "gref", "test", split_by="google")
    with pytest.raises(ValueError, match=r"'unc', 'berkeley'"):
        ReferDataset(fx.root, "referit", "train", split_by="umd")


def test_missing_folder_or_file_names_the_layout_and_the_script(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ReferDataset(tmp_path / "nowhere", "unc", "train")
    message = str(err.value)
    assert "refcoco" in message and "refs(unc).p" in message and "images/mscoco/images/train2014" in message
    assert "download_refer.sh" in message

    fx = make_refer_root(tmp_path / "r", datasets=("refcocog",))
    (fx.root / "refcocog" / "refs(umd).p").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)refs\(umd\)\.p.*refs\(google\)\.p.*download_refer\.sh"):
        ReferDataset(fx.root, "gref", "train")
    (fx.root / "refcocog" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)instances\.json.*download_refer\.sh"):
        ReferDataset(fx.root, "gref", "train", split_by="google")
    make_refer_root(tmp_path / "r", datasets=("refcocog",))
    shutil.rmtree(fx.root / "images")
    with pytest.raises(FileNotFoundError, match=r"(?s)images/mscoco/images/train2014.*download_refer\.sh"):
        ReferDataset(fx.root, "gref", "train")


class RunsAShellCommand:
    """Unpickling this calls os.system: what a malicious refs file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_refs_pickle_is_refused_without_running_code(tmp_path, protocol):
    fx = make_refer_root(tmp_path / "r", datasets=("refcoco",))
    marker = tmp_path / "pwned"
    payload = pickle.dumps([{"ref_id": RunsAShellCommand(marker), "ann_id": 1}], protocol=protocol)
    assert b"system" in payload  # the pickle really asks for os.system
    (fx.root / "refcoco" / "refs(unc).p").write_bytes(payload)
    with pytest.raises(ValueError, match=r"Refusing to load .*refs\(unc\)\.p.*(posix|os|nt)\.system"):
        ReferDataset(fx.root, "unc", "train")
    assert not marker.exists()


def test_refs_pickle_must_be_plain_refs(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="not a REFER refs file"):
        load_refs(path)
    path.write_bytes(pickle.dumps({1, 2}, protocol=2))  # a set needs a global (builtins.set) in protocol 2
    with pytest.raises(ValueError, match="Refusing"):
        load_refs(path)
    path.write_bytes(b"\x80\x02]q\x00(")  # truncated
    with pytest.raises(ValueError, match="Could not read"):
        load_refs(path)
    refs = [{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "train", "sentences": [], "x": (1.5, None, True)}]
    path.write_bytes(py2_pickle(refs))
    assert load_refs(path) == refs


def test_truncated_or_wrong_image_names_the_file(tmp_path):
    fx = make_refer_root(tmp_path / "r", datasets=("refcoco+",))
    ds = ReferDataset(fx.root, "unc+", "train", image_size=None)
    image_id = ds.raw(0)[3]["image_id"]
    path = fx.files[("refcoco+", image_id)]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path.name}.*truncated"):
        ds.raw(0)
    Image.new("RGB", (5, 7)).save(path)  # a readable image of the wrong size
    with pytest.raises(ValueError, match=rf"{path.name}.*instances.json"):
        ds[0]
    path.unlink()
    with pytest.raises(FileNotFoundError, match=path.name):
        ds[0]


def test_empty_split_says_which_splits_the_file_has(tmp_path):
    fx = make_refer_root(tmp_path / "r", datasets=("refcoco",))
    path = fx.root / "refcoco" / "refs(unc).p"
    refs = [r for r in load_refs(path) if r["split"] != "val"]
    path.write_bytes(pickle.dumps(refs))
    with pytest.raises(ValueError, match="no refs in split 'val'.*testA"):
        ReferDataset(fx.root, "unc", "val")


# ------------------------------------------------------------------------------------------------
# export_refer: any dataset with raw(i) -> the REFER layout -> ReferDataset
# ------------------------------------------------------------------------------------------------
class TinyDataset:
    """Stands in for SynthRef: raw(i) -> (uint8 HxWx3, bool HxW, text, meta)."""

    def __init__(self, n: int, seed: int, size=(18, 22)):
        rng = np.random.default_rng(seed)
        h, w = size
        self.items = []
        for i in range(n):
            image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            mask = disk(h, w, rng.integers(4, h - 4), rng.integers(4, w - 4), rng.integers(2, 5))
            self.items.append((image, mask, f"the red shape number {seed} {i}", {"index": i}))

    def __len__(self):
        return len(self.items)

    def raw(self, i):
        return self.items[i]


def test_export_round_trip_several_splits_in_one_refs_file(tmp_path):
    splits = {"train": TinyDataset(5, 0), "val": TinyDataset(3, 1),
              "testA": TinyDataset(2, 2), "testB": TinyDataset(2, 3)}
    folder = export_refer(tmp_path, "unc", splits, progress=False)
    assert folder == tmp_path / "refcoco"
    assert sorted(p.name for p in folder.iterdir()) == ["instances.json", "refs(unc).p"]
    for split, source in splits.items():
        ds = ReferDataset(tmp_path, "unc", split, image_size=None)
        assert len(ds) == len(source)
        for i in range(len(ds)):
            image, mask, text, meta = ds.raw(i)
            want_image, want_mask, want_text, _ = source.raw(i)
            assert np.array_equal(image, want_image) and np.array_equal(mask, want_mask) and text == want_text
            assert meta["file_name"].endswith(".png")
    instances = json.loads((folder / "instances.json").read_text())
    assert isinstance(instances["annotations"][0]["segmentation"]["counts"], str)  # compressed RLE
    assert {im["id"] for im in instances["images"]} == {a["image_id"] for a in instances["annotations"]}


def test_export_refuses_to_overwrite_and_validates_splits(tmp_path):
    export_refer(tmp_path, "referit", {"train": TinyDataset(2, 0)}, progress=False)  # berkeley by default
    assert (tmp_path / "refclef" / "refs(berkeley).p").is_file()
    assert next((tmp_path / "images" / "saiapr_tc-12").glob("*/images/*.png"))  # SAIAPR-style names
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_refer(tmp_path, "referit", {"val": TinyDataset(2, 1)}, progress=False)
    export_refer(tmp_path, "referit", {"testC": TinyDataset(2, 1)}, split_by="unc", overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "refclef").iterdir()) == ["instances.json", "refs(unc).p"]
    assert len(ReferDataset(tmp_path, "referit", "testC", split_by="unc")) == 2
    with pytest.raises(ValueError, match="'train', 'val'"):
        export_refer(tmp_path, "gref", {"test": TinyDataset(1, 0)}, split_by="google", progress=False)
    bad = TinyDataset(1, 0)
    bad.items[0] = (bad.items[0][0][:5], *bad.items[0][1:])
    with pytest.raises(ValueError, match="differ in size"):
        export_refer(tmp_path / "other", "unc", {"train": bad}, progress=False)
    with pytest.raises(ValueError, match="image_format"):
        export_refer(tmp_path, "gref", {"train": TinyDataset(1, 0)}, image_format="gif", progress=False)


def test_export_as_jpeg_and_re_export_of_a_refer_dataset(fx, tmp_path):
    source = ReferDataset(fx.root, "unc", "val", image_size=None)
    export_refer(tmp_path, "unc+", {"val": source}, image_format="jpg", progress=False)
    ds = ReferDataset(tmp_path, "unc+", "val", image_size=None)
    assert ds.texts == source.texts
    for i in range(len(ds)):
        image, mask, _, _ = ds.raw(i)
        image0, mask0, _, _ = source.raw(i)
        assert np.array_equal(mask, mask0) and np.abs(image.astype(int) - image0.astype(int)).mean() < 4


def test_synthref_round_trip(tmp_path):
    synthetic = pytest.importorskip("dmn_lib.data.synthetic", reason="SynthRef not written yet")
    size = 64
    for variant, splits in [("unc", ("train", "val", "testA", "testB")), ("unc+", ("train", "val", "testA", "testB")),
                            ("gref", ("train", "val")), ("referit", ("train", "val", "test"))]:
        sources = {s: synthetic.SynthRef(variant, s, size=24, image_size=size, seed=0) for s in splits}
        export_refer(tmp_path, variant, sources, progress=False)
        for split, source in sources.items():
            ds = ReferDataset(tmp_path, variant, split, image_size=None)
            assert len(ds) == len(source) == 24
            for i in range(len(ds)):
                image, mask, text, _ = ds.raw(i)
                want_image, want_mask, want_text, _ = source.raw(i)
                assert text == want_text
                assert np.array_equal(mask, np.asarray(want_mask, dtype=bool))
                assert np.array_equal(image, np.asarray(want_image))


# ------------------------------------------------------------------------------------------------
# data/download_refer.sh (cannot reach the internet here: dry run, and a run with a fake curl)
# ------------------------------------------------------------------------------------------------
def run_script(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_download_script_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    root = tmp_path / "refer"
    result = run_script("--dry-run", "--root", str(root))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for url in ["licheng/referit/data/refcoco.zip", "refcoco+.zip", "refcocog.zip", "refclef.zip",
                "images.cocodataset.org/zips/train2014.zip", "images/saiapr_tc-12.zip", "web.archive.org"]:
        assert url in out
    assert f"{root}/images/mscoco/images" in out and "13 GB" in out
    assert not root.exists()

    fx = make_refer_root(root, datasets=("refcoco", "refclef"))
    result = run_script("--dry-run", "--root", str(fx.root), "--only", "refcoco,refclef,refcocog")
    assert result.returncode == 0
    assert "[skip] refcoco:" in result.stdout and "[skip] refclef:" in result.stdout
    assert "[would download] refcocog" in result.stdout and "train2014.zip" not in result.stdout

    assert run_script("--only", "flickr", "--dry-run").returncode == 2
    assert "Usage" in run_script("--help").stdout


@pytest.mark.skipif(shutil.which("unzip") is None, reason="needs unzip")
def test_download_script_downloads_extracts_and_is_idempotent(tmp_path):
    # A fake `curl` that "downloads" from a local folder of zips, to test the real code path offline.
    mirror, bin_dir, root = tmp_path / "mirror", tmp_path / "bin", tmp_path / "refer"
    fx = make_refer_root(tmp_path / "made", datasets=("refcoco",))
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "refcoco.zip", "w") as z:
        for path in (fx.root / "refcoco").iterdir():
            z.write(path, f"refcoco/{path.name}")
    bin_dir.mkdir()
    fake = bin_dir / "curl"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'while [[ $# -gt 0 ]]; do case "$1" in -o) out="$2"; shift 2;; -C) shift 2;; --retry) shift 2;;'
        ' -*) shift;; *) url="$1"; shift;; esac; done\n'
        f'echo "$url" >> "{tmp_path}/calls"\n'
        f'cp "{mirror}/$(basename "$url")" "$out"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    result = run_script("--root", str(root), "--only", "refcoco", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "refcoco" / "refs(unc).p").is_file() and (root / "refcoco" / "refs(google).p").is_file()
    assert not (root / "downloads" / "refcoco.zip").exists()  # zips are removed unless --keep-zips
    result = run_script("--root", str(root), "--only", "refcoco", env=env)
    assert "[skip] refcoco" in result.stdout
    assert (tmp_path / "calls").read_text().count("refcoco.zip") == 1  # downloaded once


class _Oracle(torch.nn.Module):
    """A 'model' whose logits are the (resized) ground truth of the batch: IoU 1 at its own size."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, tokens, lengths, return_low_res=False, stage="high"):
        logits = self.masks * 20 - 10
        return (logits, logits[..., ::32, ::32]) if return_low_res else logits


def test_iou_is_measured_at_each_images_original_size(fx):
    """On real data the network sees a square image; IoU is measured back at the image's own size."""
    from dmn_lib.inference import evaluate
    from dmn_lib.runtime import make_loader

    ds = ReferDataset(fx.root, "unc", "val", image_size=64)
    vocab = Vocabulary.build(ds.texts)
    model, loader = _Oracle(), make_loader(ds, vocab, batch_size=len(ds))
    model.masks = next(iter(loader))["masks"].float()
    areas = [int(ds.original_mask(i).sum()) for i in range(len(ds))]  # pixels of each image's own mask
    sizes = {ds.original_mask(i).shape for i in range(len(ds))}
    assert all(size != (64, 64) for size in sizes)
    at_own_size = evaluate(model, loader, threshold=0.5, original_size=True)["sweep"]
    at_64 = evaluate(model, loader, threshold=0.5, original_size=False)["sweep"]
    k = int(np.searchsorted(at_own_size.thresholds, 0.5))
    assert at_own_size.unions[:, k].tolist() == areas  # counted on the original pixels, exactly
    assert at_own_size.summary(0.5)["cum_iou"] == at_64.summary(0.5)["cum_iou"] == 1.0
    assert at_64.unions[:, k].sum() > sum(areas)  # the 64 x 64 masks have more pixels than these small images
