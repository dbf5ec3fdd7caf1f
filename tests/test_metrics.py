"""dmn_lib.metrics: hand-computed IoUs, the paper's cumulative "mIoU", Pr@X, threshold selection."""
import numpy as np
import pytest
import torch

from dmn_lib import metrics as M
from dmn_lib.metrics import (
    ThresholdSweep,
    best_threshold,
    cumulative_iou,
    intersection_union,
    iou,
    mean_iou,
    precision_at,
    threshold_transfer,
)

A = np.array([[1, 1], [0, 0]])
B = np.array([[1, 0], [1, 0]])
EMPTY = np.zeros((2, 2), dtype=bool)


# -- iou ----------------------------------------------------------------------------------------
def test_iou_hand_computed():
    assert iou(A, B) == pytest.approx(1 / 3)          # I = 1, U = 3
    assert iou(A, A) == 1.0
    assert iou(A, 1 - A) == 0.0
    assert iou(A.astype(bool), B.astype(np.float32)) == pytest.approx(1 / 3)  # dtypes may differ


def test_iou_empty_masks():
    assert iou(EMPTY, EMPTY) == 0.0                  # nothing to find, nothing predicted: 0, as the field counts it
    assert iou(EMPTY, A) == 0.0
    assert iou(A, EMPTY) == 0.0


def test_iou_batch_layouts_and_types():
    pred = np.stack([A, A, EMPTY])                  # B x H x W
    target = np.stack([B, A, EMPTY])[:, None]       # B x 1 x H x W
    np.testing.assert_allclose(iou(pred, target), [1 / 3, 1.0, 0.0])
    out = iou(torch.from_numpy(pred), torch.from_numpy(target))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (3,)
    inter, union = intersection_union(pred, target)
    assert inter.tolist() == [1, 2, 0] and union.tolist() == [3, 2, 0]


# -- cumulative vs mean -------------------------------------------------------------------------
def test_cumulative_and_mean_iou_differ():
    # A big object found exactly (I = U = 100) and a tiny one missed (I = 0, U = 2).
    pred = np.zeros((2, 10, 10), dtype=bool)
    target = np.zeros((2, 10, 10), dtype=bool)
    pred[0] = target[0] = True
    target[1, 0, 0] = True
    pred[1, 9, 9] = True
    assert cumulative_iou(*intersection_union(pred, target)) == pytest.approx(100 / 102)   # the paper's "mIoU"
    assert mean_iou(*intersection_union(pred, target)) == pytest.approx(0.5)
    assert cumulative_iou([100, 0], [100, 2]) == pytest.approx(100 / 102)
    assert mean_iou([100, 0], [100, 2]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"for masks pred and target use cumulative_iou\(\*intersection_union"):
        cumulative_iou(pred, target)  # one signature: counts


def test_cumulative_iou_empty_unions():
    assert cumulative_iou([0, 0], [0, 0]) == 0.0
    assert cumulative_iou([0, 3], [0, 4]) == pytest.approx(0.75)   # an empty sample adds nothing
    assert mean_iou([0, 3], [0, 4]) == pytest.approx((0.0 + 0.75) / 2)  # U = 0 counts as 0 (LAVT)
    np.testing.assert_array_equal(M.iou_from_counts(np.array([0, 3]), np.array([0, 4])), [M.EMPTY_UNION_IOU, 0.75])


# -- Pr@X ---------------------------------------------------------------------------------------
def test_precision_at_boundaries():
    ious = [0.5, 0.6, 0.9, 1.0, 0.0]
    strict = precision_at(ious)                       # "higher than" X, as §4.2
    assert strict == pytest.approx({0.5: 0.6, 0.6: 0.4, 0.7: 0.4, 0.8: 0.4, 0.9: 0.2})
    inclusive = precision_at(ious, inclusive=True)    # IoU >= X, as the original code
    assert inclusive == pytest.approx({0.5: 0.8, 0.6: 0.6, 0.7: 0.4, 0.8: 0.4, 0.9: 0.4})
    assert list(precision_at(ious, thresholds=np.array([0.25]))) == [0.25]
    assert all(type(k) is float for k in strict)


