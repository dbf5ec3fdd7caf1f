"""Print train_y.py runs (runs/explore2/<name>.jsonl) as markdown: final numbers, the curve, diagnostics.

    python explore/table_y.py y00_base y01_l2s ...          # the results table
    python explore/table_y.py --diag y00_base ...          # binding top-1 / query sensitivity / eq. 9 parts
"""
import json
import sys


def load(name):
    lines = [json.loads(line) for line in open(f"runs/explore2/{name}.jsonl")]
    return lines[0], [r for r in lines[1:] if "cum_iou" in r], [r for r in lines[1:] if "grad_norm" in r]


def differs(args):
    base = {"lr": 0.001, "lr_mult": "{}", "schedule": "constant", "warmup": 0, "stage1": 150, "pos_weight": 3.0,
            "low_res_weight": 3.0, "dice_weight": 0.0, "model": "{}", "visual_norm": "none", "r_norm": False,
            "response_scale": 1.0, "freeze_blocks": 2, "batch": 16, "seed": 0, "clip": 0.0, "wd": 0.0}
    return " ".join(f"{k}={args[k]}" for k in base if args.get(k) != base[k]) or "baseline"


def table(names):
    print("| run | settings (vs y00) | steps | train min (load) | samples/s | val n | cIoU | Pr@0.5 | attr / loc / rel cIoU "
          "| binding top-1 attr / loc / rel | flip moved loc/rel | curve (step: cIoU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        head, evals, _ = load(name)
        if not evals:
            print(f"| {name} | {differs(head['args'])} | (no evaluation yet) |")
            continue
        r = evals[-1]
        k, b = r["kinds"], r["binding"]
        kinds = " / ".join(f"{k[x]['cum_iou']:.3f}" for x in ("attribute", "location", "relation"))
        bind = " / ".join(f"{b[x]['top1']:.2f}" for x in ("attribute", "location", "relation"))
        f = r.get("flip") or {}
        moved = " / ".join(f"{f[x]['moved']:.2f}" for x in ("location", "relation") if x in f) or "-"
        curve = ", ".join(f"{e['step']}: {e['cum_iou']:.3f}" for e in evals)
        print(f"| {name} | {differs(head['args'])} | {r['step']} | {r['train_min']} ({r['load']}) | {r['samples_per_s']} "
              f"| {r['n']} | {r['cum_iou']:.3f} | {r['Pr@0.5']:.3f} | {kinds} | {bind} | {moved} | {curve} |")


def diag(names):
    for name in names:
        head, evals, grads = load(name)
        print(f"## {name}: {differs(head['args'])}")
        for e in evals:
            b = e["binding"]
            p = e["parts"]
            print(f"  step {e['step']}: cIoU {e['cum_iou']:.3f} top1 all {b['all']['top1']:.2f} (chance {b['all']['chance']:.2f})"
                  f" attr {b['attribute']['top1']:.2f} loc {b['location']['top1']:.2f} rel {b['relation']['top1']:.2f}"
                  f" | query sens {e['query_sensitivity']:.2f} | terms: visual {p['visual_term']:.2f}"
                  f" F_t {p.get('responses_term', 0):.2f} loc {p['loc_term']:.2f} words {p.get('words_term', 0):.2f}"
                  f" | I_N rms {p['I_N_rms']:.2f} filter std {p.get('F_t_filter_std_over_words_batch', 0):.3f}")
        for g in grads[:: max(1, len(grads) // 6)]:
            print(f"  grad step {g['step']}: " + " ".join(f"{k} {v:.3g}" for k, v in g["grad_norm"].items()))


if __name__ == "__main__":
    if sys.argv[1] == "--diag":
        diag(sys.argv[2:])
    else:
        table(sys.argv[1:])
