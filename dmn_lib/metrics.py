"""Evaluation metrics of the paper (§4.2): IoU, the paper's "mIoU", Precision@X, and thresholds.

Taught in notebook 08 (evaluation). Read this next to §4.2 of the paper.

  * ``iou``            per-sample Intersection over Union of binary masks.
  * ``cumulative_iou`` Σ intersections / Σ unions over the whole split.
                       !!! THIS IS WHAT THE PAPER CALLS "mIoU" !!!  It is NOT the mean of the
                       per-sample IoUs: big objects weigh more than small ones.
  * ``mean_iou``       the plain average of per-sample IoUs (what "mean IoU" means elsewhere).
  * ``precision_at``   Pr@X: the fraction of samples whose IoU is *higher than* X (§4.2 says
                       "higher than"; the original code counted IoU >= X; pass ``inclusive=True``
                       for that). Fractions in [0, 1]; the paper prints percentages.
  * ``best_threshold`` the probability threshold that maximises cumulative IoU on one split.
  * ``ThresholdSweep`` an accumulator: feed it batches of probabilities and masks, then ask for any
                       of the above at any swept threshold, overall or per group (``summary_by``).

Conventions
-----------
* Masks are binary (bool or 0/1), shaped HxW, BxHxW or Bx1xHxW, as torch tensors or numpy arrays.
* A pixel is predicted foreground at threshold t when ``prob > t`` (as in the original code).
* Empty union (prediction and ground truth both empty): that sample's IoU is defined as 1.0 — the
  prediction is exactly right. It adds 0 to both sums of the cumulative IoU, so it does not change
  that number. (The original code produced 0/0 = NaN there, which never counted for Pr@X.)

Thresholds: pick on val, apply on test
--------------------------------------
The paper uses "optimal thresholds from the training or validation splits". The released code
instead took the best of 39 thresholds (0, 0.025, ..., 0.95) on the *test split itself*, which
peeks at the test labels. We pick the threshold on one split and apply it to another
(``threshold_transfer``) and report the original's number beside it, labelled "oracle".
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_THRESHOLDS", "PRECISION_THRESHOLDS", "ORACLE_LABEL",
    "intersection_union", "iou", "cumulative_iou", "mean_iou", "precision_at", "best_threshold",
    "ThresholdSweep", "threshold_transfer",
]

#: The 39 probability thresholds of the original code: 0, 0.025, ..., 0.95.
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 0.96, 0.025), 3)
#: The X of the paper's Pr@X columns (Table 1).
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
ORACLE_LABEL = "oracle: threshold chosen on the evaluated split itself (as the original code did)"
METRICS = ("cum_iou", "mean_iou")


# ----------------------------------------------------------------------------------------------
# Input checks (every error names the argument and what was wrong)
# ----------------------------------------------------------------------------------------------
def _as_batch(x: Any, name: str) -> torch.Tensor:
    """HxW, BxHxW or Bx1xHxW (torch or numpy) -> a BxHxW tensor (no copy when possible)."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()  # torch warns on (and must not share) read-only memory, e.g. arrays from PIL
    t = torch.as_tensor(x)
    if t.ndim == 2:
        return t.unsqueeze(0)
    if t.ndim == 3:
        return t
    if t.ndim == 4 and t.shape[1] == 1:
        return t[:, 0]
    raise ValueError(f"{name}: expected a mask shaped HxW, BxHxW or Bx1xHxW, got shape {tuple(t.shape)}")


def _as_binary(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t
    if t.is_complex() or not ((t == 0) | (t == 1)).all():
        lo, hi = (t.min().item(), t.max().item()) if t.numel() else (None, None)
        hint = " (a 0/255 image? use mask > 0)" if hi == 255 else " (probabilities? threshold them first, e.g. probs > 0.5)"
        raise ValueError(f"{name} must be a binary mask (bool or values 0/1), got values in [{lo}, {hi}]{hint}")
    return t.bool()


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch between {names}: {tuple(a.shape)} vs {tuple(b.shape)} "
            "(BxHxW after dropping a channel of 1); resize the prediction to the mask's size first"
        )


