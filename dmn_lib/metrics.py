"""Evaluation metrics of the paper (§4.2): IoU, the paper's "mIoU", Precision@X, and thresholds.

Defined in notebook 08 (evaluation), §1-4. Read this next to §4.2 of the paper.

  * ``intersection_union`` per-sample intersection and union areas of binary masks: every metric
                       below is computed from these two counts.
  * ``iou``            per-sample Intersection over Union of binary masks (``iou_from_counts``: of counts).
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
* Empty union (prediction and ground truth both empty): that sample's IoU counts as 0
  (``EMPTY_UNION_IOU``), as the field computes mean IoU (LAVT counts a sample with U = 0 as 0, CRIS
  gets about 0 from a small epsilon). It adds 0 to both sums of the cumulative IoU, so it does not
  change that number. (The original code produced 0/0 = NaN there, which never counted for Pr@X.)
  The rule is coded once, in ``iou_from_counts``. Referring expressions always name an object, so
  it only arises for a degenerate sample (SynthRef has none).
* Size: IoU is computed at the size of the ground-truth mask the dataset gives. On the real datasets
  (`ReferDataset`), `inference.evaluate` measures at each image's ORIGINAL size, as CRIS and the
  original code do: the probabilities are resized back to the image before thresholding.

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
    "DEFAULT_THRESHOLDS", "PRECISION_THRESHOLDS", "ORACLE_LABEL", "EMPTY_UNION_IOU",
    "intersection_union", "iou", "iou_from_counts", "cumulative_iou", "mean_iou", "precision_at",
    "best_threshold", "threshold_counts", "ThresholdSweep", "threshold_transfer",
]

#: The 39 probability thresholds of the original code: 0, 0.025, ..., 0.95.
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 0.96, 0.025), 3)
#: The X of the paper's Pr@X columns (Table 1).
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
ORACLE_LABEL = "oracle: threshold chosen on the evaluated split itself (as the original code did)"
#: The IoU of a sample whose union is empty (nothing to find, nothing predicted): see the module docstring.
EMPTY_UNION_IOU = 0.0  # IoU of a sample with an empty union (see the module docstring)
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
        hint = (" (a 0/255 image? use mask > 0)" if hi == 255
                else " (probabilities? threshold them first, e.g. probs > 0.5)")
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


def _count_pair(intersections: Any, unions: Any, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """Two 1-D arrays of per-sample counts, checked."""
    if np.ndim(intersections) != 1 or np.ndim(unions) != 1:
        raise ValueError(f"{caller} takes per-sample counts (two 1-D arrays); for masks pred and target use "
                         f"{caller}(*intersection_union(pred, target))")
    inter, union = _counts(intersections, "intersections"), _counts(unions, "unions")
    if inter.shape != union.shape:
        raise ValueError(f"shape mismatch: {inter.size} intersections vs {union.size} unions")
    if (inter > union).any():
        raise ValueError("an intersection is larger than its union: are the arguments swapped?")
    if inter.size == 0:
        raise ValueError("no samples: the inputs are empty")
    return inter, union


def iou_from_counts(intersections: Any, unions: Any):
    """Intersection / union, elementwise, with the empty-union rule (0/0 -> EMPTY_UNION_IOU).

    The one place that rule is coded: per-sample IoUs, the cumulative IoU (of the sums) and every
    threshold curve go through here. numpy arrays (float64) or torch tensors (float64) in and out.
    Notebook 08, §1.
    """
    if isinstance(intersections, torch.Tensor):
        inter, union = intersections.double(), torch.as_tensor(unions, device=intersections.device).double()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, EMPTY_UNION_IOU))
    inter, union = np.asarray(intersections, np.float64), np.asarray(unions, np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1e-300), EMPTY_UNION_IOU)


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
    Notebook 08, §1.
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
    Notebook 08, §1.
    """
    values = iou_from_counts(*intersection_union(pred, target))
    return float(values[0]) if np.ndim(pred) == 2 and np.ndim(target) == 2 else values


def cumulative_iou(intersections: Any, unions: Any) -> float:
    """THE PAPER'S "mIoU": Σ intersections / Σ unions over all samples of a split (§4.2).

    Per-sample counts, two 1-D arrays (from `intersection_union`; for masks:
    ``cumulative_iou(*intersection_union(pred, target))``). All unions empty -> EMPTY_UNION_IOU.
    Notebook 08, §2.
    """
    inter, union = _count_pair(intersections, unions, "cumulative_iou")
    return float(iou_from_counts(inter.sum(), union.sum()))


def mean_iou(intersections: Any, unions: Any) -> float:
    """The average of per-sample IoUs — NOT the paper's "mIoU" (that is `cumulative_iou`).

    The same per-sample counts as `cumulative_iou`: divide per sample, then average (empty union:
    EMPTY_UNION_IOU); `cumulative_iou` sums first, then divides.
    Notebook 08, §2.
    """
    return float(iou_from_counts(*_count_pair(intersections, unions, "mean_iou")).mean())


