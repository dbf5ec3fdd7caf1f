"""Pictures and tables for the course: overlays, heatmaps, qualitative grids, curves, result tables.

Used across notebooks 01–11 (01: samples and masks; 05–06: a probability map beside its image; 07:
training curves; 08: result tables and threshold curves; 09–10: ablation and SRU-vs-LSTM bars and
curves; 11: qualitative grids like the paper's Figs. 8–9 and the mask word by word).

Conventions
-----------
* Images are uint8 HxWx3 arrays. A model input (normalised float 3xHxW) converts back with
  `dmn_lib.data.transforms.tensor_to_image`. Masks are HxW (or 1xHxW) bool/0-1; probabilities are
  HxW floats in [0, 1] (apply a sigmoid to logits first). torch tensors are accepted everywhere.
* Every function returns a `matplotlib.figure.Figure` that pyplot has already let go of: nothing
  is shown by itself (no `plt.show()`), nothing piles up in pyplot's list, whatever the backend. In
  a notebook leave the figure as the cell's last expression, or call `display(fig)`, to see it once.
  Functions that take `ax=` draw into your axes and return `ax.figure` (then pyplot shows it as usual).
* `save="figures/x.png"` writes a PNG at a fixed `DPI` (folders are created) without the
  matplotlib-version metadata, so regenerated figures are byte-for-byte comparable.
* Probabilities are drawn with a sequential colormap (`PROB_CMAP`) over a fixed [0, 1] with a colorbar,
  the threshold as a contour, and the image *beside* the map (`image_and_prob`), never tinted under
  it: a blend hides the colour the query names (a red star under a blue-to-red map reads orange).
* One fixed style (`STYLE`, seaborn "whitegrid" + DejaVu Sans) is applied inside each function
  only (`matplotlib.rc_context`); the global matplotlib settings are never changed.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.colors
import matplotlib.patheffects
import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure
from PIL import Image

from dmn_lib.metrics import iou

__all__ = [
    "DPI", "STYLE", "PRED_COLOR", "GT_COLOR", "PROB_CMAP", "PAPER_COLUMNS",
    "overlay", "heatmap", "outline", "prob_map", "image_and_prob", "show_sample", "qualitative_grid", "steps_strip",
    "plot_curves", "threshold_curve", "results_table", "markdown_table", "bar_compare", "save_figure",
]

DPI = 120
STYLE = {
    **sns.axes_style("whitegrid"),
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs on every machine
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8,
    "figure.dpi": 100, "image.interpolation": "nearest",
}
PRED_COLOR = (230, 57, 70)    # red: what the model predicts
GT_COLOR = (46, 204, 113)     # green: the ground truth
PROB_CMAP = "viridis"         # sequential: a probability reads the same in colour, in grey and to colour-blind eyes
#: Summary keys (see `dmn_lib.metrics.ThresholdSweep.summary`) -> the paper's column names.
PAPER_COLUMNS = {"Pr@0.5": "Pr@0.5", "Pr@0.6": "Pr@0.6", "Pr@0.7": "Pr@0.7", "Pr@0.8": "Pr@0.8",
                 "Pr@0.9": "Pr@0.9", "cum_iou": "mIoU"}


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _image(image: Any, name: str = "image") -> np.ndarray:
    a = _np(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        model_input = a.ndim == 3 and a.shape[0] == 3
        hint = " (a model input? use dmn_lib.data.transforms.tensor_to_image)" if model_input else ""
        raise ValueError(f"{name}: expected a uint8 HxWx3 image, got shape {a.shape}{hint}")
    if a.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels (0-255), got {a.dtype} "
                         "(use dmn_lib.data.transforms.tensor_to_image for model inputs)")
    return a


def _map(x: Any, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask or probability map -> float HxW in [0, 1] (a leading 1 is dropped)."""
    a = _np(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected an HxW (or 1xHxW) map, got shape {a.shape}")
    a = a.astype(np.float32)
    if a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 1):
        raise ValueError(f"{name}: values must lie in [0, 1], got [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}] "
                         "(logits? apply torch.sigmoid; a 0/255 mask? use mask > 0)")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name}: shape {a.shape} does not match the image's {tuple(shape)}; "
                         "resize it first (e.g. torch.nn.functional.interpolate)")
    return a