def _counts(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-sample counts, got shape {a.shape}")
    if (a < 0).any() or not np.isfinite(a).all():
        raise ValueError(f"{name}: counts must be finite and non-negative")
    return a


def _inter_union_any(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """(intersections, unions) as 1-D float arrays, from 1-D counts or from binary masks."""
    if np.ndim(a) == 1 and np.ndim(b) == 1:
        inter, union = _counts(a, "intersections"), _counts(b, "unions")
        if inter.shape != union.shape:
            raise ValueError(f"shape mismatch: {inter.size} intersections vs {union.size} unions")
        if (inter > union).any():
            raise ValueError("an intersection is larger than its union: are the arguments swapped?")
    else:
        inter, union = (torch.as_tensor(v).cpu().numpy().astype(np.float64) for v in intersection_union(a, b))
        inter, union = inter.reshape(-1), union.reshape(-1)
    if inter.size == 0:
        raise ValueError("no samples: the inputs are empty")
    return inter, union


def _ratio(inter, union):
    """Per-sample IoU with the empty-union convention (0/0 -> 1.0); numpy or torch."""
    if isinstance(inter, torch.Tensor):
        inter, union = inter.double(), union.double()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1e-300), 1.0)


def _check_thresholds(thresholds: Iterable[float], name: str = "thresholds") -> np.ndarray:
    t = np.asarray(list(thresholds) if not isinstance(thresholds, (np.ndarray, torch.Tensor)) else thresholds,
                   dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise ValueError(f"{name} is empty: give at least one threshold, e.g. {name}=(0.5,)")
    if not np.isfinite(t).all():
        raise ValueError(f"{name} must be finite numbers, got {t.tolist()}")
    return t


# ----------------------------------------------------------------------------------------------
# Functions on masks and per-sample numbers
# ----------------------------------------------------------------------------------------------
def intersection_union(pred: Any, target: Any):
    """Per-sample intersection and union areas (pixel counts) of two binary masks.

    pred, target: HxW, BxHxW or Bx1xHxW, bool or 0/1, torch or numpy (the two may differ in
    layout, e.g. Bx1xHxW vs BxHxW, but not in B, H or W). Returns two int64 arrays of length B,
    torch tensors (on pred's device) if either input is a tensor, numpy arrays otherwise.
    """
    as_torch = isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor)
    p = _as_binary(_as_batch(pred, "pred"), "pred")
    t = _as_binary(_as_batch(target, "target"), "target").to(p.device)
    _same_shape(p, t, "pred and target")
    inter = (p & t).flatten(1).sum(1)
    union = (p | t).flatten(1).sum(1)
    return (inter, union) if as_torch else (inter.numpy(), union.numpy())


def iou(pred: Any, target: Any):
    """Intersection over Union of each sample: |pred ∧ target| / |pred ∨ target|.

    Both empty (union 0) -> 1.0 by definition (see the module docstring).
    HxW inputs give a float; batches give B values (float64 torch tensor or numpy array,
    following the inputs, as in `intersection_union`).

    >>> iou(np.array([[1, 1], [0, 0]]), np.array([[1, 0], [1, 0]]))
    0.3333333333333333
    """
    inter, union = intersection_union(pred, target)
    values = _ratio(inter, union)
    return float(values[0]) if np.ndim(pred) == 2 and np.ndim(target) == 2 else values


def cumulative_iou(intersections: Any, unions: Any) -> float:
    """THE PAPER'S "mIoU": Σ intersections / Σ unions over all samples of a split (§4.2).

    Either per-sample counts (two 1-D arrays, e.g. from `intersection_union`), or two batches
    of binary masks (pred, target) — anything with 2+ dimensions is read as masks.
    All unions empty -> 1.0 (nothing to find and nothing predicted).
    """
    inter, union = _inter_union_any(intersections, unions)
    total = union.sum()
    return 1.0 if total == 0 else float(inter.sum() / total)


