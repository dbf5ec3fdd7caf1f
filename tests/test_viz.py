"""dmn_lib.viz: arrays and figures of the right shapes, PNG files, clear errors, no global state."""
import matplotlib

matplotlib.use("Agg")  # tests only: the library never picks a backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dmn_lib import viz  # noqa: E402
from dmn_lib.metrics import ThresholdSweep  # noqa: E402

H = W = 24
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), dtype=bool)
    mask[4:12, 6:18] = True
    prob = np.clip(mask * 0.8 + rng.random((H, W)) * 0.2, 0, 1).astype(np.float32)
    return image, mask, prob


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# -- arrays -------------------------------------------------------------------------------------
def test_overlay(sample, tmp_path):
    image, mask, prob = sample
    out = viz.overlay(image, mask, color=(255, 0, 0), alpha=1.0)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (out[mask] == [255, 0, 0]).all()
    assert (out[~mask] == image[~mask]).all()
    soft = viz.overlay(image, torch.from_numpy(prob)[None], color="tab:blue")   # 1xHxW tensor
    assert soft.shape == (H, W, 3)
    viz.overlay(image, mask, save=tmp_path / "a" / "overlay.png")
    assert _is_png(tmp_path / "a" / "overlay.png")


def test_heatmap(sample):
    image, _, prob = sample
    alone = viz.heatmap(prob)
    blended = viz.heatmap(prob, image, alpha=0.5)
    assert alone.shape == blended.shape == (H, W, 3) and alone.dtype == np.uint8
    assert not np.array_equal(alone, blended)


# -- figures ------------------------------------------------------------------------------------
def test_show_sample(sample, tmp_path):
    image, mask, prob = sample
    fig = viz.show_sample(image, mask, "the $5 bill", pred=prob, save=tmp_path / "s" / "x.png")  # "$": no maths
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert "IoU 1.00" in fig.axes[0].get_title() and "5 bill" in fig.axes[0].get_title()
    assert _is_png(tmp_path / "s" / "x.png")
    fig2, ax = plt.subplots()                           # drawing into the caller's axes
    assert viz.show_sample(image, None, "no ground truth", ax=ax) is fig2
    plt.close(fig2)


def test_image_and_prob_puts_the_map_beside_the_image(sample, tmp_path):
    image, mask, prob = sample
    fig = viz.image_and_prob(image, prob, threshold=0.5, gt=mask, caption="the $5 bill", save=tmp_path / "p.png")
    ax_image, ax_map, ax_bar = fig.axes                 # image, map, and the map's colorbar
    assert (ax_image.images[0].get_array() == image).all()   # the image itself, untinted
    shown = ax_map.images[0]
    assert shown.get_cmap().name == viz.PROB_CMAP and shown.get_clim() == (0, 1)  # fixed range, not the data's
    assert "probability" in ax_bar.get_ylabel()
    assert len(ax_image.collections) == len(ax_map.collections) == 2   # threshold contour + ground truth
    assert "5 bill" in ax_image.get_title() and _is_png(tmp_path / "p.png")
    fig2, axes = plt.subplots(1, 2)                     # into the caller's axes, without a ground truth
    assert viz.image_and_prob(image, prob, axes=axes) is fig2 and len(axes[0].collections) == 1
    plt.close(fig2)
    with pytest.raises(ValueError, match="does not match"):
        viz.image_and_prob(image, prob[:10])


def test_outline_skips_constant_maps_and_keeps_a_dark_edge(sample):
    image, mask, _ = sample
    fig, ax = plt.subplots()
    contour = viz.outline(ax, mask)
    assert contour is not None and len(contour.get_path_effects()) == 2   # a black stroke under the colour
    assert viz.outline(ax, np.zeros((H, W))) is None and viz.outline(ax, np.ones((H, W))) is None
    plt.close(fig)


def test_qualitative_grid(sample, tmp_path):
    image, mask, prob = sample
    rows = [(image, prob, mask, "person on left"), (image, 1 - prob, None, "catcher")]
    fig = viz.qualitative_grid(rows, save=tmp_path / "grid.png")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 6 and len(fig.axes) == 7             # 2 rows x 3 panels, one shared colorbar
    assert fig.axes[1].images[0].get_cmap().name == viz.PROB_CMAP   # a sequential map, not jet
    assert fig.axes[1].images[0].get_clim() == (0, 1)               # over the fixed range of a probability
    assert fig.axes[0].get_title() == "Original image" and fig.axes[2].get_title() == "Ground truth"
    assert fig.axes[1].get_xlabel() == "(a) person on left"
    assert fig.axes[4].get_xlabel() == "(b) catcher"
    assert _is_png(tmp_path / "grid.png")


def test_figures_are_reproducible_and_leave_no_global_state(sample, tmp_path):
    image, mask, prob = sample
    rc_before = dict(matplotlib.rcParams)
    for name in ("one.png", "two.png"):
        viz.qualitative_grid([(image, prob, mask, "the ring above the green shape")], save=tmp_path / name)
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    assert dict(matplotlib.rcParams) == rc_before
    assert plt.get_fignums() == []                      # nothing registered with pyplot


