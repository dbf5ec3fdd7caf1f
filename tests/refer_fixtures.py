"""Small, format-exact REFER fixtures (lichengunc/refer layout) built in a temporary folder.

No real dataset can be downloaded where the tests run, so these files mimic the released ones
byte-for-byte in structure: COCO-style instances.json, refs(<split_by>).p pickles (some written in
the exact Python 2 protocol-2 format of the originals, byte strings included), COCO JPEG names
under images/mscoco/images/train2014/ and SAIAPR NN/images/ID.jpg names under images/saiapr_tc-12/.
Every mask is drawn here first (numpy), then stored as the segmentation forms the real files use:
polygons, multi-part polygons, uncompressed RLE (COCO crowd regions), compressed RLE strings and
refclef's list of compressed RLEs. Tests compare the loader's masks with the drawn ones.
"""
from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from dmn_lib.data.refer import IMAGE_DIRS, SPLITS

COCO_KINDS = ("polygon", "multipolygon", "rle_uncompressed", "rle_compressed")
CLEF_KINDS = ("rle_list", "rle_compressed", "polygon", "rle_list")
# (height, width, grayscale) of the images of every dataset: portrait, landscape and grayscale.
IMAGE_SHAPES = ((24, 32, False), (30, 20, False), (24, 32, True), (26, 34, False))
PY2_PICKLES = {("refcoco", "unc"), ("refclef", "unc"), ("refclef", "berkeley")}


# ------------------------------------------------------------------------------------------------
# Python 2 pickles: what `pickle.dump(refs, f)` wrote under Python 2 with protocol 2
# ------------------------------------------------------------------------------------------------
def py2_pickle(obj) -> bytes:
    """Serialise plain data the way Python 2 did: every str as a *byte* string (BINSTRING)."""
    out = bytearray(b"\x80\x02")  # PROTO 2

    def put(x):
        if x is None:
            out.extend(b"N")
        elif x is True or x is False:
            out.extend(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            if 0 <= x < 256:
                out.extend(b"K" + bytes([x]))
            elif 0 <= x < 65536:
                out.extend(b"M" + struct.pack("<H", x))
            elif -(2**31) <= x < 2**31:
                out.extend(b"J" + struct.pack("<i", x))
            else:
                data = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(data)]) + data)
        elif isinstance(x, float):
            out.extend(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            data = x.encode("utf-8")  # Python 2 code stored UTF-8 bytes in plain str
            out.extend((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data)
        elif isinstance(x, list):
            out.extend(b"]")
            if x:
                out.extend(b"(")
                for v in x:
                    put(v)
                out.extend(b"e")
        elif isinstance(x, tuple):
            out.extend(b"(")
            for v in x:
                put(v)
            out.extend(b"t")
        elif isinstance(x, dict):
            out.extend(b"}")
            if x:
                out.extend(b"(")
                for k, v in x.items():
                    put(k)
                    put(v)
                out.extend(b"u")
        else:
            raise TypeError(type(x))

    put(obj)
    out.extend(b".")
    return bytes(out)


# ------------------------------------------------------------------------------------------------
# Masks drawn here, and stored in each segmentation format
# ------------------------------------------------------------------------------------------------
def rect(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def rect_polygon(y0, y1, x0, x1) -> list[float]:
    # pycocotools fills the polygon (x0,y0)-(x1,y0)-(x1,y1)-(x0,y1) as pixels [y0:y1, x0:x1].
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def disk(h, w, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with 0s."""
    flat = mask.T.reshape(-1).astype(np.uint8)  # column-major = Fortran order
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def make_object(kind: str, h: int, w: int, slot: int) -> tuple[np.ndarray, object, int]:
    """A drawn mask, its segmentation in format `kind`, and iscrowd. `slot` varies the position."""
    y0, x0 = 2 + 3 * slot, 2 + 4 * slot
    if kind == "polygon":
        m = rect(h, w, y0, y0 + 8, x0, x0 + 10)
        return m, [rect_polygon(y0, y0 + 8, x0, x0 + 10)], 0
    if kind == "multipolygon":  # an object seen in two parts (e.g. behind a pole)
        a, b = (y0, y0 + 5, x0, x0 + 6), (h - 8, h - 2, w - 9, w - 2)
        return rect(h, w, *a) | rect(h, w, *b), [rect_polygon(*a), rect_polygon(*b)], 0
    if kind == "rle_uncompressed":  # COCO crowd regions are stored this way
        m = disk(h, w, h // 2, w // 2, min(h, w) // 3)
        return m, uncompressed_rle(m), 1
    if kind == "rle_compressed":
        m = disk(h, w, h // 2, w // 2, min(h, w) // 3) & ~disk(h, w, h // 2, w // 2, min(h, w) // 6)  # a ring
        return m, compressed_rle(m), 0
    if kind == "rle_list":  # refclef: a list of compressed RLEs, one per part
        a = disk(h, w, h // 3, w // 3, 3)
        b = rect(h, w, h - 6, h - 1, 1, w // 2)
        return a | b, [compressed_rle(a), compressed_rle(b)], 0
    raise ValueError(kind)


def make_image(h: int, w: int, gray: bool, seed: int) -> np.ndarray:
    """A smooth picture (JPEG keeps it close) with a few flat patches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    rgb = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), rng.integers(40, 200))], axis=2)
    rgb[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 255, size=3)
    rgb = rgb.astype(np.uint8)
    return rgb.mean(axis=2).astype(np.uint8) if gray else rgb