def mean_iou(ious_or_intersections: Any, unions: Any = None) -> float:
    """The average of per-sample IoUs — NOT the paper's "mIoU" (that is `cumulative_iou`).

    ``mean_iou(ious)`` averages given per-sample IoUs; ``mean_iou(intersections, unions)`` or
    ``mean_iou(pred_masks, target_masks)`` computes them first (empty union -> 1.0).
    """
    if unions is None:
        ious = _counts(ious_or_intersections, "ious")
        if ious.size == 0:
            raise ValueError("no samples: ious is empty")
    else:
        ious = _ratio(*_inter_union_any(ious_or_intersections, unions))
    return float(ious.mean())


def precision_at(ious: Any, thresholds: Sequence[float] = PRECISION_THRESHOLDS,
                 inclusive: bool = False) -> dict[float, float]:
    """Pr@X: the fraction of samples with IoU higher than X, for each X in `thresholds`.

    Returns {X: fraction in [0, 1]} (the paper prints percentages: multiply by 100).
    The paper says "higher than" (IoU > X, our default); the original code counted IoU >= X,
    which is ``inclusive=True``. The two differ only for IoUs exactly equal to X.
    """
    values = _counts(ious, "ious")
    if values.size == 0:
        raise ValueError("no samples: ious is empty")
    if (values > 1).any():
        raise ValueError("ious must lie in [0, 1]: did you pass areas instead of IoUs?")
    xs = _check_thresholds(thresholds)
    hit = values[None, :] >= xs[:, None] if inclusive else values[None, :] > xs[:, None]
    return {float(x): float(h.mean()) for x, h in zip(xs, hit)}


def best_threshold(probs_or_sweep: Any, targets: Any = None,
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS, metric: str = "cum_iou") -> float:
    """The probability threshold that maximises `metric` ("cum_iou" or "mean_iou") on one split.

    Pass a filled `ThresholdSweep`, or probabilities and binary targets (Bx1xHxW, all in memory).
    Ties go to the lowest threshold. Choose it on val and apply it to test: `threshold_transfer`.
    """
    if isinstance(probs_or_sweep, ThresholdSweep):
        if targets is not None:
            raise ValueError("best_threshold(sweep) takes no targets: the sweep already holds them")
        return probs_or_sweep.best_threshold(metric)
    if targets is None:
        raise ValueError("best_threshold(probs, targets): targets are missing")
    sweep = ThresholdSweep(thresholds)
    sweep.update(probs_or_sweep, targets)
    return sweep.best_threshold(metric)


