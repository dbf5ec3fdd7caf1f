"""Word-free baselines on the same cached val samples the runs are scored on (a guess that never reads the query).

    PYTHONPATH=. python explore/bounds.py --n 1000 --image-size 128
union of all objects, the largest object, and per kind; cumulative IoU, mean IoU, Pr@0.5 (dmn_lib.metrics).
"""
import argparse

import numpy as np
import torch

from dmn_lib.metrics import cumulative_iou, intersection_union, precision_at
from dmn_lib.data.synthetic import fits_attributes
from explore.common import cached_split


def score(preds, data, rows):
    inter, union = intersection_union(torch.stack([preds[i] for i in rows]), data["masks"][rows])
    inter, union = np.asarray(inter, dtype=float), np.asarray(union, dtype=float)
    ious = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"cum_iou": round(cumulative_iou(inter, union), 3), "mean_iou": round(float(ious.mean()), 3),
            "Pr@0.5": round(precision_at(ious, (0.5,))[0.5], 3), "n": len(rows)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--variant", default="unc")
    args = p.parse_args()
    data = cached_split("val", args.n, image_size=args.image_size, variant=args.variant, instances=True)
    objects_only = lambda i: [k for k, o in enumerate(data["metas"][i]["objects"]) if o["kind"] == "object"]  # noqa: E731
    union = [data["instances"][i][objects_only(i)].any(0) for i in range(args.n)]
    largest = [data["instances"][i][max(objects_only(i), key=lambda k: int(data["instances"][i][k].sum()))]
               for i in range(args.n)]
    # A reader of the attribute words only: the objects that fit the description's own attributes (its
    # location / relation ignored): their union, or the largest of them.
    fits = [[k for k in objects_only(i) if fits_attributes(data["metas"][i]["objects"][k], data["metas"][i]["description"])]
            for i in range(args.n)]
    attr_union = [data["instances"][i][fits[i]].any(0) for i in range(args.n)]
    attr_largest = [data["instances"][i][max(fits[i], key=lambda k: int(data["instances"][i][k].sum()))]
                    for i in range(args.n)]
    kinds = sorted({m["kind"] for m in data["metas"]})
    for name, preds in (("union of all objects", union), ("largest object", largest),
                        ("attribute reader: union of attribute matches", attr_union),
                        ("attribute reader: largest attribute match", attr_largest)):
        print(name, "all:", score(preds, data, list(range(args.n))))
        for k in kinds:
            print("   ", k, score(preds, data, [i for i in range(args.n) if data["metas"][i]["kind"] == k]))


if __name__ == "__main__":
    main()
