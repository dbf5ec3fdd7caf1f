"""Print train_x.py runs (runs/explore/<name>.jsonl) as markdown rows: the curve and the final numbers.

    python explore/runs_table.py e01_lib_plateau_f2 e02_cos_w50_f2 ...
"""
import json
import sys


def rows(name):
    lines = [json.loads(l) for l in open(f"runs/explore/{name}.jsonl")]
    return lines[0], lines[1:]


print("| run | steps | samples | train min (load) | samples/s | val n | cIoU | Pr@0.5 | attr / loc / rel cIoU | flip moved loc/rel | flip correct loc/rel | curve (step: cIoU) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in sys.argv[1:]:
    head, evals = rows(name)
    if not evals:
        print(f"| {name} | (no evaluation yet) |")
        continue
    r = evals[-1]
    k = r["kinds"]
    kinds = " / ".join(f"{k[x]['cum_iou']:.3f}" for x in ("attribute", "location", "relation") if x in k)
    f = r.get("flip") or {}
    moved = " / ".join(f"{f[x]['moved']:.2f}" for x in ("location", "relation") if x in f) or "-"
    correct = " / ".join(f"{f[x]['correct']:.2f} (n={f[x]['n_other']})" for x in ("location", "relation") if x in f) or "-"
    curve = ", ".join(f"{e['step']}: {e['cum_iou']:.3f}" for e in evals)
    print(f"| {name} | {r['step']} | {r['samples']} | {r['train_min']} ({r['load']}) | {r['samples_per_s']} | {r['n']} | "
          f"{r['cum_iou']:.3f} | {r['Pr@0.5']:.3f} | {kinds} | {moved} | {correct} | {curve} |")