# ----------------------------------------------------------------------------------------------
# The accumulator
# ----------------------------------------------------------------------------------------------
class ThresholdSweep:
    """Accumulates per-sample intersections and unions at many thresholds, batch by batch.

    Memory: 2 numbers per sample and threshold (not the masks), so a whole split fits easily.

        sweep = ThresholdSweep()                      # the original code's 39 thresholds
        for batch in loader:
            probs = torch.sigmoid(model(batch["images"], batch["tokens"], batch["lengths"]))
            sweep.update(probs, batch["masks"], meta=batch["meta"])
        t = sweep.best_threshold()                    # on val; then test_sweep.summary(t)
        sweep.summary(t)         # {'threshold', 'n', 'cum_iou', 'mean_iou', 'Pr@0.5', ...}
        sweep.summary_by("kind", t)                   # the same per expression kind

    `update` works on CPU or CUDA tensors; only B x K counts per batch come back to the CPU.
    """

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS):
        t = np.sort(_check_thresholds(thresholds))
        if (np.diff(t) == 0).any():
            raise ValueError(f"thresholds contain duplicates: {t.tolist()}")
        self.thresholds = t
        self._inter: list[np.ndarray] = []   # one n_batch x K array per update
        self._union: list[np.ndarray] = []
        self._meta: list[dict] = []

    # -- filling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, probs: Any, targets: Any, meta: Sequence[Mapping] | Mapping | None = None) -> None:
        """Add a batch: probs in [0, 1] (Bx1xHxW, BxHxW or HxW) and binary targets of the same size.

        meta: optional per-sample information for `summary_by` — a list of B dicts (what the
        course's `Collate` gives as batch["meta"]) or a dict of B-long lists.
        Counts equal ``intersection_union(probs > t, targets)`` at each threshold t, compared in
        the probabilities' precision (float32 unless they are float64), as torch does for `probs > t`.
        """
        p = _as_batch(probs, "probs")
        t = _as_binary(_as_batch(targets, "targets"), "targets").to(p.device)
        _same_shape(p, t, "probs and targets")
        if not p.is_floating_point():
            raise ValueError(f"probs must be floating-point probabilities, got dtype {p.dtype}")
        p = p if p.dtype == torch.float64 else p.float()
        if p.numel() and (p.min() < 0 or p.max() > 1):
            raise ValueError(
                f"probs must lie in [0, 1], got values in [{p.min().item():.3g}, {p.max().item():.3g}]: "
                "pass torch.sigmoid(logits), not the logits"
            )
        batch = p.shape[0]
        meta_rows = self._meta_rows(meta, batch)

        k = len(self.thresholds)
        thr = torch.as_tensor(self.thresholds, dtype=p.dtype, device=p.device)
        # bucket = how many thresholds lie strictly below a pixel's probability. The pixel is
        # foreground at threshold k (prob > t_k) exactly when bucket > k.
        bucket = torch.bucketize(p.flatten(1), thr)                        # B x P, values 0..K
        bucket = bucket + (k + 1) * torch.arange(batch, device=p.device)[:, None]  # K+1 bins per sample
        n_bins = batch * (k + 1)
        all_px = torch.bincount(bucket.flatten(), minlength=n_bins).view(batch, k + 1)
        gt_px = torch.bincount(bucket[t.flatten(1)], minlength=n_bins).view(batch, k + 1)
        # "bucket > k" = bins k+1..K: a cumulative sum from the right, dropping bin 0.
        pred_area = all_px.flip(1).cumsum(1).flip(1)[:, 1:]                 # B x K
        inter = gt_px.flip(1).cumsum(1).flip(1)[:, 1:]                      # B x K
        union = pred_area + t.flatten(1).sum(1, keepdim=True) - inter
        self._inter.append(inter.cpu().numpy())
        self._union.append(union.cpu().numpy())
        self._meta.extend(meta_rows)

    @staticmethod
    def _meta_rows(meta, batch: int) -> list[dict]:
        if meta is None:
            return [{} for _ in range(batch)]
        if isinstance(meta, Mapping):  # dict of lists -> list of dicts
            lengths = {key: len(v) for key, v in meta.items()}
            if any(n != batch for n in lengths.values()):
                raise ValueError(f"meta: every list must have one entry per sample ({batch}), got {lengths}")
            return [{key: meta[key][i] for key in meta} for i in range(batch)]
        rows = list(meta)
        if len(rows) != batch:
            raise ValueError(f"meta: expected {batch} entries (one per sample), got {len(rows)}")
        return [dict(r) for r in rows]

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._meta)

    @property
    def n(self) -> int:
        """Number of samples seen."""
        return len(self)

    @property
    def intersections(self) -> np.ndarray:
        """n x K per-sample intersection areas, one column per threshold."""
        return self._stack(self._inter)

    @property
    def unions(self) -> np.ndarray:
        """n x K per-sample union areas, one column per threshold."""
        return self._stack(self._union)

    def _stack(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            raise ValueError("the sweep is empty: call update() with at least one batch first")
        if len(parts) > 1:  # merge once, so repeated queries stay cheap
            parts[:] = [np.concatenate(parts)]
        return parts[0]

    def _index(self, threshold: float) -> int:
        hits = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-9))
        if hits.size == 0:
            raise ValueError(
                f"threshold {threshold} was not swept; this sweep has {len(self.thresholds)} thresholds "
                f"{np.round(self.thresholds, 4).tolist()}: build ThresholdSweep(thresholds=...) including it"
            )
        return int(hits[0])

    def _rows(self, rows: np.ndarray | None):
        inter, union = self.intersections, self.unions
        return (inter, union) if rows is None else (inter[rows], union[rows])

    def per_sample_iou(self, threshold: float) -> np.ndarray:
        """IoU of every sample at `threshold` (empty union -> 1.0)."""
        j = self._index(threshold)
        return _ratio(self.intersections[:, j], self.unions[:, j])

    def cumulative_iou(self, threshold: float) -> float:
        """The paper's "mIoU" at `threshold`: Σ intersections / Σ unions."""
        j = self._index(threshold)
        return cumulative_iou(self.intersections[:, j], self.unions[:, j])

    def mean_iou(self, threshold: float) -> float:
        """Average per-sample IoU at `threshold`."""
        return float(self.per_sample_iou(threshold).mean())

    def curve(self, metric: str = "cum_iou") -> np.ndarray:
        """`metric` ("cum_iou" or "mean_iou") at every threshold, aligned with `self.thresholds`."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        inter, union = self.intersections, self.unions
        if metric == "mean_iou":
            return _ratio(inter, union).mean(axis=0)
        total_i, total_u = inter.sum(0).astype(np.float64), union.sum(0).astype(np.float64)
        return np.where(total_u > 0, total_i / np.maximum(total_u, 1), 1.0)

    def best_threshold(self, metric: str = "cum_iou") -> float:
        """The swept threshold with the highest `metric` on these samples (ties: the lowest)."""
        return float(self.thresholds[int(np.argmax(self.curve(metric)))])

    def summary(self, threshold: float, precisions: Sequence[float] = PRECISION_THRESHOLDS,
                rows: np.ndarray | None = None) -> dict[str, float]:
        """All metrics at one threshold: {'threshold', 'n', 'cum_iou', 'mean_iou', 'Pr@0.5', ...}.

        'cum_iou' is the paper's "mIoU". Pr@X values are fractions of samples with IoU > X (§4.2).
        `rows` (indices or a boolean mask over samples) restricts it to a subset.
        """
        j = self._index(threshold)
        inter, union = self._rows(rows)
        inter, union = inter[:, j], union[:, j]
        if inter.size == 0:
            raise ValueError("no samples selected")
        ious = _ratio(inter, union)
        out = {"threshold": float(self.thresholds[j]), "n": int(inter.size),
               "cum_iou": cumulative_iou(inter, union), "mean_iou": float(ious.mean())}
        out.update({f"Pr@{x:g}": v for x, v in precision_at(ious, precisions).items()})
        return out

    def summary_by(self, key: str, threshold: float,
                   precisions: Sequence[float] = PRECISION_THRESHOLDS) -> dict[Any, dict[str, float]]:
        """`summary` for each value of meta[key] (e.g. the expression kind), sorted by value."""
        if len(self) == 0:
            raise ValueError("the sweep is empty: call update() with at least one batch first")
        missing = sum(key not in m for m in self._meta)
        if missing:
            raise ValueError(f"meta key {key!r} is missing for {missing} of {len(self)} samples "
                             "(pass meta=batch['meta'] to update())")
        values = np.array([m[key] for m in self._meta], dtype=object)
        groups = sorted(set(values.tolist()), key=lambda v: (str(type(v)), v))
        return {g: self.summary(threshold, precisions, rows=values == g) for g in groups}


def threshold_transfer(select_on: ThresholdSweep, evaluate_on: ThresholdSweep,
                       metric: str = "cum_iou") -> dict[str, Any]:
    """Choose the threshold on one split (e.g. val) and apply it to another (e.g. test).

    Returns {'threshold': t, 'result': evaluate_on.summary(t),
             'oracle_threshold': t*, 'oracle': evaluate_on.summary(t*), 'oracle_label': ...}
    where t* is the best threshold on `evaluate_on` itself — the original code's number, an
    optimistic "oracle" that looked at the test labels; report it only labelled as such.
    """
    t = select_on.best_threshold(metric)
    t_oracle = evaluate_on.best_threshold(metric)
    return {"threshold": t, "result": evaluate_on.summary(t),
            "oracle_threshold": t_oracle, "oracle": evaluate_on.summary(t_oracle),
            "oracle_label": ORACLE_LABEL}
