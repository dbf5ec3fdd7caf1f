"""Profile one DMN training step (stage 2) on CPU: where the time goes, and what each cheap win buys.

    PYTHONPATH=. OMP_NUM_THREADS=1 python explore/profile_step.py --threads 1 --steps 20
    PYTHONPATH=. python explore/profile_step.py --threads 2 --only base,bf16

Each setting: a fresh model (EfficientNet-Lite0 ImageNet, course widths, 128 px, batch 16 unless changed),
3 warm-up steps, then --steps timed steps on cached data (same batches for every setting). Per-module forward
and backward times come from module hooks (forward pre/post, backward pre/post); 'loss' and 'optimizer'
are timed directly. Prints one table row per setting and writes JSON lines to --out.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import defaultdict

import torch

from dmn_lib.data.synthetic import SynthRef
from dmn_lib.data.vocab import Collate
from dmn_lib.models.dmn import DMN
from dmn_lib.train import TrainConfig, stage_loss
from explore.common import cached_split, loadavg, make_batch, model_config, trim_backbone, vocabulary

SETTINGS = {
    "base": {},  # the command: EfficientNet-Lite0 ImageNet, untrimmed, fp32, on-the-fly data
    "cached": dict(cached=True),
    "trim": dict(cached=True, trim=True),
    "trim_cl": dict(cached=True, trim=True, channels_last=True),
    "trim_frozen_bn": dict(cached=True, trim=True, freeze_bn=True),
    "trim_freeze2": dict(cached=True, trim=True, freeze_blocks=2),  # stem + blocks 0-1 frozen (no grad)
    "trim_freeze3": dict(cached=True, trim=True, freeze_blocks=3),
    "trim_bf16": dict(cached=True, trim=True, bf16=True),
    "trim_sru_scratch": dict(cached=True, trim=True, model=dict(rnn="sru_scratch")),
    "trim_lstm": dict(cached=True, trim=True, model=dict(rnn="lstm")),
    "trim_b32": dict(cached=True, trim=True, batch=32),
    "trim_b8": dict(cached=True, trim=True, batch=8),
    "trim_160": dict(cached=True, trim=True, image_size=160),
    "trim_stage1": dict(cached=True, trim=True, stage="low"),
    "small_dpn": dict(cached=True, backbone="small_dpn"),
    "small_dpn_cl": dict(cached=True, backbone="small_dpn", channels_last=True),
    "trim_cl_freeze2": dict(cached=True, trim=True, channels_last=True, freeze_blocks=2),
    "trim_cl_freeze2_bn": dict(cached=True, trim=True, channels_last=True, freeze_blocks=2, freeze_bn=True),
    "trim_cl_freeze3": dict(cached=True, trim=True, channels_last=True, freeze_blocks=3),
    "trim_cl_b32": dict(cached=True, trim=True, channels_last=True, batch=32),
    "trim_cl_160": dict(cached=True, trim=True, channels_last=True, image_size=160),
    "trim_cl_bf16": dict(cached=True, trim=True, channels_last=True, bf16=True),
    "trim_cl_stage1": dict(cached=True, trim=True, channels_last=True, stage="low"),
}


class Timers:
    """Forward/backward wall time per named module, from hooks."""

    def __init__(self, modules: dict):
        self.total = defaultdict(float)
        self._start = {}
        for name, m in modules.items():
            m.register_forward_pre_hook(self._pre(name, "fwd"))
            m.register_forward_hook(self._post(name, "fwd"))
            m.register_full_backward_pre_hook(self._pre(name, "bwd"))
            m.register_full_backward_hook(self._post(name, "bwd"))
        self.on = False

    def _pre(self, name, phase):
        def hook(*_):
            if self.on:
                self._start[(name, phase)] = time.perf_counter()
        return hook

    def _post(self, name, phase):
        def hook(*_):
            if self.on and (name, phase) in self._start:
                self.total[f"{name}.{phase}"] += time.perf_counter() - self._start.pop((name, phase))
        return hook


def build(setting: dict, vocab):
    cfg = model_config(len(vocab), backbone=setting.get("backbone", "efficientnet_lite0"), **setting.get("model", {}))
    model = DMN(cfg)
    if setting.get("trim"):
        trim_backbone(model)
    bb = model.visual.backbone
    if setting.get("freeze_blocks"):
        frozen = [bb.conv_stem, bb.bn1] + list(bb.blocks[: setting["freeze_blocks"]])
        for m in frozen:
            m.requires_grad_(False)
    if setting.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model


def set_train_mode(model, setting):
    model.train()
    if setting.get("freeze_bn") or setting.get("freeze_blocks"):
        for m in model.visual.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and (setting.get("freeze_bn") or not any(
                    p.requires_grad for p in m.parameters())):
                m.eval()
        if setting.get("freeze_bn"):
            for m in model.visual.backbone.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.requires_grad_(False)


def run_setting(name, setting, vocab, steps, warmup=3):
    image_size = setting.get("image_size", 128)
    batch_size = setting.get("batch", 16)
    torch.manual_seed(0)
    model = build(setting, vocab)
    set_train_mode(model, setting)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tcfg = TrainConfig(pos_weight=3.0, low_res_weight=1.0)
    stage = setting.get("stage", "high")
    n = (steps + warmup) * batch_size
    if setting.get("cached"):
        data = cached_split("train", 20000, image_size=image_size)
        get = lambda s: make_batch(data, range(s * batch_size, (s + 1) * batch_size), vocab)  # noqa: E731
    else:  # what the library's trainer does: SynthRef renders every sample, Collate batches them
        ds, collate = SynthRef("unc", "train", image_size=image_size), Collate(vocab)
        get = lambda s: collate([ds[i] for i in range(s * batch_size, (s + 1) * batch_size)])  # noqa: E731
    mods = {"language": model.language, "msru": model.synthesis.msru,
            "synthesis": model.synthesis, "upsampling": model.upsampling}
    if model.language is None:
        mods.pop("language"), mods.pop("msru")
    timers = Timers(mods)
    fwd_visual = Timers({"visual": model.visual})  # forward hooks work on it; its backward ones do not
    fwd_visual.on = False
    parts = defaultdict(float)
    for s in range(warmup + steps):
        if s == warmup:
            timers.on = fwd_visual.on = True
            t_start = time.perf_counter()
        t0 = time.perf_counter()
        batch = get(s)
        images = batch["images"]
        if setting.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(setting.get("bf16"))):
            if stage == "low":
                logits, low = None, model(images, batch["tokens"], batch["lengths"], stage="low")
            else:
                logits, low = model(images, batch["tokens"], batch["lengths"], return_low_res=True)
            t2 = time.perf_counter()
            loss, _ = stage_loss(logits, low, batch["masks"], tcfg)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        if timers.on:
            for k, v in (("data", t1 - t0), ("forward", t2 - t1), ("loss.fwd", t3 - t2), ("backward", t4 - t3),
                         ("optimizer", t5 - t4)):
                parts[k] += v
    wall = time.perf_counter() - t_start
    row = {"setting": name, **{k: v for k, v in setting.items() if k != "model"}, "model": setting.get("model"),
           "threads": torch.get_num_threads(), "batch": batch_size, "steps": steps,
           "s_per_step": round(wall / steps, 4), "samples_per_s": round(steps * batch_size / wall, 2),
           "ms": {k: round(1000 * v / steps, 1) for k, v in {**parts, **timers.total, **fwd_visual.total}.items()
                  if k != "visual.bwd"},
           "load": loadavg()}
    # synthesis.fwd includes the mSRU: the fusion (eq. 9) + gather is the difference
    ms = row["ms"]
    if "msru.fwd" in ms:
        ms["fusion+gather.fwd"] = round(ms["synthesis.fwd"] - ms["msru.fwd"], 1)
        ms["fusion+gather.bwd"] = round(ms.get("synthesis.bwd", 0) - ms.get("msru.bwd", 0), 1)
    # the backbone returns a list, so module backward hooks cannot time it: it is the rest of backward
    ms["visual.bwd"] = round(ms["backward"] - ms.get("upsampling.bwd", 0) - ms.get("synthesis.bwd", 0)
                             - ms.get("language.bwd", 0), 1)
    return row


def main():
    warnings.filterwarnings("ignore", message="For backward hooks to be called")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    p.add_argument("--out", default="runs/explore/profile.jsonl")
    p.add_argument("--repeat", type=int, default=1, help="rounds over the settings, interleaved (the machine is shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vocab = vocabulary()
    names = args.only.split(",") if args.only else list(SETTINGS)
    for name in [n for _ in range(args.repeat) for n in names]:
        row = run_setting(name, SETTINGS[name], vocab, args.steps)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