def _is_binary(a: np.ndarray) -> bool:
    return bool(np.isin(a, (0.0, 1.0)).all())


def _color(color: Any) -> np.ndarray:
    """RGB 0-255, RGB 0-1 (all values <= 1) or a matplotlib colour name -> float RGB 0-255."""
    if isinstance(color, str):
        return np.asarray(matplotlib.colors.to_rgb(color), dtype=np.float32) * 255
    c = np.asarray(color, dtype=np.float32).reshape(-1)
    if c.size != 3 or (c < 0).any() or (c > 255).any():
        raise ValueError(f"color: expected (R, G, B) in 0-255 or 0-1, or a colour name, got {color!r}")
    return c * 255 if c.max() <= 1 else c


def _figure(width: float, height: float) -> Figure:
    """A new Figure, detached from pyplot.

    It is made through pyplot (so a notebook's inline backend is loaded and can display it) and
    closed at once: pyplot forgets it, so it is neither shown twice nor kept alive.
    """
    import matplotlib.pyplot as plt  # the backend is whatever the user has: never chosen here

    # Not inside rc_context: the first pyplot figure loads the backend, and Jupyter's inline backend
    # then switches interactive mode on -- a change rc_context would undo on exit.
    fig = plt.figure(figsize=(width, height), dpi=STYLE["figure.dpi"], layout="constrained",
                     facecolor=STYLE["figure.facecolor"])
    plt.close(fig)
    return fig


