"""Figures for data/README.md: what SynthRef contains, how hard it is, and how fast it generates.

    python scripts/synthref_stats.py                 # everything (a few minutes on 2 CPU cores)
    python scripts/synthref_stats.py --only bench    # just the 20k-sample generation time

Prints Markdown tables:
1. expressions per variant (train split): kind mix, mean length in tokens, vocabulary size, ...
2. difficulty on `unc` val: cumulative IoU (sum of intersections / sum of unions, the paper's
   "mIoU"), mean IoU and Pr@0.5 of image-only strategies (they cannot read the expression) and of
   the true mask seen at the stride of a decoder without skip connections;
3. the time to generate 20,000 samples (image + mask + text) at 128 px with 2 processes.
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from collections import Counter
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as F

from dmn_lib.data.synthetic import VARIANT_SPLITS, SynthRef, description_depth, generate_scene
from dmn_lib.data.vocab import Collate, Vocabulary, tokenize


# --------------------------------------------------------------------------------------------------
# 1. Expressions
# --------------------------------------------------------------------------------------------------
def _scene_summary(args):
    variant, split, start, stop, seed = args
    rows = []
    for i in range(start, stop):
        meta, text = generate_scene(variant, split, i, seed)
        rows.append((meta["kind"], description_depth(meta["description"]), meta["n_lookalikes"],
                     sum(o["kind"] == "object" for o in meta["objects"]), tokenize(text)))
    return rows


def expression_table(n: int, seed: int, pool) -> str:
    lines = [
        "| variant | samples | attribute | location | relation | stuff | 2-step relations | mean words | "
        "vocabulary | targets with a look-alike | objects per scene |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANT_SPLITS:
        chunks = [(variant, "train", s, min(s + 1000, n), seed) for s in range(0, n, 1000)]
        rows = [row for part in pool.map(_scene_summary, chunks) for row in part]
        kinds = Counter(r[0] for r in rows)
        share = lambda k: f"{kinds[k] / len(rows):.1%}" if kinds[k] else "-"  # noqa: E731
        vocab = Vocabulary.build(" ".join(r[4]) for r in rows)
        lines.append(
            f"| {variant} | {len(rows)} | {share('attribute')} | {share('location')} | {share('relation')} | "
            f"{share('stuff')} | {sum(r[1] >= 2 for r in rows) / len(rows):.1%} | "
            f"{np.mean([len(r[4]) for r in rows]):.2f} | {len(vocab) - 2} | "
            f"{np.mean([r[2] >= 1 for r in rows]):.1%} | {np.mean([r[3] for r in rows]):.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# 2. Difficulty: image-only strategies and the oracle at a coarse stride
# --------------------------------------------------------------------------------------------------
def _coarse_oracle(mask: np.ndarray, stride: int, mode: str) -> np.ndarray:
    """The true mask as a decoder without skip connections could at best give it back: averaged over
    stride x stride cells, then upsampled (nearest = blocks, or bilinear) and thresholded at 0.5."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    coarse = F.avg_pool2d(t, stride)
    if mode == "block":
        up = F.interpolate((coarse >= 0.5).float(), scale_factor=stride, mode="nearest")
    else:
        up = (F.interpolate(coarse, scale_factor=stride, mode="bilinear", align_corners=False) >= 0.5).float()
    return up[0, 0].numpy() > 0.5


def _difficulty_part(args):
    variant, split, start, stop, image_size, seed = args
    torch.set_num_threads(1)
    ds = SynthRef(variant, split, size=stop, image_size=image_size, seed=seed)
    pick_rng = np.random.default_rng(1000 + start)  # the "random object" strategy's fixed stream
    results = {}
    for i in range(start, stop):
        _, instances, _, meta = ds.render_sample(i)
        target_mask = instances[meta["target"]]
        areas = [m.sum() for m in instances]
        guesses = {
            "all objects (union of instance masks)": np.any(instances, axis=0),
            "a random object": instances[int(pick_rng.integers(len(instances)))],
            "the largest object": instances[int(np.argmax(areas))],
        }
        for stride in (32, 16, 8):
            for mode in ("block", "bilinear"):
                guesses[f"true mask at stride {stride} ({mode})"] = _coarse_oracle(target_mask, stride, mode)
        for name, guess in guesses.items():
            inter = int((guess & target_mask).sum())
            union = int((guess | target_mask).sum())
            results.setdefault(name, []).append((inter, union))
        results.setdefault("target visible fraction", []).append(meta["objects"][meta["target"]]["visible_fraction"])
        results.setdefault("object visible fraction", []).extend(o["visible_fraction"] for o in meta["objects"])
    return results