def test_steps_strip(sample, tmp_path):
    image, mask, prob = sample
    words = ["the", "left", "ring"]
    steps = torch.rand(3, 1, 6, 6)                      # low-res steps are upsampled to the image
    fig = viz.steps_strip(image, steps, words, gt=mask, max_cols=3, save=tmp_path / "steps.png")
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert len(visible) == 4                            # input + one panel per word
    assert [ax.get_label() for ax in fig.axes].count("<colorbar>") == 1   # one colorbar for all the maps
    assert visible[1].images[0].get_cmap().name == viz.PROB_CMAP and len(visible[0].images) == 1
    assert [ax.get_title() for ax in visible] == ["input", "1. the", "2. left", "3. ring"]
    assert _is_png(tmp_path / "steps.png")
    with pytest.raises(ValueError, match="words has 2"):
        viz.steps_strip(image, steps, words[:2])
    with pytest.raises(ValueError, match="sigmoid"):
        viz.steps_strip(image, steps * 10 - 5, words)       # logits


def test_plot_curves(tmp_path):
    history = [{"step": i, "time": 0.5 * i, "loss": 1.0 / (i + 1)} for i in range(20)]
    for i in range(0, 20, 5):
        history[i]["val_cum_iou"] = 0.1 + 0.01 * i       # logged less often
    fig = viz.plot_curves(history, ["loss", "val_cum_iou"], smooth={"loss": 3}, log_keys=["loss"],
                          save=tmp_path / "curves.png")
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    assert _is_png(tmp_path / "curves.png")
    runs = pd.DataFrame({"time": list(range(10)) * 2, "loss": np.linspace(1, 0, 20),
                         "rnn": ["sru"] * 10 + ["lstm"] * 10})
    fig = viz.plot_curves(runs, "loss", x="time", hue="rnn", smooth=2)
    assert len(fig.axes[0].get_lines()) >= 2
    with pytest.raises(ValueError, match="no column"):
        viz.plot_curves(history, ["accuracy"])


def test_threshold_curve():
    sweeps = {}
    for name, seed in (("val", 0), ("test", 1)):
        g = torch.Generator().manual_seed(seed)
        sweeps[name] = ThresholdSweep()
        sweeps[name].update(torch.rand(3, 1, 8, 8, generator=g), torch.rand(3, 1, 8, 8, generator=g) > 0.5)
    fig = viz.threshold_curve(sweeps, selected=sweeps["val"].best_threshold())
    assert "mIoU" in fig.axes[0].get_ylabel()


def test_results_table_and_bars(tmp_path):
    ours = {"full": {"Pr@0.5": 0.5, "Pr@0.6": 0.4, "Pr@0.7": 0.3, "Pr@0.8": 0.2, "Pr@0.9": 0.1,
                     "cum_iou": 0.45678, "mean_iou": 0.4},
            "only VM": {"Pr@0.5": 0.2, "Pr@0.6": 0.1, "Pr@0.7": 0.05, "Pr@0.8": 0.02, "Pr@0.9": 0.0,
                        "cum_iou": 0.2, "mean_iou": 0.2}}
    paper = {"full": {"mIoU": 49.78, "Pr@0.5": 61.0}}
    table = viz.results_table(ours, paper=paper)
    assert isinstance(table, pd.DataFrame) and list(table.index) == ["full", "only VM"]
    assert list(table.columns[:3]) == ["Pr@0.5", "Pr@0.5 (paper)", "Pr@0.6"]   # only what the paper has
    assert table.columns[-1] == "mIoU (paper)" and len(table.columns) == 8
    assert table.loc["full", "mIoU"] == 45.68                       # percent, 2 decimals
    assert table.loc["full", "mIoU (paper)"] == 49.78
    assert np.isnan(table.loc["only VM", "mIoU (paper)"])
    small = viz.results_table(ours, columns={"cum_iou": "cum. IoU"}, percent=False, decimals=3)
    assert list(small.columns) == ["cum. IoU"] and small.loc["full", "cum. IoU"] == 0.457

    fig = viz.bar_compare(ours, paper={"full": 49.78}, save=tmp_path / "bars.png")
    assert sum(len(c) for c in fig.axes[0].containers) == 3          # 2 ours + 1 paper
    assert _is_png(tmp_path / "bars.png")


# -- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(sample, tmp_path):
    image, mask, prob = sample
    with pytest.raises(ValueError, match="tensor_to_image"):
        viz.overlay(torch.rand(3, H, W), mask)               # a model input, not a uint8 image
    with pytest.raises(ValueError, match="does not match"):
        viz.overlay(image, mask[:10])
    with pytest.raises(ValueError, match="sigmoid"):
        viz.heatmap(prob * 5 - 2)                            # logits
    with pytest.raises(ValueError, match=r"\.png"):
        viz.show_sample(image, mask, "x", save=tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        viz.qualitative_grid([(image, prob, mask)])
    with pytest.raises(ValueError, match="rows is empty"):
        viz.qualitative_grid([])
    with pytest.raises(ValueError, match="keys is empty"):
        viz.plot_curves([{"step": 0, "loss": 1.0}], [])
    with pytest.raises(ValueError, match="has no"):
        viz.results_table({"full": {"cum_iou": 0.5}})