# -- ThresholdSweep -----------------------------------------------------------------------------
def _random_batch(seed, b=5, size=12):
    g = torch.Generator().manual_seed(seed)
    # probabilities taken from the threshold grid itself, so "prob == threshold" ties occur
    grid = torch.as_tensor(M.DEFAULT_THRESHOLDS, dtype=torch.float32)
    probs = grid[torch.randint(len(grid), (b, 1, size, size), generator=g)]
    probs[0] = 1.0                                     # a sample predicted everywhere
    targets = torch.rand(b, 1, size, size, generator=g) > 0.6
    targets[1] = False                                 # a sample with an empty ground truth
    probs[1] = 0.0                                     # ... and an empty prediction: union 0
    return probs, targets


def test_sweep_matches_direct_computation():
    batches = [_random_batch(0), _random_batch(1, b=3)]
    sweep = ThresholdSweep()
    for probs, targets in batches:
        sweep.update(probs, targets)
    probs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert sweep.n == len(sweep) == 8
    for j, t in enumerate(sweep.thresholds):
        pred = probs > float(t)
        inter, union = intersection_union(pred, targets)
        np.testing.assert_array_equal(sweep.intersections[:, j], inter.numpy())
        np.testing.assert_array_equal(sweep.unions[:, j], union.numpy())
        assert sweep.cumulative_iou(t) == pytest.approx(cumulative_iou(*intersection_union(pred, targets)))
        np.testing.assert_allclose(sweep.per_sample_iou(t), iou(pred, targets).numpy())
        s = sweep.summary(t)
        assert s["mean_iou"] == pytest.approx(mean_iou(*intersection_union(pred, targets)))
        pr = precision_at(iou(pred, targets).numpy())
        assert [s[f"Pr@{x:g}"] for x in pr] == pytest.approx(list(pr.values()))
    np.testing.assert_allclose(sweep.curve(), [sweep.cumulative_iou(t) for t in sweep.thresholds])


def test_sweep_accepts_numpy_and_layouts():
    probs, targets = _random_batch(2)
    a, b = ThresholdSweep([0.3, 0.5]), ThresholdSweep([0.5, 0.3])
    a.update(probs, targets)
    b.update(probs[:, 0].numpy(), targets.numpy())   # BxHxW vs Bx1xHxW, numpy
    np.testing.assert_array_equal(a.intersections, b.intersections)
    assert a.thresholds.tolist() == [0.3, 0.5]                         # sorted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sweep_on_cuda_matches_cpu():
    probs, targets = _random_batch(3)
    cpu, gpu = ThresholdSweep(), ThresholdSweep()
    cpu.update(probs, targets)
    gpu.update(probs.cuda(), targets.cuda())
    np.testing.assert_array_equal(cpu.intersections, gpu.intersections)
    np.testing.assert_array_equal(cpu.unions, gpu.unions)


def _split(target_prob, distractor_prob, n=4):
    """Each image: a target square (prob `target_prob`), a distractor square, background 0.05."""
    probs = torch.full((n, 1, 16, 16), 0.05)
    targets = torch.zeros(n, 1, 16, 16, dtype=torch.bool)
    probs[:, :, 2:8, 2:8] = target_prob
    targets[:, :, 2:8, 2:8] = True
    probs[:, :, 10:14, 10:14] = distractor_prob
    return probs, targets


def test_best_threshold_picked_on_val_applied_to_test():
    thresholds = (0.2, 0.5, 0.9)
    val, test = ThresholdSweep(thresholds), ThresholdSweep(thresholds)
    val.update(*_split(0.8, 0.4))     # 0.5 separates target from distractor: IoU 1
    test.update(*_split(0.95, 0.6))   # here only 0.9 does
    assert val.best_threshold() == 0.5
    assert val.cumulative_iou(0.5) == 1.0
    assert val.cumulative_iou(0.2) == pytest.approx(36 / 52)   # target 36 px + distractor 16 px
    assert val.cumulative_iou(0.9) == 0.0
    assert best_threshold(*_split(0.8, 0.4), thresholds=thresholds) == 0.5   # from arrays

    report = threshold_transfer(val, test)
    assert report["threshold"] == 0.5
    assert report["result"]["cum_iou"] == pytest.approx(36 / 52)   # val's choice is worse on test
    assert report["oracle_threshold"] == 0.9
    assert report["oracle"]["cum_iou"] == 1.0                       # the original code's number
    assert "oracle" in report["oracle_label"]