def difficulty_table(variant: str, split: str, n: int, image_size: int, seed: int, pool) -> str:
    chunks = [(variant, split, s, min(s + 250, n), image_size, seed) for s in range(0, n, 250)]
    merged: dict[str, list] = {}
    for part in pool.map(_difficulty_part, chunks):
        for name, pairs in part.items():
            merged.setdefault(name, []).extend(pairs)
    lines = [
        f"| strategy ({variant} {split}, {n} samples, {image_size} px) | cumulative IoU | mean IoU | Pr@0.5 |",
        "|---|---|---|---|",
    ]
    target_visible = np.array(merged.pop("target visible fraction"))
    object_visible = np.array(merged.pop("object visible fraction"))
    for name, pairs in merged.items():
        inter = np.array([p[0] for p in pairs], dtype=float)
        union = np.array([p[1] for p in pairs], dtype=float)
        ious = inter / np.maximum(union, 1)
        lines.append(f"| {name} | {inter.sum() / union.sum():.3f} | {ious.mean():.3f} | {(ious > 0.5).mean():.3f} |")
    lines.append(f"\nVisible fraction of the target: min {target_visible.min():.3f}, mean {target_visible.mean():.3f}; "
                 f"objects partly hidden by another: {(object_visible < 1).mean():.1%}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# 3. Generation speed
# --------------------------------------------------------------------------------------------------
def _render_part(args):
    variant, start, stop, image_size, seed = args
    ds = SynthRef(variant, "train", size=stop, image_size=image_size, seed=seed)
    pixels = 0
    for i in range(start, stop):
        image, mask, text, meta = ds.raw(i)
        pixels += int(mask.sum())
    return pixels


class Stopwatch:
    """Wall-clock and CPU seconds (this process and its finished child processes) of a block.

    Other programs on a shared machine slow the wall clock down but not the CPU time, so both are
    reported: CPU seconds / number of processes is what the block takes on that many idle cores.
    """

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu_now()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu_now() - self.cpu

    @staticmethod
    def _cpu_now() -> float:
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def bench(n: int, image_size: int, workers: int, seed: int) -> str:
    ctx = get_context("fork" if os.name == "posix" else "spawn")
    rows = []
    with Stopwatch() as raw:  # pool start-up included
        with ctx.Pool(workers) as pool:
            pool.map(_render_part, [("unc", s, min(s + 500, n), image_size, seed) for s in range(0, n, 500)])
    rows.append(("`ds.raw(i)`: uint8 image + bool mask + text + meta", raw))

    with Stopwatch() as text:
        with ctx.Pool(workers) as pool:
            texts = pool.map(_texts_part, [("unc", s, min(s + 1000, n), seed) for s in range(0, n, 1000)])
        vocab = Vocabulary.build(t for part in texts for t in part)
    rows.append(("`ds.text(i)` (no rendering) + `Vocabulary.build`", text))

    ds = SynthRef("unc", "train", size=n, image_size=image_size, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=Collate(vocab))
    with Stopwatch() as loading:
        for _batch in loader:
            pass
        del _batch
    rows.append((f"DataLoader(batch_size=64, num_workers={workers}) of `ds[i]` tensors through `Collate`", loading))

    lines = [f"| {n} unc train samples at {image_size} px, {workers} processes | wall s | CPU s | "
             f"CPU s / {workers} (≈ wall on {workers} idle cores) | CPU ms per sample |",
             "|---|---|---|---|---|"]
    for name, watch in rows:
        lines.append(f"| {name} | {watch.wall:.1f} | {watch.cpu:.1f} | {watch.cpu / workers:.1f} | "
                     f"{watch.cpu / n * 1e3:.2f} |")
    return "\n".join(lines)


def _texts_part(args):
    variant, start, stop, seed = args
    ds = SynthRef(variant, "train", size=stop, seed=seed)
    return [ds.text(i) for i in range(start, stop)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("expressions", "difficulty", "bench"), help="one part only")
    parser.add_argument("--text-samples", type=int, default=20000, help="train texts per variant (part 1)")
    parser.add_argument("--n", type=int, default=1000, help="samples for the difficulty table (part 2)")
    parser.add_argument("--variant", default="unc")
    parser.add_argument("--split", default="val")
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 128], help="image sizes for part 2")
    parser.add_argument("--bench-samples", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the work happens in worker processes; extra threads here only contend
    ctx = get_context("fork" if os.name == "posix" else "spawn")

    print(f"# SynthRef statistics (seed {args.seed}, {args.workers} processes, {os.cpu_count()} CPUs)\n")
    if args.only in (None, "expressions"):
        start = time.perf_counter()
        with ctx.Pool(args.workers) as pool:
            print(expression_table(args.text_samples, args.seed, pool))
        print(f"\n({time.perf_counter() - start:.1f} s)\n")
    if args.only in (None, "difficulty"):
        for image_size in args.sizes:
            start = time.perf_counter()
            with ctx.Pool(args.workers) as pool:
                print(difficulty_table(args.variant, args.split, args.n, image_size, args.seed, pool))
            print(f"\n({time.perf_counter() - start:.1f} s)\n")
    if args.only in (None, "bench"):
        print(bench(args.bench_samples, 128, args.workers, args.seed))
        print(f"\n(1-minute load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
              "other programs running at the same time slow the wall clock, not the CPU time)")


if __name__ == "__main__":
    main()
