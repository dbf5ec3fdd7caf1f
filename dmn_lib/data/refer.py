"""The real referring-expression datasets (UNC, UNC+, G-Ref, ReferIt) in the REFER layout.

Taught in notebook 12, §3-4 (the REFER format, the restricted unpickler). The four datasets of the DMN paper are
distributed by lichengunc/refer as one folder per dataset plus the images they annotate:

    root/
      refcoco/    instances.json  refs(unc).p  refs(google).p      <- "unc"     (RefCOCO)
      refcoco+/   instances.json  refs(unc).p                      <- "unc+"    (RefCOCO+)
      refcocog/   instances.json  refs(google).p  refs(umd).p      <- "gref"    (RefCOCOg)
      refclef/    instances.json  refs(unc).p  refs(berkeley).p    <- "referit" (RefCLEF)
      images/mscoco/images/train2014/COCO_train2014_000000xxxxxx.jpg   (refcoco, refcoco+, refcocog)
      images/saiapr_tc-12/NN/images/ID.jpg                             (refclef)

- `instances.json` is COCO-style: `images` (id, file_name, height, width), `annotations` (id,
  image_id, category_id, segmentation, ...) and `categories` (id, name).
- `refs(<split_by>).p` is a pickle (written by Python 2) of a list of refs, one per referred object:
  {ref_id, ann_id, image_id, category_id, split, sentences: [{sent_id, sent, raw, tokens}], ...}.
  The same objects are split differently by different groups ("split_by": unc, google, umd, berkeley).

`ReferDataset` yields one sample per SENTENCE (a ref has one or more): the image, the mask of the
referred annotation (the union of its polygons or RLE parts, decoded with pycocotools), the sentence
and a JSON-friendly `meta`. `export_refer` writes any dataset with `raw(i)` (e.g. SynthRef) in the
same layout, so the real-data loader can be exercised at scale without the real data.

The refs pickle is read with a restricted unpickler: unpickling a file can run arbitrary code, and
these files come from the internet, so only plain lists, dicts, tuples, strings and numbers load.
"""
from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from torch.utils.data import Dataset

from dmn_lib.data.transforms import image_to_tensor, load_image, mask_to_tensor, resize_pair
from dmn_lib.data.vocab import tokenize

DOWNLOAD_SCRIPT = "data/download_refer.sh"
DEFAULT_ROOT = "data/refer"

# The paper's dataset names -> the REFER folder names.
ALIASES = {"unc": "refcoco", "unc+": "refcoco+", "gref": "refcocog", "referit": "refclef"}

# Valid splits for every (folder, split_by) pair, as in the released refs files.
SPLITS = {
    "refcoco": {"unc": ("train", "val", "testA", "testB"), "google": ("train", "val", "test")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"google": ("train", "val"), "umd": ("train", "val", "test")},
    "refclef": {"unc": ("train", "val", "testA", "testB", "testC"), "berkeley": ("train", "val", "test")},
}

# The split scheme each dataset is usually reported with (DMN's Table 2 and later papers):
# UNC and UNC+ by UNC's testA/testB; G-Ref by UMD's train/val/test (the Google split has no test
# set; DMN itself reported Google's val); ReferIt by Berkeley's train/val/test.
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "berkeley"}

# Where each dataset's images live, relative to root.
IMAGE_DIRS = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "refclef": "images/saiapr_tc-12",
}

LAYOUT = """\
  <root>/
    refcoco/   instances.json  refs(unc).p  refs(google).p
    refcoco+/  instances.json  refs(unc).p
    refcocog/  instances.json  refs(google).p  refs(umd).p
    refclef/   instances.json  refs(unc).p  refs(berkeley).p
    images/mscoco/images/train2014/   (COCO train2014 images: refcoco, refcoco+, refcocog)
    images/saiapr_tc-12/              (SAIAPR TC-12 images: refclef)"""


def _how_to_get_it() -> str:
    return (
        f"Expected the REFER layout (lichengunc/refer):\n{LAYOUT}\n"
        f"Download it with:  bash {DOWNLOAD_SCRIPT} --root <root>   (see data/README.md, "
        f"'Real datasets'; --dry-run shows what it would do)"
    )