# ------------------------------------------------------------------------------------------------
# The fixture
# ------------------------------------------------------------------------------------------------
@dataclass
class ReferFixture:
    root: Path
    masks: dict = field(default_factory=dict)  # (folder, ann_id) -> bool HxW as drawn
    images: dict = field(default_factory=dict)  # (folder, image_id) -> uint8 HxW[x3] as saved
    files: dict = field(default_factory=dict)  # (folder, image_id) -> Path of the image file
    # (folder, split_by, split) -> [{"text", "ref_id", "ann_id", "image_id", "sent_id"}] in order
    expected: dict = field(default_factory=dict)


def sentence_text(folder: str, split_by: str, split: str, r: int, k: int) -> str:
    if (folder, split_by, split, r, k) == ("refcoco", "unc", "train", 1, 1):
        return "the café table , left of the man"  # non-ASCII: a Python 2 UTF-8 byte string
    return f"{folder} {split_by} {split} object {r} sentence {k}"


def build_dataset(fx: ReferFixture, folder: str, bare_clef_name: bool = True) -> None:
    root = fx.root
    image_dir = root / IMAGE_DIRS[folder]
    kinds = CLEF_KINDS if folder == "refclef" else COCO_KINDS
    base = {"refcoco": 100, "refcoco+": 200, "refcocog": 300, "refclef": 25440}[folder]

    images, annotations = [], []
    for k, (h, w, gray) in enumerate(IMAGE_SHAPES):
        image_id = base + k
        if folder == "refclef":
            nested = f"{image_id // 1000:02d}/images/{image_id}.jpg"
            # The released file names are NN/images/ID.jpg; one bare "ID.jpg" checks the fallback.
            file_name = f"{image_id}.jpg" if (bare_clef_name and k == 3) else nested
            path = image_dir / nested
        else:
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            path = image_dir / file_name
        pixels = make_image(h, w, gray, seed=image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        # 2-D uint8 -> a grayscale (L) JPEG; no chroma subsampling keeps tiny images close to `pixels`
        Image.fromarray(pixels).save(path, quality=95, subsampling=0)
        fx.images[(folder, image_id)] = pixels
        fx.files[(folder, image_id)] = path
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w,
                       "license": 1, "coco_url": "", "date_captured": ""})
        for slot in range(3):  # three objects per image
            ann_id = image_id * 10 + slot
            kind = kinds[(k + slot) % len(kinds)]
            m, segmentation, iscrowd = make_object(kind, h, w, slot)
            fx.masks[(folder, ann_id)] = m
            bbox = [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1 + slot,
                                "segmentation": segmentation, "area": float(m.sum()), "bbox": bbox,
                                "iscrowd": iscrowd})
    instances = {
        "info": {"description": f"dmn_lib test fixture for {folder}"},
        "images": images,
        "licenses": [{"id": 1, "name": "test"}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 2, "name": "chair", "supercategory": "furniture"},
                       {"id": 3, "name": "dog", "supercategory": "animal"}],
    }
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "instances.json").write_text(json.dumps(instances))

    # Consecutive refs point to objects of different images; no object has two refs in one file.
    by_slot = sorted(annotations, key=lambda a: (a["id"] % 10, a["id"]))
    for split_by, splits in SPLITS[folder].items():
        refs, ref_id, sent_id = [], base * 100, base * 1000
        for j, split in enumerate(splits):
            stored_split = split
            expected = fx.expected.setdefault((folder, split_by, split), [])
            for r in range(2):  # two referred objects per split, with 1-3 sentences each
                ann = by_slot[2 * j + r]
                if folder == "refclef" and split_by == "unc" and split == "testA" and r == 1:
                    stored_split = "testAB"  # in both testA and testB, as refclef's unc split has
                sentences = []
                for k in range(1 + (j + r) % 3):
                    text = sentence_text(folder, split_by, split, r, k)
                    sentences.append({"tokens": text.split(), "raw": text.upper(), "sent": text, "sent_id": sent_id})
                    expected.append({"text": text, "ref_id": ref_id, "ann_id": ann["id"],
                                     "image_id": ann["image_id"], "sent_id": sent_id})
                    if stored_split == "testAB":
                        fx.expected.setdefault((folder, split_by, "testB"), []).append(expected[-1])
                    sent_id += 1
                refs.append({"sent_ids": [s["sent_id"] for s in sentences], "file_name": f"x_{ann['id']}.jpg",
                             "ann_id": ann["id"], "ref_id": ref_id, "image_id": ann["image_id"],
                             "split": stored_split, "sentences": sentences, "category_id": ann["category_id"]})
                ref_id += 1
        path = root / folder / f"refs({split_by}).p"
        if (folder, split_by) in PY2_PICKLES:
            path.write_bytes(py2_pickle(refs))
        else:
            path.write_bytes(pickle.dumps(refs, protocol=pickle.HIGHEST_PROTOCOL))
    # testB's expected order follows the refs file: testAB refs come before testB's own ones.
    if folder == "refclef":
        key = (folder, "unc", "testB")
        fx.expected[key].sort(key=lambda e: e["sent_id"])


def make_refer_root(root: Path, datasets=("refcoco", "refcoco+", "refcocog", "refclef")) -> ReferFixture:
    """Build the fixture datasets under `root` and return what was drawn."""
    fx = ReferFixture(root=Path(root))
    for folder in datasets:
        build_dataset(fx, folder)
    return fx