def precision_at(ious: Any, thresholds: Sequence[float] = PRECISION_THRESHOLDS,
                 inclusive: bool = False) -> dict[float, float]:
    """Pr@X: the fraction of samples with IoU higher than X, for each X in `thresholds`.

    Returns {X: fraction in [0, 1]} (the paper prints percentages: multiply by 100).
    The paper says "higher than" (IoU > X, our default); the original code counted IoU >= X,
    which is ``inclusive=True``. The two differ only for IoUs exactly equal to X.
    Notebook 08, §3.
    """
    values = _counts(ious, "ious")
    if values.size == 0:
        raise ValueError("no samples: ious is empty")
    if (values > 1).any():
        raise ValueError("ious must lie in [0, 1]: did you pass areas instead of IoUs?")
    xs = _check_thresholds(thresholds)
    hit = values[None, :] >= xs[:, None] if inclusive else values[None, :] > xs[:, None]
    return {float(x): float(h.mean()) for x, h in zip(xs, hit)}


def best_threshold(probs: Any, targets: Any, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                   metric: str = "cum_iou") -> float:
    """The probability threshold that maximises `metric` ("cum_iou" or "mean_iou") on one split.

    probs and binary targets (Bx1xHxW, all in memory; batch by batch: `ThresholdSweep.best_threshold`).
    Ties go to the lowest threshold. Choose it on val and apply it to test: `threshold_transfer`.
    Notebook 08, §4.
    """
    if isinstance(probs, ThresholdSweep):
        raise TypeError("best_threshold(probs, targets) takes arrays; for a ThresholdSweep use sweep.best_threshold()")
    sweep = ThresholdSweep(thresholds)
    sweep.update(probs, targets)
    return sweep.best_threshold(metric)


def threshold_counts(probs: torch.Tensor, targets: torch.Tensor, thresholds: np.ndarray):
    """Per-sample intersections and unions of (probs > t) with targets at every threshold t (sorted):
    two B x K int64 tensors. One pass over the pixels, whatever the number of thresholds. Notebook 08, §4."""
    batch, k = probs.shape[0], len(thresholds)
    thr = torch.as_tensor(thresholds, dtype=probs.dtype, device=probs.device)
    # bucket = how many thresholds lie strictly below a pixel's probability. The pixel is
    # foreground at threshold k (prob > t_k) exactly when bucket > k.
    bucket = torch.bucketize(probs.flatten(1), thr)                              # B x P, values 0..K
    bucket = bucket + (k + 1) * torch.arange(batch, device=probs.device)[:, None]  # K+1 bins per sample
    n_bins = batch * (k + 1)
    all_px = torch.bincount(bucket.flatten(), minlength=n_bins).view(batch, k + 1)
    gt_px = torch.bincount(bucket[targets.flatten(1)], minlength=n_bins).view(batch, k + 1)
    # "bucket > k" = bins k+1..K: a cumulative sum from the right, dropping bin 0.
    pred_area = all_px.flip(1).cumsum(1).flip(1)[:, 1:]                          # B x K
    inter = gt_px.flip(1).cumsum(1).flip(1)[:, 1:]                               # B x K
    union = pred_area + targets.flatten(1).sum(1, keepdim=True) - inter
    return inter, union


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
    Notebook 08, §4.
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
        inter, union = threshold_counts(p, t, self.thresholds)
        self.add_counts(inter.cpu().numpy(), union.cpu().numpy(), meta)

    def add_counts(self, intersections: np.ndarray, unions: np.ndarray,
                   meta: Sequence[Mapping] | Mapping | None = None) -> None:
        """Add a batch of counts already made (B x K, one column per threshold, e.g. gathered from other
        processes by `dmn_lib.inference.evaluate`)."""
        inter, union = np.asarray(intersections), np.asarray(unions)
        if inter.ndim != 2 or inter.shape != union.shape or inter.shape[1] != len(self.thresholds):
            raise ValueError(f"counts must be B x {len(self.thresholds)} (one column per threshold), got "
                             f"{inter.shape} and {union.shape}")
        self._meta.extend(self._meta_rows(meta, inter.shape[0]))
        self._inter.append(inter)
        self._union.append(union)

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

    @staticmethod
    def _stack(parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            raise ValueError("the sweep is empty: call update() with at least one batch first")
        return np.concatenate(parts)

    def _index(self, threshold: float) -> int:
        hits = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-9))
        if hits.size == 0:
            raise ValueError(
                f"threshold {threshold} was not swept; this sweep has {len(self.thresholds)} thresholds "
                f"{np.round(self.thresholds, 4).tolist()}: build ThresholdSweep(thresholds=...) including it"
            )
        return int(hits[0])

    def per_sample_iou(self, threshold: float) -> np.ndarray:
        """IoU of every sample at `threshold` (empty union -> 1.0)."""
        j = self._index(threshold)
        return iou_from_counts(self.intersections[:, j], self.unions[:, j])

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
            return iou_from_counts(inter, union).mean(axis=0)
        return iou_from_counts(inter.sum(0), union.sum(0))

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
        inter, union = self.intersections[:, j], self.unions[:, j]
        if rows is not None:
            inter, union = inter[rows], union[rows]
        if inter.size == 0:
            raise ValueError("no samples selected")
        ious = iou_from_counts(inter, union)
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
    Notebook 08, §4.
    """
    t = select_on.best_threshold(metric)
    t_oracle = evaluate_on.best_threshold(metric)
    return {"threshold": t, "result": evaluate_on.summary(t),
            "oracle_threshold": t_oracle, "oracle": evaluate_on.summary(t_oracle),
            "oracle_label": ORACLE_LABEL}
