"""Diagnostics for brief Y: which part learns, and does the output depend on the words (not part of dmn_lib).

    grad_norms(model)            gradient L2 norm per module group (after backward)
    fusion_parts(model, batch)   RMS of each part of eq. 9's sum (I_N, F_t, LOC, r_t) and I_N's channel spread
    binding(probs, data, idx)    does the predicted mask sit on the TARGET object rather than a look-alike?
                                 top-1: the target has the highest mean probability among the scene's objects
    query_sensitivity(...)       how much the low-res logits move when the query is another sample's
"""
from __future__ import annotations

import torch

GROUPS = (("backbone", "visual."), ("embedding", "language.embedding"), ("lm_rnn", "language.rnn"),
          ("filters", "language.filters"), ("fusion", "synthesis.fusion"), ("msru", "synthesis.msru"),
          ("low_head", "synthesis.low_res_head"), ("um", "upsampling."), ("norm", "synthesis.norm"))


def _group(name: str) -> str:
    name = name.replace("inner.", "")
    for group, prefix in GROUPS:
        if name.startswith(prefix):
            return group
    return "other"


def grad_norms(model) -> dict:
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = _group(name)
            sq[g] = sq.get(g, 0.0) + float(p.grad.float().pow(2).sum())
    return {k: round(v ** 0.5, 5) for k, v in sq.items()}


def _inner(m):
    return getattr(m, "inner", m)


@torch.no_grad()
def fusion_parts(model, batch) -> dict:
    """The RMS (over batch, words, channels, pixels) of each term of eq. 9, as SynthesisModule.fuse adds them."""
    from dmn_lib.models.synthesis import location_map

    was = model.training
    model.eval()
    feats = model.visual(batch["images"])
    visual = feats[-1]
    r, filters = model.language(batch["tokens"])
    synth = model.synthesis
    if hasattr(synth, "norm"):
        visual = synth.norm(visual)
    sm = _inner(synth)
    w = dict(zip(sm.parts, sm.fusion.weight.flatten(1).split(list(sm.parts.values()), dim=1)))
    b, c, h, wd = visual.shape
    out = {"I_N_rms": visual.pow(2).mean().sqrt().item()}
    ch_rms = visual.pow(2).mean(dim=(0, 2, 3)).sqrt()
    out["I_N_channel_rms_max/median"] = (ch_rms.max() / ch_rms.median()).item()
    out["I_N_channel_mean_abs"] = visual.mean(dim=(0, 2, 3)).abs().mean().item()
    out["visual_term"] = torch.einsum("oc,bchw->bohw", w["visual"], visual).pow(2).mean().sqrt().item()
    loc = location_map(h, wd, visual.device, visual.dtype)
    out["loc_term"] = torch.einsum("oc,chw->ohw", w["loc"], loc).pow(2).mean().sqrt().item()
    map_ = torch.cat([visual, loc.expand(b, -1, -1, -1)], dim=1)
    if filters is not None:
        resp = torch.einsum("btkc,bchw->btkhw", filters, map_)
        out["F_t_rms"] = resp.pow(2).mean().sqrt().item()
        # how much F_t varies over the map (what can localise) vs its mean (a constant shift)
        out["F_t_spatial_std"] = resp.std(dim=(-1, -2)).mean().item()
        out["F_t_filter_mean"] = filters.mean().item()
        out["F_t_filter_std_over_words_batch"] = filters.std(dim=(0, 1)).mean().item()
        out["responses_term"] = torch.einsum("ok,btkhw->btohw", w["responses"], resp).pow(2).mean().sqrt().item()
        out["responses_term_spatial_std"] = torch.einsum("ok,btkhw->btohw", w["responses"], resp).std(
            dim=(-1, -2)).mean().item()
    out["visual_term_spatial_std"] = torch.einsum("oc,bchw->bohw", w["visual"], visual).std(dim=(-1, -2)).mean().item()
    if "words" in w and w["words"].numel():
        out["words_term"] = torch.einsum("or,btr->bto", w["words"], r).pow(2).mean().sqrt().item()
    model.train(was)
    return {k: round(v, 4) for k, v in out.items()}


def binding(probs: torch.Tensor, data: dict, idx) -> dict:
    """Per kind: the fraction of samples whose target has the highest mean probability among the objects,
    and the mean probability on the target minus the highest mean on any other object."""
    rows: dict[str, list] = {}
    for k, i in enumerate(idx):
        meta = data["metas"][i]
        inst = data["instances"][i]
        objects = [j for j, o in enumerate(meta["objects"]) if o["kind"] == "object"]
        means = {j: float(probs[k][inst[j]].mean()) if inst[j].any() else 0.0 for j in objects}
        others = [v for j, v in means.items() if j != meta["target"]]
        top1 = max(means, key=means.get) == meta["target"]
        margin = means[meta["target"]] - (max(others) if others else 0.0)
        for key in (meta["kind"], "all"):
            rows.setdefault(key, []).append((top1, margin, 1.0 / len(objects)))
    return {k: {"top1": round(sum(r[0] for r in v) / len(v), 3), "margin": round(sum(r[1] for r in v) / len(v), 3),
                "chance": round(sum(r[2] for r in v) / len(v), 3)} for k, v in rows.items()}


@torch.no_grad()
def query_sensitivity(model, batch) -> float:
    """mean |low(q_i) - low(q_{i+1})| / mean spatial std of low(q_i): low-res logits of each image with its
    own query and with the next sample's query. 0 = the words change nothing."""
    was = model.training
    model.eval()
    low = model(batch["images"], batch["tokens"], batch["lengths"], stage="low")
    low2 = model(batch["images"], batch["tokens"].roll(1, 0), batch["lengths"].roll(1, 0), stage="low")
    model.train(was)
    return round(float((low - low2).abs().mean() / low.std(dim=(-1, -2)).mean().clamp_min(1e-6)), 4)
