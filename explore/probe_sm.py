"""A fast probe of the words-meet-image part alone: LM + SM on FROZEN ImageNet I_N features (not part of dmn_lib).

    PYTHONPATH=. OMP_NUM_THREADS=1 python explore/probe_sm.py --name p00 --steps 1500 [train_y.py's model options]

The EfficientNet-Lite0 backbone (ImageNet weights, eval mode) is run once over the cached SynthRef train/val
images and its stride-16 map I_N kept (runs/explore2/features_*.pt, fp16). The probe then trains only the
Language Module, the Synthesis Module (eq. 7-10) and the low-res head with the stage-1 loss (BCE, pos_weight 3,
soft low-res target): no backbone, no UM, so a step costs ~1/5 of a training step and the question "how fast do
the words bind to the image?" is measured alone. Validation: the low-res logits upsampled (bilinear) to 128 px,
cumulative IoU at the best threshold on the first --val-size val samples, and the binding top-1
(explore/diagnostics.py). A screening tool: what it finds is confirmed with explore/train_y.py.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dmn_lib.config import DMNConfig
from dmn_lib.losses import low_res_target
from dmn_lib.metrics import DEFAULT_THRESHOLDS, ThresholdSweep
from dmn_lib.models.dmn import DMN
from explore.common import cached_split, encode, loadavg, normalise, vocabulary
from explore.diagnostics import binding
from explore.train_y import OUT, param_groups
from explore.variants import apply_variants, soft_dice_loss


@torch.no_grad()
def features(split: str, data: dict, model: DMN) -> torch.Tensor:
    path = Path(OUT) / f"features_{split}_{len(data['texts'])}.pt"
    if path.is_file():
        return torch.load(path)
    model.eval()
    out = [model.visual(normalise(data["images"][s:s + 100]))[-1].half() for s in range(0, len(data["texts"]), 100)]
    feats = torch.cat(out)
    torch.save(feats, path)
    return feats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-mult", default="{}")
    p.add_argument("--model", default="{}")
    p.add_argument("--visual-norm", default="none", choices=("none", "l2", "l2s", "bn", "std"))
    p.add_argument("--r-norm", action="store_true")
    p.add_argument("--response-scale", type=float, default=1.0)
    p.add_argument("--pos-weight", type=float, default=3.0)
    p.add_argument("--dice-weight", type=float, default=0.0)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    vocab = vocabulary()
    train, val = cached_split("train", 20000), cached_split("val", 1000, instances=True)
    cfg = DMNConfig.preset("course", vocab_size=len(vocab), backbone="efficientnet_lite0", backbone_kwargs={},
                           pretrained_file="imagenet:efficientnet_lite0", trim_backbone=True, **json.loads(args.model))
    model = DMN(cfg)
    f_train, f_val = features("train", train, model), features("val", val, model)
    apply_variants(model, args.visual_norm, args.response_scale, args.r_norm)
    if args.visual_norm == "std":
        norm = model.synthesis.norm
        sample = f_train[:2000].float()
        norm.mean.copy_(sample.mean(dim=(0, 2, 3), keepdim=True))
        norm.std.copy_(sample.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3))
    model.visual.requires_grad_(False)
    model.upsampling.requires_grad_(False)
    opt = torch.optim.Adam(param_groups(model, args), lr=args.lr)
    for g in opt.param_groups:
        g["lr"] = args.lr * g["lr_mult"]
    masks_train = train["masks"].unsqueeze(1).float()
    pos_weight = torch.tensor(args.pos_weight)

    def low_logits(feats, texts):
        tokens, lengths = encode(vocab, texts)
        r, filters = model.language(tokens)
        R, _ = model.synthesis(feats.float(), r, filters, lengths)
        return model.synthesis.low_res_head(R)

    os.makedirs(OUT, exist_ok=True)
    log_path = f"{OUT}/{args.name}.jsonl"
    with open(log_path, "w") as f:
        f.write(json.dumps({"args": vars(args), "probe": True}) + "\n")
    order = torch.randperm(20000, generator=torch.Generator().manual_seed(args.seed))
    train_s, losses, pos = 0.0, [], 0
    model.train()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        if pos + args.batch > 20000:
            order, pos = torch.randperm(20000, generator=torch.Generator().manual_seed(args.seed + step)), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        low = low_logits(f_train[idx], [train["texts"][i] for i in idx.tolist()])
        target = low_res_target(masks_train[idx], low.shape[-2:], "soft")
        loss = F.binary_cross_entropy_with_logits(low, target, pos_weight=pos_weight)
        if args.dice_weight:
            loss = loss + args.dice_weight * soft_dice_loss(low, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        train_s += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            sweep, all_probs = ThresholdSweep(DEFAULT_THRESHOLDS), []
            with torch.no_grad():
                for s in range(0, args.val_size, 100):
                    ids = list(range(s, min(args.val_size, s + 100)))
                    low = low_logits(f_val[ids], [val["texts"][i] for i in ids])
                    probs = torch.sigmoid(F.interpolate(low, size=(128, 128), mode="bilinear", align_corners=False))[:, 0]
                    sweep.update(probs, val["masks"][ids], meta=[val["metas"][i] for i in ids])
                    all_probs.append(probs)
            model.train()
            thr = sweep.best_threshold()
            summ, kinds = sweep.summary(thr), sweep.summary_by("kind", thr)
            row = {"step": step, "train_s": round(train_s, 1), "load": loadavg(), "train_loss": round(sum(losses) / len(losses), 4),
                   "cum_iou": summ["cum_iou"], "Pr@0.5": summ["Pr@0.5"], "threshold": thr,
                   "kinds": {k: {"cum_iou": round(v["cum_iou"], 4)} for k, v in kinds.items()},
                   "binding": binding(torch.cat(all_probs), val, list(range(args.val_size)))}
            losses = []
            print(json.dumps(row), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
