"""Brief Y's training loop: train_x.py's (X's recipe search) plus the levers and diagnostics of brief Y.

    PYTHONPATH=. OMP_NUM_THREADS=1 python explore/train_y.py --name y00_base --steps 800

Same data, model, loss and metrics as explore/train_x.py (dmn_lib's DMN with the library's trim_backbone and
channels_last; dmn_lib.losses.stage_loss; dmn_lib.metrics' sweep on the first --val-size val samples, threshold
from that sweep). Added (options of ours, explore/variants.py):
  --lr-mult '{"visual": 0.1, "language": 3}'   per-part learning rates (first matching name prefix wins)
  --visual-norm l2|l2s|bn|std, --r-norm, --response-scale S (-1: 1/sqrt(channels))
  --dice-weight W --dice-on high|low|both
Diagnostics: grad norms per module (--diag-every), at every validation the binding top-1 (target object has the
highest mean probability), the query sensitivity and the RMS of eq. 9's parts. Rows go to runs/explore2/<name>.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

from dmn_lib.config import DMNConfig
from dmn_lib.losses import low_res_target, stage_loss
from dmn_lib.metrics import DEFAULT_THRESHOLDS, ThresholdSweep
from dmn_lib.models.dmn import DMN
from dmn_lib.spec import TrainConfig
from explore.common import cached_split, flip_test, loadavg, make_batch, predict_probs, vocabulary
from explore.diagnostics import binding, fusion_parts, grad_norms, query_sensitivity
from explore.variants import apply_variants, calibrate_standardise, soft_dice_loss

OUT = "runs/explore2"


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--max-minutes", type=float, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-mult", default="{}", help='JSON {name prefix: lr multiplier}, e.g. {"visual.": 0.1}')
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine", "wsd"))
    p.add_argument("--decay-frac", type=float, default=0.25)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--stage1", type=int, default=150)
    p.add_argument("--pos-weight", type=float, default=3.0)
    p.add_argument("--low-res-weight", type=float, default=3.0)
    p.add_argument("--dice-weight", type=float, default=0.0)
    p.add_argument("--dice-on", default="high", choices=("high", "low", "both"))
    p.add_argument("--model", default="{}", help="JSON DMNConfig overrides of the course preset")
    p.add_argument("--visual-norm", default="none", choices=("none", "l2", "l2s", "bn", "std"))
    p.add_argument("--r-norm", action="store_true")
    p.add_argument("--response-scale", type=float, default=1.0)
    p.add_argument("--freeze-blocks", type=int, default=2)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--final-val-size", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--diag-every", type=int, default=25)
    p.add_argument("--diag-until", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flip", type=int, default=1)
    p.add_argument("--save", type=int, default=1)
    return p.parse_args()


def lr_factor(args, step: int) -> float:
    if args.warmup and step < args.warmup:
        return (step + 1) / args.warmup
    progress = step / args.steps
    if args.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if args.schedule == "wsd":
        return 1 - min(max((progress - (1 - args.decay_frac)) / args.decay_frac, 0.0), 1.0)
    return 1.0


def build_model(args, vocab, train) -> DMN:
    overrides = dict(backbone="efficientnet_lite0", backbone_kwargs={}, pretrained_file="imagenet:efficientnet_lite0",
                     trim_backbone=True)
    cfg = DMNConfig.preset("course", vocab_size=len(vocab), **{**overrides, **json.loads(args.model)})
    model = DMN(cfg)
    apply_variants(model, args.visual_norm, args.response_scale, args.r_norm)
    bb = model.visual.backbone
    if args.freeze_blocks:
        for m in [bb.conv_stem, bb.bn1] + list(bb.blocks[: args.freeze_blocks]):
            m.requires_grad_(False)
    if args.visual_norm == "std":
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(len(train["texts"]), generator=g)[:400]
        calibrate_standardise(model, make_batch(train, idx, vocab)["images"])
    return model.to(memory_format=torch.channels_last)


def train_mode(model):
    """train(), but BatchNorms inside frozen blocks stay in eval mode (as train_x.py)."""
    model.train()
    for m in model.visual.backbone.modules():
        if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def param_groups(model, args):
    mults = json.loads(args.lr_mult)
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = name.replace("inner.", "")
        mult = next((m for prefix, m in mults.items() if clean.startswith(prefix)), 1.0)
        groups.setdefault(mult, []).append(p)
    return [{"params": ps, "lr_mult": m} for m, ps in groups.items()]


def loss_fn(logits, low, masks, tcfg, args):
    loss, parts = stage_loss(logits, low, masks, tcfg)
    if args.dice_weight:
        dice = 0.0
        if args.dice_on in ("low", "both") or logits is None:
            dice = dice + soft_dice_loss(low, low_res_target(masks, low.shape[-2:], "soft"))
        if args.dice_on in ("high", "both") and logits is not None:
            dice = dice + soft_dice_loss(logits, masks)
        loss = loss + args.dice_weight * dice
    return loss


@torch.no_grad()
def evaluate(model, data, vocab, n, batch_size=50):
    was = model.training
    model.eval()
    sweep = ThresholdSweep(DEFAULT_THRESHOLDS)
    bind_probs = []
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        probs = predict_probs(model, data, idx, vocab, batch_size=batch_size)
        sweep.update(probs, data["masks"][idx], meta=[data["metas"][i] for i in idx])
        bind_probs.append(probs)
    thr = sweep.best_threshold()
    s = sweep.summary(thr)
    kinds = sweep.summary_by("kind", thr)
    bind = binding(torch.cat(bind_probs), data, list(range(n)))
    batch = make_batch(data, list(range(50)), vocab)
    out = {"threshold": thr, "cum_iou": s["cum_iou"], "mean_iou": s["mean_iou"], "Pr@0.5": s["Pr@0.5"],
           "Pr@0.7": s["Pr@0.7"], "n": s["n"],
           "kinds": {k: {"cum_iou": round(v["cum_iou"], 4), "Pr@0.5": round(v["Pr@0.5"], 4), "n": v["n"]}
                     for k, v in kinds.items()},
           "binding": bind, "query_sensitivity": query_sensitivity(model, batch), "parts": fusion_parts(model, batch)}
    model.train(was)
    return out


def main():
    args = parse()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    os.makedirs(OUT, exist_ok=True)
    vocab = vocabulary()
    train = cached_split("train", args.train_size)
    val = cached_split("val", 1000, instances=True)
    model = build_model(args, vocab, train)
    opt = torch.optim.Adam(param_groups(model, args), lr=args.lr, weight_decay=args.wd)
    tcfg = TrainConfig(pos_weight=args.pos_weight, low_res_weight=args.low_res_weight)
    log_path = f"{OUT}/{args.name}.jsonl"
    open(log_path, "w").close()

    def log(row):
        print(json.dumps(row), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    log({"args": vars(args), "params": sum(p.numel() for p in model.parameters()),
         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "load": loadavg()})
    n_train = len(train["texts"])
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed))
    pos, epoch, train_s, losses, step = 0, 0, 0.0, [], 0
    train_mode(model)
    while step < args.steps and not (args.max_minutes and train_s > 60 * args.max_minutes):
        t0 = time.perf_counter()
        if pos + args.batch > n_train:
            epoch += 1
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed + epoch))
            pos = 0
        batch = make_batch(train, order[pos:pos + args.batch], vocab)
        pos += args.batch
        images = batch["images"].contiguous(memory_format=torch.channels_last)
        f = lr_factor(args, step)
        for g in opt.param_groups:
            g["lr"] = args.lr * f * g["lr_mult"]
        if step < args.stage1:
            logits, low = None, model(images, batch["tokens"], batch["lengths"], stage="low")
        else:
            logits, low = model(images, batch["tokens"], batch["lengths"], return_low_res=True)
        loss = loss_fn(logits, low, batch["masks"], tcfg, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        diag = args.diag_every and step < args.diag_until and (step % args.diag_every == 0)
        gn = grad_norms(model) if diag else None
        if args.clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
        step += 1
        train_s += time.perf_counter() - t0
        if gn is not None:
            log({"step": step, "loss": round(loss.item(), 4), "grad_norm": gn})
        done = step == args.steps or (args.max_minutes and train_s > 60 * args.max_minutes)
        if step % args.eval_every == 0 or done:
            n_val = (args.final_val_size or args.val_size) if done else args.val_size
            e0 = time.perf_counter()
            metrics = evaluate(model, val, vocab, n_val)
            row = {"step": step, "samples": step * args.batch, "train_s": round(train_s, 1),
                   "train_min": round(train_s / 60, 2), "samples_per_s": round(step * args.batch / train_s, 2),
                   "load": loadavg(), "lr": round(args.lr * f, 7), "train_loss": round(sum(losses) / len(losses), 4),
                   **metrics, "eval_s": round(time.perf_counter() - e0, 1)}
            losses = []
            if done and args.flip:
                row["flip"] = flip_test(model, val, vocab, metrics["threshold"], max_per_kind=200)
            log(row)
            train_mode(model)
    if args.save:
        torch.save(model.state_dict(), f"{OUT}/{args.name}.pt")


if __name__ == "__main__":
    main()