def resolve_dataset(dataset: str) -> str:
    """'unc' / 'refcoco' -> 'refcoco', and so on; anything else is a ValueError listing the names."""
    name = str(dataset).strip()
    name = ALIASES.get(name.lower(), name.lower())
    if name not in SPLITS:
        valid = ", ".join(f"{a!r} ({f})" for a, f in ALIASES.items())
        raise ValueError(
            f"Unknown REFER dataset {dataset!r}. Valid: {valid}; the folder names "
            f"{', '.join(repr(f) for f in SPLITS)} are accepted too."
        )
    return name


def resolve_split_by(folder: str, split_by: str | None) -> str:
    """The split scheme, defaulting as in the literature; an unknown one is a ValueError."""
    if split_by is None:
        return DEFAULT_SPLIT_BY[folder]
    if split_by not in SPLITS[folder]:
        raise ValueError(
            f"{folder} has no split_by={split_by!r}. Valid: {', '.join(repr(s) for s in SPLITS[folder])} "
            f"(default {DEFAULT_SPLIT_BY[folder]!r})."
        )
    return split_by


def check_split(folder: str, split_by: str, split: str) -> str:
    if split not in SPLITS[folder][split_by]:
        raise ValueError(
            f"{folder} split by {split_by} has no split {split!r}. "
            f"Valid: {', '.join(repr(s) for s in SPLITS[folder][split_by])}."
        )
    return split


# ------------------------------------------------------------------------------------------------
# The refs pickle: a restricted unpickler
# ------------------------------------------------------------------------------------------------
class PlainUnpickler(pickle.Unpickler):
    """An Unpickler that builds only plain containers, strings and numbers.

    Every class or function a pickle names goes through `find_class`; an ordinary pickle uses it to
    rebuild objects, and a malicious one to call e.g. `os.system` through `__reduce__`. The REFER
    refs files need no class at all (lists, dicts, str, int, float), so we refuse every one.
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"it asks for the Python object {module}.{name}; a REFER refs file holds only lists, "
            f"dicts, strings and numbers, and loading objects could run arbitrary code"
        )


def _to_text(value: Any) -> Any:
    """Python 2 `str` arrives as bytes (we unpickle with encoding='bytes'): decode it, recursively.

    UTF-8 first (what Python 2 code wrote for non-ASCII text), Latin-1 as a never-failing fallback.
    """
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, list):
        return [_to_text(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_text(v) for v in value)
    if isinstance(value, dict):
        return {_to_text(k): _to_text(v) for k, v in value.items()}
    return value


def load_refs(path: str | Path) -> list[dict]:
    """Read a refs(<split_by>).p file safely: a list of ref dicts with str keys and values."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # encoding="bytes": Python 2 byte strings stay bytes here and `_to_text` decodes them,
            # instead of pickle guessing ASCII (fails on accents) or Latin-1 (garbles UTF-8).
            refs = PlainUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"Refusing to load {path}: {err}.") from err
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise ValueError(f"Could not read {path} as a REFER refs pickle: {err}") from err
    refs = _to_text(refs)
    required = ("ref_id", "ann_id", "image_id", "split", "sentences")
    if not isinstance(refs, list) or not all(isinstance(r, dict) and all(k in r for k in required) for r in refs):
        raise ValueError(f"{path} is not a REFER refs file: expected a list of dicts with keys {required}")
    return refs


