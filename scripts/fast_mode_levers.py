"""Notebook 07's fast-mode run with one change at a time: which recipe learns most in 360 steps?

    python scripts/fast_mode_levers.py                          # the course recipe, lr 2e-3 and 3e-3, 360 steps
    python scripts/fast_mode_levers.py --steps-high 140 --only base,low_res_weight=0,pos_weight=1

The run is notebook 07's fast mode (SynthRef `unc`'s attribute queries, 96 px, 8,000 training samples, the
course spec, one torch thread, seed 0) for 40 + STEPS_HIGH steps; each change is a TrainConfig field set to a
value. Prints the final val cumulative IoU and Pr@0.5 of each (on the attribute queries of the first 600 val
samples). Only the step count is fixed, so the numbers do not depend on the machine's load (its rounding aside);
the seconds do. docs/recipe_search.md, section 3, keeps what it printed.
"""
from __future__ import annotations

import argparse
import time

import torch

from dmn_lib import DMN
from dmn_lib.data import build_vocabulary
from dmn_lib.data.synthetic import SynthRef, of_kinds
from dmn_lib.spec import spec
from dmn_lib.train import train

CHANGES = "base,lr=2e-3,lr=3e-3"


def parse_change(text: str) -> dict:
    # "base" -> {}, "lr=2e-3" -> {"lr": 0.002}
    if text == "base":
        return {}
    name, _, value = text.partition("=")
    return {name: float(value)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-high", type=int, default=320, help="stage-2 steps (after 40 of stage 1)")
    parser.add_argument("--only", default=CHANGES, help=f"comma-separated changes (default: {CHANGES})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = spec("course", data=dict(variant="unc", image_size=96, train_size=8000, val_size=600),
               train=dict(steps_low=40, steps_high=args.steps_high, eval_every=10**9, progress=False, seed=0))
    train_split = SynthRef("unc", "train", size=8000, image_size=96)
    train_set = of_kinds(train_split, ("attribute",))
    val_set = of_kinds(SynthRef("unc", "val", size=600, image_size=96), ("attribute",))
    vocab = build_vocabulary(train_split)
    print("| change | steps | val cum IoU | val Pr@0.5 | seconds (wall) |\n|---|---|---|---|---|")
    for change in args.only.split(","):
        torch.manual_seed(0)
        model, start = DMN(run.model_config(len(vocab))), time.perf_counter()
        history = train(model, train_set, vocab, run.train.replace(**parse_change(change)), val_set=val_set,
                        data=run.data)
        last = history["val"][-1]
        print(f"| {change} | {last['step']} | {last['val_cum_iou']:.3f} | {last['val_Pr@0.5']:.3f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