def test_best_threshold_ties_go_to_lowest():
    sweep = ThresholdSweep((0.1, 0.3, 0.5, 0.9))
    sweep.update(*_split(0.8, 0.05))   # 0.1, 0.3 and 0.5 are all perfect
    assert sweep.best_threshold() == 0.1
    assert sweep.best_threshold("mean_iou") == 0.1


def test_summary_by_meta_key():
    probs, targets = _split(0.8, 0.4, n=4)
    probs[2:] = 1 - probs[2:]          # the last two samples are predicted badly
    sweep = ThresholdSweep((0.5,))
    sweep.update(probs[:2], targets[:2], meta=[{"kind": "attribute"}, {"kind": "location"}])
    sweep.update(probs[2:], targets[2:], meta={"kind": ["location", "relation"]})   # dict of lists
    groups = sweep.summary_by("kind", 0.5)
    assert list(groups) == ["attribute", "location", "relation"]
    assert groups["attribute"]["n"] == 1 and groups["attribute"]["cum_iou"] == 1.0
    assert groups["location"]["n"] == 2
    assert groups["location"]["cum_iou"] == pytest.approx(
        cumulative_iou(*intersection_union(probs[1:3] > 0.5, targets[1:3])))
    assert groups["relation"]["Pr@0.5"] == 0.0
    assert sweep.summary(0.5)["n"] == 4


# -- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        iou(np.ones((2, 4, 4)), np.ones((2, 4, 5)))
    with pytest.raises(ValueError, match="target must be a binary mask"):
        iou(A, B * 0.5)
    with pytest.raises(ValueError, match="mask > 0"):
        iou(A, B * 255)
    with pytest.raises(ValueError, match="Bx1xHxW"):
        iou(np.ones((2, 3, 4, 4)), np.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="thresholds is empty"):
        ThresholdSweep([])
    with pytest.raises(ValueError, match="thresholds is empty"):
        precision_at([0.5], thresholds=())
    with pytest.raises(ValueError, match="duplicates"):
        ThresholdSweep([0.5, 0.5])
    with pytest.raises(ValueError, match="swapped"):
        cumulative_iou([3], [1])
    with pytest.raises(ValueError, match="no samples"):
        cumulative_iou([], [])
    with pytest.raises(ValueError, match="ious must lie in"):
        precision_at([3.0])

    sweep = ThresholdSweep((0.5,))
    with pytest.raises(ValueError, match="sweep is empty"):
        sweep.summary(0.5)
    probs, targets = _split(0.8, 0.4, n=2)
    with pytest.raises(ValueError, match="sigmoid"):
        sweep.update(probs * 4 - 2, targets)                # logits, not probabilities
    with pytest.raises(ValueError, match="shape mismatch"):
        sweep.update(probs[:, :, :8], targets)
    with pytest.raises(ValueError, match="targets must be a binary mask"):
        sweep.update(probs, probs)
    with pytest.raises(ValueError, match="meta"):
        sweep.update(probs, targets, meta=[{"kind": "a"}])  # 1 entry for 2 samples
    sweep.update(probs, targets)
    with pytest.raises(ValueError, match="not swept"):
        sweep.summary(0.3)
    with pytest.raises(ValueError, match="missing"):
        sweep.summary_by("kind", 0.5)
    with pytest.raises(ValueError, match="metric"):
        sweep.best_threshold("dice")
    with pytest.raises(TypeError, match="sweep.best_threshold"):
        best_threshold(sweep, None)


def test_reading_a_sweep_does_not_change_it():
    probs, targets = _split(0.8, 0.4, n=4)
    sweep = ThresholdSweep((0.3, 0.5))
    sweep.update(probs[:2], targets[:2])
    sweep.update(probs[2:], targets[2:])
    before = [a.copy() for a in sweep._inter]
    first = sweep.summary(0.5)
    assert sweep.summary(0.5) == first and len(sweep._inter) == 2
    assert all(np.array_equal(a, b) for a, b in zip(before, sweep._inter))
    other = ThresholdSweep((0.3, 0.5))
    other.add_counts(sweep.intersections, sweep.unions)
    assert other.summary(0.5) == first