# ------------------------------------------------------------------------------------------------
# Masks: polygons, uncompressed RLE and compressed RLE -> one boolean HxW mask
# ------------------------------------------------------------------------------------------------
def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """The union of an annotation's parts as a bool HxW mask.

    COCO/REFER segmentations come in three forms:
      - polygons: a list of [x1, y1, x2, y2, ...] lists (one per visible part of the object);
      - uncompressed RLE: {"size": [h, w], "counts": [run lengths...]} (COCO crowd regions);
      - compressed RLE: {"size": [h, w], "counts": "string"} (refclef: a list of these).
    pycocotools turns every form into compressed RLE; `merge` takes the union; `decode` draws it.
    """
    if isinstance(segmentation, dict):
        parts = [segmentation]
    elif isinstance(segmentation, list):
        parts = segmentation
    else:
        raise ValueError(f"Unknown segmentation format: {type(segmentation).__name__}")
    if not parts:
        return np.zeros((height, width), dtype=bool)

    rles = []
    if all(isinstance(p, (list, tuple)) for p in parts):
        # A polygon needs at least 3 points (6 numbers); COCO has a few degenerate ones, which
        # pycocotools would misread (a 4-number list is taken for a box), so they are skipped.
        polygons = [list(map(float, p)) for p in parts if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(polygons, height, width)
    elif all(isinstance(p, dict) and "counts" in p and "size" in p for p in parts):
        for rle in parts:
            if [int(s) for s in rle["size"]] != [height, width]:
                raise ValueError(f"RLE of size {rle['size']} does not match the image ({height}x{width})")
            if isinstance(rle["counts"], list):  # uncompressed -> compressed
                rles.append(mask_utils.frPyObjects(rle, height, width))
            else:
                counts = rle["counts"]
                counts = counts.encode("ascii") if isinstance(counts, str) else counts
                rles.append({"size": [height, width], "counts": counts})
    else:
        raise ValueError("Segmentation must be a list of polygons, an RLE dict or a list of RLE dicts")
    merged = mask_utils.merge(rles, intersect=False) if len(rles) > 1 else rles[0]
    with warnings.catch_warnings():
        # pycocotools 2.0.x + numpy 2 emit a DeprecationWarning about `__array__(copy=...)` inside
        # decode; it is harmless and not ours to fix, and it would clutter every notebook.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(merged).astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
    """bool HxW -> compressed RLE with a str `counts` (JSON-serialisable), as export writes it."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ------------------------------------------------------------------------------------------------
# The dataset
# ------------------------------------------------------------------------------------------------
class ReferDataset(Dataset):
    """One sample per sentence of a REFER dataset split (see the module docstring for the layout).

    Args:
        root: the folder that holds refcoco/, refcoco+/, refcocog/, refclef/ and images/.
        dataset: "unc", "unc+", "gref", "referit", or the folder names "refcoco", "refcoco+",
            "refcocog", "refclef".
        split: e.g. "train", "val", "testA" (see `SPLITS` for the valid ones per split_by).
        split_by: "unc", "google", "umd" or "berkeley"; None picks the usual one
            (unc/unc+ -> "unc", gref -> "umd", referit -> "berkeley").
        image_size: resize image (bilinear) and mask (nearest) to image_size x image_size so that
            batches stack; None keeps every image at its own size.

    `ds[i]` is {"image": 3xHxW float (ImageNet-normalised), "mask": 1xHxW float in {0, 1},
    "text": str, "meta": dict}; `ds.raw(i)` is (uint8 HxWx3, bool HxW, text, meta) at the same size.
    `ds.texts` lists every sentence (for `Vocabulary.build`) without touching an image.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str,
        split_by: str | None = None,
        image_size: int | None = 320,
    ):
        self.root = Path(root)
        self.dataset = resolve_dataset(dataset)
        self.split_by = resolve_split_by(self.dataset, split_by)
        self.split = check_split(self.dataset, self.split_by, split)
        if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        self.image_size = image_size

        folder = self.root / self.dataset
        refs_file = folder / f"refs({self.split_by}).p"
        instances_file = folder / "instances.json"
        self.image_dir = self.root / IMAGE_DIRS[self.dataset]
        if not folder.is_dir():
            raise FileNotFoundError(f"REFER dataset folder not found: {folder}\n{_how_to_get_it()}")
        for needed in (refs_file, instances_file):
            if not needed.is_file():
                present = sorted(p.name for p in folder.iterdir())
                raise FileNotFoundError(
                    f"Missing {needed} (the folder holds: {', '.join(present) or 'nothing'}).\n{_how_to_get_it()}"
                )
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"Image folder not found: {self.image_dir}\n{_how_to_get_it()}")

        refs = [r for r in load_refs(refs_file) if self._in_split(r["split"])]
        if not refs:
            found = sorted({r["split"] for r in load_refs(refs_file)})
            raise ValueError(f"{refs_file} has no refs in split {self.split!r} (it has: {', '.join(found)})")

        try:
            with open(instances_file, encoding="utf-8") as f:
                instances = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{instances_file} is not valid JSON: {err}") from err
        # Keep only what this split uses: the real files hold ~200k annotations.
        ann_ids = {r["ann_id"] for r in refs}
        self.anns = {a["id"]: a for a in instances["annotations"] if a["id"] in ann_ids}
        image_ids = {r["image_id"] for r in refs}
        self.images = {im["id"]: im for im in instances["images"] if im["id"] in image_ids}
        self.categories = {c["id"]: c.get("name", str(c["id"])) for c in instances.get("categories", [])}
        for r in refs:
            if r["ann_id"] not in self.anns or r["image_id"] not in self.images:
                raise ValueError(
                    f"{refs_file}: ref {r['ref_id']} points to annotation {r['ann_id']} / image "
                    f"{r['image_id']}, which {instances_file} does not have (mixed-up files?)"
                )
        self.refs = refs

        # One sample per sentence: (index into self.refs, index into its sentences).
        self.samples = [(ri, si) for ri, ref in enumerate(refs) for si in range(len(ref["sentences"]))]
        self.texts = [self._sentence_text(refs[ri]["sentences"][si]) for ri, si in self.samples]

    def _in_split(self, ref_split: str) -> bool:
        # refclef's unc test refs may belong to several test sets at once ("testAB"): as in
        # lichengunc/refer, "testA" selects every test split whose letters include A.
        if self.split.startswith("test") and len(self.split) == 5:
            return ref_split.startswith("test") and self.split[-1] in ref_split[4:]
        return ref_split == self.split

    @staticmethod
    def _sentence_text(sentence: dict) -> str:
        # "sent" is the cleaned, lower-cased sentence the papers train on; "raw" is as typed.
        if sentence.get("sent"):
            return sentence["sent"]
        if sentence.get("raw"):
            return sentence["raw"]
        return " ".join(sentence.get("tokens", []))

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"ReferDataset({self.dataset}, split_by={self.split_by}, split={self.split}: "
            f"{len(self)} sentences, {len(self.refs)} refs, {len(self.images)} images)"
        )

    def image_path(self, image_info: dict) -> Path:
        """The file of an `instances.json` image entry."""
        path = self.image_dir / image_info["file_name"]
        if not path.exists() and self.dataset == "refclef" and "/" not in image_info["file_name"]:
            # SAIAPR TC-12 stores image ID as NN/images/ID.jpg with NN = ID // 1000 (two digits);
            # accept annotation files that give only the bare "ID.jpg".
            nested = self.image_dir / f"{int(image_info['id']) // 1000:02d}" / "images" / image_info["file_name"]
            if nested.exists():
                return nested
        return path

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, str, dict]:
        ri, si = self.samples[i]
        ref = self.refs[ri]
        sentence = ref["sentences"][si]
        ann = self.anns[ref["ann_id"]]
        info = self.images[ref["image_id"]]
        path = self.image_path(info)

        image = np.array(load_image(path))  # RGB (grayscale comes back with 3 channels), writable
        height, width = int(info["height"]), int(info["width"])
        if image.shape[:2] != (height, width):
            raise ValueError(
                f"Image {path} is {image.shape[1]}x{image.shape[0]} (WxH) but instances.json says "
                f"{width}x{height}: wrong or replaced image file?"
            )
        mask = decode_segmentation(ann["segmentation"], height, width)
        if self.image_size is not None:
            image, mask = resize_pair(image, mask, self.image_size)
            image, mask = np.array(image), np.array(mask)  # writable copies (torch warns on read-only)

        category_id = ref.get("category_id", ann.get("category_id"))
        meta = {
            "dataset": self.dataset,
            "split": self.split,
            "split_by": self.split_by,
            "ref_id": ref["ref_id"],
            "ann_id": ref["ann_id"],
            "image_id": ref["image_id"],
            "sent_id": sentence.get("sent_id"),
            "file_name": info["file_name"],
            "category_id": category_id,
            "category": self.categories.get(category_id),
            "index": i,
        }
        return image, mask, self.texts[i], meta

    def __getitem__(self, i: int) -> dict:
        image, mask, text, meta = self.raw(i)
        return {"image": image_to_tensor(image), "mask": mask_to_tensor(mask), "text": text, "meta": meta}

    def original_mask(self, i: int) -> np.ndarray:
        """Sample i's ground truth at its image's own size (bool H x W), however `image_size` resizes the
        network's input: `inference.evaluate` measures IoU against it, as CRIS and the original code do."""
        ref = self.refs[self.samples[i][0]]
        info = self.images[ref["image_id"]]
        return decode_segmentation(self.anns[ref["ann_id"]]["segmentation"], int(info["height"]), int(info["width"]))