def _bare(ax) -> None:
    """No ticks or frame, but keep room for an x label (captions)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(False)


def _wrap(text: str | None, width: int = 40) -> str:
    """Wrap a caption; "$" is escaped so matplotlib does not read it as maths ("the $5 bill")."""
    return "\n".join(textwrap.wrap(text.replace("$", r"\$"), width)) if text else ""


def save_figure(fig: Figure, save: str | Path) -> Path:
    """Write `fig` as PNG at `DPI`, creating folders; no version metadata (reproducible bytes). Notebook 00, §2."""
    path = Path(save)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save: figures are written as PNG, give a path ending in .png (got {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None}, facecolor="white")
    return path


def _save_array(rgb: np.ndarray, save: str | Path | None) -> None:
    if save is None:
        return
    path = Path(save)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save: give a path ending in .png (got {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="PNG")


# ----------------------------------------------------------------------------------------------
# Arrays
# ----------------------------------------------------------------------------------------------
def overlay(image: Any, mask_or_prob: Any, color: Sequence[float] = PRED_COLOR, alpha: float = 0.5,
            save: str | Path | None = None) -> np.ndarray:
    """Tint `image` with `color` where the mask is on: uint8 HxWx3 out.

    A probability map tints softly (opacity alpha * p), so confident pixels show strongest.
    `color`: RGB in 0-255, RGB in 0-1, or a matplotlib colour name such as "tab:red".
    Notebook 01, §1.
    """
    img = _image(image)
    m = _map(mask_or_prob, "mask_or_prob", img.shape[:2])[:, :, None] * float(alpha)
    out = img.astype(np.float32) * (1 - m) + _color(color)[None, None, :] * m
    rgb = np.clip(np.round(out), 0, 255).astype(np.uint8)
    _save_array(rgb, save)
    return rgb


def heatmap(prob: Any, image: Any = None, alpha: float = 0.5, cmap: str = PROB_CMAP,
            save: str | Path | None = None) -> np.ndarray:
    """Colour a probability map with `cmap` (0 -> low colour, 1 -> high): uint8 HxWx3.

    With `image`, the colours are blended over it with opacity `alpha`: a thumbnail, not a figure to read
    (the tint changes the colour the query names); the course's figures put the map beside the image
    instead (`image_and_prob`, `prob_map`; notebooks 05 and 06), so no notebook uses this one.
    """
    p = _map(prob, "prob")
    rgb = (matplotlib.colormaps[cmap](p)[:, :, :3] * 255).astype(np.float32)
    if image is not None:
        img = _image(image)
        if img.shape[:2] != p.shape:
            raise ValueError(f"prob: shape {p.shape} does not match the image's {img.shape[:2]}")
        rgb = img.astype(np.float32) * (1 - alpha) + rgb * alpha
    out = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    _save_array(out, save)
    return out


# ----------------------------------------------------------------------------------------------
# Probability maps beside their image
# ----------------------------------------------------------------------------------------------
def outline(ax, mask: Any, color: Any = GT_COLOR, linestyle: str = "-", linewidth: float = 1.5,
            level: float = 0.5):
    """Draw the `level` contour of a mask (or probability map) on `ax`, with a dark edge so that it reads
    on any object colour, a green object included. Returns the ContourSet, or None for a constant map
    (nothing to outline). Notebook 01, §1."""
    m = _map(mask, "mask")
    if not (m > level).any() or (m > level).all():  # contour() warns on maps with no crossing
        return None
    rgb = _color(color) / 255
    contour = ax.contour(m, levels=[level], colors=[tuple(rgb)], linewidths=linewidth, linestyles=linestyle)
    contour.set_path_effects([matplotlib.patheffects.Stroke(linewidth=linewidth + 1.6, foreground="black"),
                              matplotlib.patheffects.Normal()])
    return contour


def prob_map(ax, prob: Any, threshold: float | None = 0.5, gt: Any = None, cmap: str = PROB_CMAP,
             colorbar: bool = True, label: str = "probability"):
    """A probability map on `ax`: `cmap` over the fixed range [0, 1] (with a colorbar unless
    `colorbar=False`), the `threshold` contour in white (the predicted mask's edge) and, if given, the
    ground truth's outline in green, dashed. Returns the AxesImage (e.g. for one shared colorbar).
    Notebook 05, §5."""
    p = _map(prob, "prob")
    with matplotlib.rc_context(STYLE):
        shown = ax.imshow(p, cmap=cmap, vmin=0, vmax=1)
        if threshold is not None:
            outline(ax, p, "white", level=threshold)
        if gt is not None:
            outline(ax, _map(gt, "gt", p.shape), GT_COLOR, linestyle="--")
        if colorbar:
            ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label=label)
        _bare(ax)
    return shown


def image_and_prob(image: Any, prob: Any, threshold: float | None = 0.5, gt: Any = None,
                   caption: str | None = None, cmap: str = PROB_CMAP, axes=None,
                   save: str | Path | None = None) -> Figure:
    """The image beside its probability map: left the image, untouched but for the outlines (the
    threshold contour in white, the ground truth in green, dashed); right the map with `cmap`, a
    colorbar and the same contours. `axes=(ax_image, ax_map)` draws into your axes. This is what
    `python -m dmn_lib predict` writes as overlay.png. Notebook 06, §5."""
    img = _image(image)
    p = _map(prob, "prob", img.shape[:2])
    gt_map = None if gt is None else _map(gt, "gt", img.shape[:2])
    fig = axes[0].figure if axes is not None else _figure(6.4, 3.2)
    with matplotlib.rc_context(STYLE):
        ax_image, ax_map = axes if axes is not None else fig.subplots(1, 2)
        ax_image.imshow(img)
        if threshold is not None:
            outline(ax_image, p, "white", level=threshold)
        if gt_map is not None:
            outline(ax_image, gt_map, GT_COLOR, linestyle="--")
        _bare(ax_image)
        ax_image.set_title(_wrap(caption) if caption else "image")
        prob_map(ax_map, p, threshold, gt_map, cmap=cmap)
        ax_map.set_title("probability" + (f" (white: > {threshold:g})" if threshold is not None else ""))
    if save is not None:
        save_figure(fig, save)
    return fig


# ----------------------------------------------------------------------------------------------
# Images with their masks
# ----------------------------------------------------------------------------------------------
def show_sample(image: Any, mask: Any, text: str | None, pred: Any = None, ax=None,
                threshold: float = 0.5, color: Any = PRED_COLOR, save: str | Path | None = None) -> Figure:
    """One sample: the image, the ground truth as a green outline (edged in black, so it reads on a green
    object too), the prediction tinted red.

    `mask` may be None (no ground truth). `pred` may be a binary mask or probabilities; with
    both, the title also gives the IoU (probabilities thresholded at `threshold`). `color` tints
    the prediction (pick one that differs from the object's own colour).
    Notebook 01, §1.
    """
    img = _image(image)
    gt = None if mask is None else _map(mask, "mask", img.shape[:2])
    shown, title = img, _wrap(text)
    if pred is not None:
        p = _map(pred, "pred", img.shape[:2])
        shown = overlay(img, p, color)
        if gt is not None:
            binary = p if _is_binary(p) else (p > threshold)
            title += f"\nIoU {iou(binary > 0, gt > 0.5):.2f}"
    fig = ax.figure if ax is not None else _figure(3.2, 3.6)
    with matplotlib.rc_context(STYLE):
        ax = ax if ax is not None else fig.add_subplot()
        ax.imshow(shown)
        if gt is not None:
            outline(ax, gt)
        ax.set_title(title)
        _bare(ax)
    if save is not None:
        save_figure(fig, save)
    return fig


def qualitative_grid(rows: Sequence[Sequence[Any]],
                     titles: Sequence[str] = ("Original image", "Probability", "Ground truth"),
                     cmap: str = PROB_CMAP, threshold: float | None = 0.5, panel: float = 2.0,
                     letters: bool = True, save: str | Path | None = None) -> Figure:
    """Rows of (image, probability map, ground-truth mask, caption), like the paper's Figs. 8–9.

    Each row: the image, untouched | the probability map in `cmap` over [0, 1], its `threshold` contour
    in white | the ground truth; one colorbar for the whole grid, the caption (the query) under the map,
    lettered (a), (b), ... as in the paper. A ground truth of None leaves that panel blank. The map sits
    beside the image, not over it: a tint would change the colour the query names.
    Notebook 11, §5.
    """
    if len(rows) == 0:
        raise ValueError("rows is empty: give at least one (image, prob, gt_mask, caption) row")
    fig = _figure(3 * panel + 0.6, len(rows) * (panel + 0.45))
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(len(rows), 3, squeeze=False)
        for i, row in enumerate(rows):
            if len(row) != 4:
                raise ValueError(f"rows[{i}]: expected (image, prob, gt_mask, caption), got {len(row)} items")
            image, prob, gt, caption = row
            img = _image(image, f"rows[{i}] image")
            shown = prob_map(axes[i][1], _map(prob, f"rows[{i}] prob", img.shape[:2]), threshold,
                             cmap=cmap, colorbar=False)
            axes[i][0].imshow(img)
            if gt is not None:
                axes[i][2].imshow(_map(gt, f"rows[{i}] gt", img.shape[:2]), cmap="gray", vmin=0, vmax=1)
            for j, ax in enumerate(axes[i]):
                _bare(ax)
                if i == 0:
                    ax.set_title(titles[j])
            label = f"({chr(97 + i % 26)}) " if letters else ""
            axes[i][1].set_xlabel(_wrap(label + (caption or ""), 48))
        edge = f" (white: > {threshold:g})" if threshold is not None else ""
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=min(1.0, 2.5 / len(rows)), fraction=0.04, pad=0.02,
                     label="probability" + edge)
    if save is not None:
        save_figure(fig, save)
    return fig


def _check_steps(step_probs: Any, words: Sequence[str], shape: tuple[int, int]) -> torch.Tensor:
    """step_probs as T x H x W probabilities at the image's size (see `steps_strip`)."""
    steps = torch.as_tensor(_np(step_probs), dtype=torch.float32)
    if steps.ndim == 4 and steps.shape[1] == 1:
        steps = steps[:, 0]
    if steps.ndim != 3:
        raise ValueError(f"step_probs: expected T x H x W, got shape {tuple(steps.shape)}")
    if steps.shape[0] != len(words):
        raise ValueError(f"step_probs has {steps.shape[0]} steps but words has {len(words)}; "
                         "slice the steps to the query's real length, e.g. steps[:length]")
    if steps.shape[0] == 0:
        raise ValueError("words is empty: nothing to show")
    if steps.min() < 0 or steps.max() > 1:
        raise ValueError(f"step_probs: values must lie in [0, 1], got [{steps.min():.3g}, {steps.max():.3g}] "
                         "(logits? apply torch.sigmoid)")
    if tuple(steps.shape[1:]) != shape:
        steps = torch.nn.functional.interpolate(steps[:, None], size=shape, mode="bilinear",
                                                align_corners=False)[:, 0].clamp(0, 1)
    return steps


def steps_strip(image: Any, step_probs: Any, words: Sequence[str], gt: Any = None,
                max_cols: int = 6, cmap: str = PROB_CMAP, threshold: float | None = None, panel: float = 1.8,
                save: str | Path | None = None) -> Figure:
    """The mask after each word of a query: image | after word 1 | after word 2 | ...

    step_probs: T x H x W (or T x 1 x H x W) probabilities, one per word, e.g. the sigmoid of a
    model's `return_steps` output for one sample (only its real words, not the padding). Maps
    smaller than the image (e.g. a stride-32 map) are upsampled bilinearly to it. Each map is drawn
    in `cmap` over [0, 1] with one shared colorbar, the ground truth outlined in green (dashed) and,
    with `threshold`, the predicted mask's edge in white.
    Notebook 11, §6.
    """
    img = _image(image)
    steps = _check_steps(step_probs, words, img.shape[:2])
    panels = 1 + len(words)
    cols = max(1, min(max_cols, panels))
    n_rows = -(-panels // cols)
    gt_map = None if gt is None else _map(gt, "gt", img.shape[:2])
    fig = _figure(cols * panel + 0.6, n_rows * (panel + 0.3) + 0.4)
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(n_rows, cols, squeeze=False)
        flat = axes.ravel()
        flat[0].imshow(img)
        flat[0].set_title("input", fontweight="normal")
        for k, ax in enumerate(flat):
            _bare(ax)
            if k > len(words):
                ax.set_visible(False)
            elif k > 0:
                shown = prob_map(ax, steps[k - 1], threshold, gt_map, cmap=cmap, colorbar=False)
                ax.set_title(_wrap(f"{k}. {words[k - 1]}", 20), fontweight="bold")
        fig.colorbar(shown, ax=list(flat[1:panels]), fraction=0.05, pad=0.02, label="probability")
        fig.suptitle(_wrap(" ".join(words), 80))
    if save is not None:
        save_figure(fig, save)
    return fig


# ----------------------------------------------------------------------------------------------
# Curves, tables and bars
# ----------------------------------------------------------------------------------------------
def _frame(history: Any):
    import pandas as pd
    if isinstance(history, pd.DataFrame):
        return history.copy()
    if isinstance(history, Mapping):
        return pd.DataFrame(dict(history))
    return pd.DataFrame.from_records(list(history))


def plot_curves(history: Any, keys: Sequence[str] | str, x: str = "step", hue: str | None = None,
                smooth: int | Mapping[str, int] = 1, log_keys: Sequence[str] = (),
                titles: Mapping[str, str] | None = None, xlabel: str | None = None,
                save: str | Path | None = None) -> Figure:
    """Training curves: one panel per key (e.g. "loss", "val_cum_iou") against `x` ("step", "time").

    history: a list of dicts (one per logged step; keys absent at a step are skipped), a dict of
    lists, or a pandas DataFrame. `hue` names a column that separates runs (e.g. "rnn" for SRU vs
    LSTM). `smooth` > 1 draws a rolling mean over that many points (per run) over the faint raw
    curve; give {key: window} to smooth only some keys (e.g. the noisy loss, not a sparse val IoU).
    Notebook 07, §7.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("keys is empty: name at least one column to plot, e.g. keys=['loss']")
    df = _frame(history)
    needed = [x, *keys] + ([hue] if hue else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"history has no column(s) {missing}; it has {list(df.columns)}")
    fig = _figure(3.6 * len(keys), 2.8)
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        for ax, key in zip(axes, keys):
            d = df[[c for c in needed if c == x or c == hue or c == key]].dropna(subset=[key])
            window = smooth.get(key, 1) if isinstance(smooth, Mapping) else smooth
            draw = dict(x=x, y=key, hue=hue, ax=ax, estimator=None, errorbar=None,  # raw points, no CI
                        **({} if hue else {"color": "C0"}))
            if window > 1:  # faint raw curve, then its rolling mean on top
                sns.lineplot(data=d, alpha=0.25, legend=False, **draw)
                roll = lambda s: s.rolling(window, min_periods=1).mean()  # noqa: E731
                d = d.assign(**{key: d.groupby(hue, sort=False)[key].transform(roll) if hue else roll(d[key])})
            sns.lineplot(data=d, **draw)
            if key in log_keys:
                ax.set_yscale("log")
            ax.set_title((titles or {}).get(key, key))
            ax.set_xlabel(xlabel or x)
            ax.set_ylabel("")
    if save is not None:
        save_figure(fig, save)
    return fig


def threshold_curve(sweeps: Mapping[str, Any], metric: str = "cum_iou", selected: float | None = None,
                    ax=None, save: str | Path | None = None) -> Figure:
    """Cumulative IoU against the probability threshold, one line per split (notebook 08).

    sweeps: {"val": ThresholdSweep, "test": ThresholdSweep}. Each line's best threshold is marked
    with a dot; `selected` (e.g. the threshold chosen on val) is drawn as a dashed vertical line.
    """
    if not sweeps:
        raise ValueError("sweeps is empty: give e.g. {'val': val_sweep, 'test': test_sweep}")
    fig = ax.figure if ax is not None else _figure(4.2, 3.0)
    with matplotlib.rc_context(STYLE):
        ax = ax if ax is not None else fig.add_subplot()
        for name, sweep in sweeps.items():
            values = sweep.curve(metric)
            line, = ax.plot(sweep.thresholds, values, label=name)
            best = int(np.argmax(values))
            ax.plot([sweep.thresholds[best]], [values[best]], "o", color=line.get_color())
        if selected is not None:
            ax.axvline(selected, color="0.3", linestyle="--", linewidth=1, label=f"chosen: {selected:g}")
        ax.set_xlabel("probability threshold")
        ax.set_ylabel({"cum_iou": "cumulative IoU (paper's mIoU)", "mean_iou": "mean IoU"}.get(metric, metric))
        ax.legend()
    if save is not None:
        save_figure(fig, save)
    return fig


def results_table(rows: Mapping[str, Mapping[str, float]],
                  columns: Sequence[str] | Mapping[str, str] = PAPER_COLUMNS,
                  paper: Mapping[str, Mapping[str, float]] | None = None,
                  percent: bool = True, decimals: int = 2):
    """A pandas DataFrame of our results, optionally beside the paper's numbers.

    rows: {row name: metrics}, e.g. {"full": sweep.summary(t), "only VM": ...}.
    columns: the metric keys to show, or {key: display name}; the default shows Table 1's columns
      (Pr@0.5 ... Pr@0.9 and "mIoU", which is our "cum_iou" — the paper's mIoU).
    paper: {row name: {display name: value in %}} from the paper; each column the paper reports
      gets a "<name> (paper)" column right after it (NaN where a row has no paper number).
    percent: multiply our fractions by 100, as the paper prints them.
    Notebook 08, §6.
    """
    import pandas as pd
    if not rows:
        raise ValueError("rows is empty: give {row name: {metric: value}}")
    cols = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    if not cols:
        raise ValueError("columns is empty")
    if paper is not None and (unknown := set(paper) - set(rows)):
        raise ValueError(f"paper has rows {sorted(unknown)} that are not in rows {list(rows)}")
    scale = 100.0 if percent else 1.0
    # a "(paper)" column for each metric the paper reports in at least one row
    reported = [k for k, shown in cols.items()
                if any(shown in theirs or k in theirs for theirs in (paper or {}).values())]
    records = {}
    for name, metrics in rows.items():
        missing = [k for k in cols if k not in metrics]
        if missing:
            raise ValueError(f"row {name!r} has no {missing}; it has {list(metrics)}")
        record = {}
        for key, shown in cols.items():
            record[shown] = float(metrics[key]) * scale
            if key in reported:
                theirs = paper.get(name, {})
                value = theirs.get(shown, theirs.get(key))
                record[f"{shown} (paper)"] = np.nan if value is None else float(value)
        records[name] = record
    return pd.DataFrame.from_dict(records, orient="index").round(decimals)


def markdown_table(frame, digits: int = 1, formats: Mapping[str, str] | None = None) -> str:
    """A DataFrame as a markdown table, without extra dependencies (notebook 09, §3: results/*/*.md).

    Numbers are rounded to `digits` decimals, NaN reads "—" (no such number, e.g. no paper row);
    `formats` gives a column its own format, e.g. {"parameters": "{:,.0f}"}.
    """
    formats = formats or {}

    def cell(column, value):
        if column in formats:
            return formats[column].format(value)
        if isinstance(value, float):
            return "—" if value != value else f"{value:.{digits}f}"
        return str(value)

    index_name = " / ".join(str(n) for n in frame.index.names if n) or ""
    lines = ["| " + " | ".join([index_name] + [str(c) for c in frame.columns]) + " |",
             "|" + "---|" * (len(frame.columns) + 1)]
    for key, values in frame.iterrows():
        key = " ".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
        lines.append("| " + " | ".join([key] + [cell(c, v) for c, v in values.items()]) + " |")
    return "\n".join(lines)


def bar_compare(values: Mapping[str, Any], paper: Mapping[str, float] | None = None,
                metric: str = "cum_iou", percent: bool = True, ylabel: str = "mIoU (%)",
                title: str | None = None, ax=None, save: str | Path | None = None) -> Figure:
    """Bars per variant (e.g. the ablation rows of Table 1), ours beside the paper's if given.

    values: {variant: number} or {variant: summary dict} (then `metric` picks the number);
    paper: {variant: number in %}. `percent` multiplies our numbers by 100.
    Notebook 09, §3.
    """
    import pandas as pd
    if not values:
        raise ValueError("values is empty: give {variant: number}")
    scale = 100.0 if percent else 1.0
    records = []
    for name, v in values.items():
        number = v[metric] if isinstance(v, Mapping) else v
        records.append({"variant": name, "source": "ours", "value": float(number) * scale})
        if paper is not None and name in paper:
            records.append({"variant": name, "source": "paper", "value": float(paper[name])})
    df = pd.DataFrame.from_records(records)
    fig = ax.figure if ax is not None else _figure(max(3.5, 0.9 * len(values) + 1.5), 3.0)
    with matplotlib.rc_context(STYLE):
        ax = ax if ax is not None else fig.add_subplot()
        sns.barplot(data=df, x="variant", y="value", hue="source", ax=ax,
                    palette={"ours": "#4C72B0", "paper": "#BBBBBB"},
                    hue_order=["ours", "paper"][:df["source"].nunique()])
        for container in ax.containers:
            ax.bar_label(container, fmt="%.1f", fontsize=7, padding=1)
        ax.set_xlabel("")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.tick_params(axis="x", rotation=20 if len(values) > 4 else 0)
        ax.legend(title=None)
    if save is not None:
        save_figure(fig, save)
    return fig