# ------------------------------------------------------------------------------------------------
# Export: any dataset with raw(i) -> the REFER layout
# ------------------------------------------------------------------------------------------------
def _export_file_name(folder: str, image_id: int, ext: str) -> str:
    if folder == "refclef":  # mirror SAIAPR's NN/images/ID layout
        return f"{image_id // 1000:02d}/images/{image_id}.{ext}"
    return f"synth_{folder}_{image_id:012d}.{ext}"  # cannot collide with real COCO_train2014_* names


def export_refer(
    root: str | Path,
    dataset: str,
    splits: Mapping[str, Any],
    split_by: str | None = None,
    image_format: str = "png",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write datasets that have `raw(i)` into the REFER layout, so `ReferDataset` reads them back.

    Example: export_refer("data/cache/synth_refer", "unc", {"train": SynthRef("unc", "train", ...),
    "val": SynthRef("unc", "val", ...)}) writes refcoco/instances.json, refcoco/refs(unc).p and the
    images. Every sample becomes one image, one annotation (its mask as compressed RLE) and one ref
    with one sentence. `image_format="png"` (default) is lossless, so pixels and masks round-trip
    exactly; "jpg" is smaller, like the real data. All splits go into one refs file; the folder's
    existing annotations are only replaced with overwrite=True (which also removes its other
    refs(*).p files: their ids would no longer match the new instances.json).
    Returns the dataset folder.
    """
    from tqdm.auto import tqdm

    folder_name = resolve_dataset(dataset)
    split_by = resolve_split_by(folder_name, split_by)
    for split in splits:
        check_split(folder_name, split_by, split)
    ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}.get(image_format.lower())
    if ext is None:
        raise ValueError(f"image_format must be 'png' (lossless) or 'jpg', got {image_format!r}")

    root = Path(root)
    folder = root / folder_name
    old = sorted(folder.glob("refs(*).p")) + sorted(folder.glob("instances.json"))
    if old and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {', '.join(p.name for p in old)}; pass overwrite=True to replace "
            f"them (or export to another root)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    image_dir = root / IMAGE_DIRS[folder_name]

    images, annotations, refs, categories = [], [], [], {}
    total = sum(len(ds) for ds in splits.values())
    next_id = 1  # one image, annotation, ref and sentence per sample: one shared id counter
    with tqdm(total=total, desc=f"export {folder_name} ({split_by})", disable=not progress) as bar:
        for split, ds in splits.items():
            for i in range(len(ds)):
                image, mask, text, meta = ds.raw(i)
                image = np.asarray(image, dtype=np.uint8)
                if image.ndim == 2:
                    image = np.repeat(image[:, :, None], 3, axis=2)
                mask = np.asarray(mask, dtype=bool)
                height, width = mask.shape
                if image.shape != (height, width, 3):
                    raise ValueError(f"{split} sample {i}: image {image.shape} and mask {mask.shape} differ in size")
                uid = next_id
                next_id += 1

                file_name = _export_file_name(folder_name, uid, ext)
                path = image_dir / file_name
                path.parent.mkdir(parents=True, exist_ok=True)
                if ext == "png":
                    Image.fromarray(image).save(path)
                else:
                    Image.fromarray(image).save(path, quality=95)

                category_id = meta.get("category_id") if isinstance(meta.get("category_id"), int) else 1
                categories.setdefault(category_id, str(meta.get("category", "object")))
                rle = encode_mask(mask)
                images.append({"id": uid, "file_name": file_name, "height": height, "width": width})
                annotations.append({
                    "id": uid, "image_id": uid, "category_id": category_id, "segmentation": rle,
                    "area": int(mask.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox({**rle, "counts": rle["counts"].encode()})],
                    "iscrowd": 0,
                })
                refs.append({
                    "ref_id": uid, "ann_id": uid, "image_id": uid, "category_id": category_id,
                    "split": split, "file_name": file_name, "sent_ids": [uid],
                    "sentences": [{"sent_id": uid, "sent": str(text), "raw": str(text), "tokens": tokenize(str(text))}],
                })
                bar.update(1)

    instances = {
        "info": {"description": f"exported by dmn_lib.data.refer.export_refer ({folder_name}, {split_by})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": name} for cid, name in sorted(categories.items())],
    }
    # Write to temporary names and move into place, so an interrupted export leaves no half file
    # (and, with overwrite=True, the old annotations stay until the new ones are complete).
    refs_file = folder / f"refs({split_by}).p"
    tmp_json, tmp_refs = folder / "instances.json.tmp", folder / f"refs({split_by}).p.tmp"
    tmp_json.write_text(json.dumps(instances))
    tmp_refs.write_bytes(pickle.dumps(refs, protocol=2))  # plain containers only, like the released files
    for path in old:
        if path not in (refs_file, folder / "instances.json"):
            path.unlink()  # another split_by's refs: its ids no longer match the new instances.json
    shutil.move(tmp_json, folder / "instances.json")
    shutil.move(tmp_refs, refs_file)
    return folder
