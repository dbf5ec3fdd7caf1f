"""The paper's experiments (§5), as data and one runner — defined in notebooks 09 (Table 1, the
ablation) and 10 (Fig. 7, SRU vs LSTM); Table 2's layout is shown in notebooks 08 and 09.

    python -m dmn_lib experiment ablation --spec course --device cpu --out results/course
    python -m dmn_lib experiment rnn      --spec course --device cpu --out results/course
    python -m dmn_lib experiment table2   --spec course --device cpu --out results/course
    python -m dmn_lib experiment report   --out results/course      # every table and figure, from results

An experiment is a list of `Row`s: a name, the paper's label and the overrides of a spec that make
the row (`RunSpec.override`: Table 1's switches are fields of DMNConfig, Table 2's columns SynthRef
variants). Every row of an experiment overrides the same named spec (dmn_lib.spec: course, paper,
fast, tiny), is evaluated with the threshold picked on val, and is written to OUT/<experiment>/<row>/:

    model.pt       the weights in fp16 (checkpoint.load_model reads it)
    run.json       the row's spec, metrics on every split (and by expression kind), provenance:
                   git commit, library versions, device, seed, steps, epochs, wall time
    history.json   the training curves (loss per step, validation metrics over steps and time)
    checkpoint.pt  the full training state while the row trains (not committed): an interrupted
                   experiment started again resumes every row where it stopped, and skips done rows.

Rows that are the same run in two experiments (the full DMN on unc is Table 1's last row, the SRU
of Fig. 7 and Table 2's unc column) are trained once, in the folder of the experiment that owns them.
run.json files written before dmn_lib 0.2 ("size_name", "label_size") are read by `run_spec`,
`spec_name` and `spec_label`.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dmn_lib import checkpoint as ckpt
from dmn_lib.config import DMNConfig
from dmn_lib.data.synthetic import VARIANT_SPLITS
from dmn_lib.spec import SPECS, DataSpec, RunSpec, TrainConfig, spec
from dmn_lib.weights import efficientnet_lite0_weights

__all__ = [
    "EXPERIMENTS", "ROWS", "Row", "PAPER_TABLE1", "PAPER_TABLE2", "PAPER_RNN_PARAMETERS", "PRECISIONS",
    "rows", "row_spec", "run_dir", "eval_splits", "efficientnet_lite0_weights", "run_row", "run_experiment",
    "make_command", "load_runs", "load_history", "run_spec", "spec_name", "spec_label", "recipe_fields",
    "recipe_difference",
    "ablation_table", "by_kind_table", "table2", "rnn_summary", "rnn_table", "plot_ablation", "plot_rnn",
    "WORD_FREE", "ATTRIBUTES_ONLY", "word_free_bounds", "attributes_only_bounds", "kind_bounds_table",
    "kind_bounds_by_split",
    "REPORTS", "report",
]

EXPERIMENTS = ("ablation", "rnn", "table2")  # the paper's (`all`)
RUNS = ("unc15", "flagship")  # the course's own: the 15-minute run and the flagship model (notebooks 07, 08, 11)
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
# Rows: overrides of a spec
# =============================================================================================
@dataclass(frozen=True)
class Row:
    """One row of an experiment (notebook 09, §1): a name, the paper's label, and the overrides of the
    experiment's spec that make it (`RunSpec.override`)."""

    name: str  # folder name and key
    label: str  # as the paper's table writes it
    overrides: dict = field(default_factory=dict)  # e.g. {"model": {"use_language": False}}
    owner: str | None = None  # the experiment whose folder holds this run, if another one's

    @property
    def model(self) -> dict:
        """The DMNConfig fields this row changes."""
        return dict(self.overrides.get("model", {}))

    @property
    def variant(self) -> str:
        """The SynthRef variant it trains on."""
        return self.overrides.get("data", {}).get("variant", DataSpec().variant)

    @property
    def pretrained(self) -> str | None:
        """The backbone whose ImageNet weights it starts from (dmn_lib.weights), if any."""
        return self.overrides.get("imagenet_weights")

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "overrides": self.overrides, "owner": self.owner}


# The backbone rows: the course spec's Visual Module without its ImageNet weights (nothing frozen then),
# and the course's earlier backbone, a small DPN (DMNConfig.preset("small_dpn")'s), from scratch.
NO_IMAGENET = {"imagenet_weights": None, "model": dict(frozen_blocks=0)}
SMALL_DPN = {"imagenet_weights": None, "model": {k: DMNConfig.preset("small_dpn").to_dict()[k] for k in (
    "backbone", "backbone_kwargs", "trim_backbone", "frozen_blocks")}}
ROWS: dict[str, list[Row]] = {
    # Table 1, in the paper's order, then rows of ours.
    "ablation": [
        Row("only_vm", "Only VM", {"model": dict(use_language=False)}),
        Row("only_h", "Only h_t in LM and SM", {"model": dict(concat_embeddings=False)}),
        Row("no_skip", "No skip connections in UM", {"model": dict(skip_connections=False)}),
        Row("no_dynamic_filters", "No dynamic filters", {"model": dict(dynamic_filters=False)}),
        Row("no_concat_rt", "No concatenation of r_t", {"model": dict(concat_rt=False)}),
        Row("full", "DMN"),
        Row("no_loc", "No LOC (ours)", {"model": dict(use_loc=False)}),
        Row("no_imagenet", "No ImageNet weights: EfficientNet-Lite0 from scratch (ours)", NO_IMAGENET),
        Row("small_dpn", "A small DPN from scratch, the earlier course backbone (ours)", SMALL_DPN),
    ],
    # Fig. 7: the same network with SRUs or LSTMs in the Language and Synthesis Modules.
    "rnn": [
        Row("sru", "SRU", owner="ablation"),  # = the full DMN of the ablation
        Row("lstm", "LSTM", {"model": dict(rnn="lstm")}),
    ],
    # Table 2's layout: the full DMN on each variant, every split.
    "table2": [
        Row("unc", "UNC", owner="ablation"),
        Row("unc+", "UNC+", {"data": dict(variant="unc+")}),
        Row("gref", "GRef", {"data": dict(variant="gref")}),
        Row("referit", "ReferIt", {"data": dict(variant="referit")}),
    ],
}
# The course's own runs. The 15-minute run (the README's course-mode command, notebook 07's course mode):
# the course spec by the clock, stage 2's decay ending at 15 minutes of training on whatever machine; beside
# it the image-only model with the same recipe and time (its val metrics go into the full model's run.json,
# under "image_only"). The flagship (notebooks 04, 05, 08 and 11): the same recipe for 60 minutes of training.
MINUTES_15 = {"train": {"steps_high": 1_000_000, "max_minutes": 15.0, "lr_schedule_minutes": 15.0}}
FLAGSHIP = {"train": {"steps_high": 10_000_000, "lr_schedule_minutes": 60.0, "eval_every": 1000}}
ROWS["unc15"] = [Row("full", "DMN, 15 minutes", MINUTES_15),
                 Row("image_only", "Only VM, 15 minutes", {**MINUTES_15, "model": dict(use_language=False)})]
ROWS["flagship"] = [Row("unc", "DMN, flagship", FLAGSHIP)]
FOLDERS = {("unc15", "full"): "unc15", ("unc15", "image_only"): "unc15/image_only", ("flagship", "unc"): "unc"}
OWNED_AS = {("rnn", "sru"): "full", ("table2", "unc"): "full"}  # the name of the run in its owner's folder


def rows(experiment: str) -> list[Row]:
    """The rows of "ablation", "rnn" or "table2". Notebook 09, §1."""
    if experiment not in ROWS:
        raise ValueError(f"Unknown experiment {experiment!r}; choose one of {EXPERIMENTS + RUNS}")
    return ROWS[experiment]


def row_spec(row: Row, spec_name: str = "course", seed: int = 0) -> RunSpec:
    """The spec a row trains with: the named spec, the row's overrides, the seed of data and training.
    Notebook 09, §2."""
    run = spec(spec_name).override(**row.overrides)
    return run.override(data={"data_seed": seed}, train={"seed": seed})


def run_dir(out: str | Path, experiment: str, row: Row, seed: int = 0) -> Path:
    """Where a row's files are: its own experiment's folder, or its owner's; another training seed's run of
    the row in a `seed<k>` folder inside it. Notebook 09, §2."""
    if (experiment, row.name) in FOLDERS:
        folder = Path(out) / FOLDERS[(experiment, row.name)]
    elif row.owner is not None:
        folder = Path(out) / row.owner / OWNED_AS[(experiment, row.name)]
    else:
        folder = Path(out) / experiment / row.name
    return folder / f"seed{seed}" if seed else folder


def eval_splits(variant: str) -> list[str]:
    """val (the threshold is picked there) and every test split of the variant. Notebook 09, §2."""
    return [s for s in VARIANT_SPLITS[variant] if s not in ("train", "ambiguous")]


# =============================================================================================
# run.json: what a row's results record, read back
# =============================================================================================
def run_spec(run: dict) -> RunSpec:
    """The spec a run.json's row was trained with (also from files written before dmn_lib 0.2). Notebook 09, §3."""
    if "size" not in run["spec"]:
        return RunSpec.from_dict(run["spec"])
    size, row = run["spec"]["size"], run["spec"]["row"]  # before 0.2: a "size" and the row's switches
    data = DataSpec(variant=row["variant"], image_size=size["image_size"], train_size=size["train_size"],
                    val_size=size["val_size"], test_size=size["test_size"], data_seed=run["provenance"]["seed"])
    return RunSpec(DMNConfig.from_dict(run["config"]), data, TrainConfig.from_dict(run["train_config"]),
                   imagenet_weights=row.get("pretrained"))


def spec_name(run: dict) -> str:
    """The named spec a run.json's row overrides ("course", ...). Notebook 09, §3."""
    return run["spec_name"] if "spec_name" in run else run["size_name"]


def spec_label(run: dict) -> str:
    """How tables and figures name the spec, e.g. "course spec (dpn68, 128 px, 150+650 steps of batch 16)".
    Notebook 09, §3."""
    return run["spec_label"] if "spec_label" in run else run["label_size"]


# Fields that do not change a run's result: where it runs and writes, and what it prints.
_SYSTEM_FIELDS = {"model": ("vocab_size", "pretrained_file"), "train": ("out_dir", "device", "progress", "num_workers")}


def recipe_fields(run: RunSpec) -> dict:
    """A run spec as a dict without the fields that cannot change its result (where it runs and writes, what it
    prints): two runs with equal recipe fields train the same model. Notebook 09, exercise 2."""
    if not isinstance(run, RunSpec):
        raise TypeError(f"recipe_fields takes a RunSpec, not a {type(run).__name__}; for a run.json dict, "
                        "pass run_spec(run)")
    d = json.loads(json.dumps(run.to_dict()))  # tuples and lists alike, as run.json stores them
    for part, names in _SYSTEM_FIELDS.items():
        for name in names:
            d[part].pop(name)
    return d


def recipe_difference(a: RunSpec, b: RunSpec) -> list[str]:
    """The recipe fields in which two run specs differ, as sorted "part.field" names, e.g. ["train.pos_weight"].
    Notebook 09, exercise 2."""
    fa, fb = recipe_fields(a), recipe_fields(b)
    names = []
    for part in sorted(set(fa) | set(fb)):
        da, db = fa.get(part), fb.get(part)
        if isinstance(da, dict) and isinstance(db, dict):
            names += [f"{part}.{k}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
        elif da != db:
            names.append(part)
    return names


def _is_done(folder: Path) -> bool:
    return all((folder / name).is_file() for name in RUN_FILES)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# =============================================================================================
# One row: train (resumably), evaluate with the threshold from val, export
# =============================================================================================
WORD_FREE = ("all objects (their union)", "the largest object", "a random object")
#: the guesses of a reader of attributes alone: it reads the target's colour, shape and size words and
#: ignores its place and its relation, so it can only choose among the objects those words fit
ATTRIBUTES_ONLY = ("the objects its attributes fit (their union)", "the largest of them", "a random one of them")


def _word_free_guesses(masks, meta, rng) -> tuple:
    # the union of all objects, the largest, a random one: none of them looks at the query
    return masks.any(0), masks[masks.sum((1, 2)).argmax()], masks[rng.integers(len(masks))]


def _attributes_only_guesses(masks, meta, rng) -> tuple:
    # the same three guesses among the objects that have every attribute the description names
    # (synthetic.fits_attributes); the description's location and relation are never read
    from dmn_lib.data.synthetic import fits_attributes

    fit = [k for k, obj in enumerate(meta["objects"]) if fits_attributes(obj, meta["description"])]  # the target too
    return masks[fit].any(0), masks[fit][masks[fit].sum((1, 2)).argmax()], masks[fit[rng.integers(len(fit))]]


def _guess_bounds(data, split, size, cache_dir, names, guesses_of, prefix="") -> dict:
    """{guess: {"metrics": ..., "by_kind": ...}} for the guesses `guesses_of(masks, meta, rng)` makes on
    each sample (seed 0), cached as JSON in `cache_dir`. SynthRef only ({} for REFER data)."""
    import numpy as np

    from dmn_lib.data.datasets import make_dataset
    from dmn_lib.metrics import ThresholdSweep

    if data.source != "synthref":
        return {}
    ds, rng = make_dataset(data, split, size), np.random.default_rng(0)
    cached = (Path(cache_dir or ".") /
              f"{prefix}{data.variant}_{split}_{len(ds)}_{data.image_size}px_seed{data.data_seed}.json")
    if cache_dir and cached.is_file():
        return json.loads(cached.read_text())
    sweeps = {name: ThresholdSweep([0.5]) for name in names}
    for i in range(len(ds)):
        masks = np.stack(ds.instance_masks(i))
        meta = ds.scene(i)[0]
        target = torch.from_numpy(masks[meta["target"]])[None]
        for name, guess in zip(names, guesses_of(masks, meta, rng)):
            sweeps[name].update(torch.from_numpy(guess)[None].float(), target, [{"kind": meta["kind"]}])
    bounds = {name: {"metrics": s.summary(0.5), "by_kind": {str(k): v for k, v in s.summary_by("kind", 0.5).items()}}
              for name, s in sweeps.items()}
    if cache_dir:
        from dmn_lib.train import write_json

        write_json(cached, bounds)  # atomic: rows trained side by side may write it at once
    return bounds


def word_free_bounds(data, split: str, size: int | None = None, cache_dir: str | Path | None = None) -> dict:
    """The guesses that never read the query, on the samples a row is evaluated on (notebook 07, §6):
    {guess: {"metrics": ..., "by_kind": ...}} for the union of all objects, the largest object and a random
    one (seed 0). A model must beat them to show it reads the words. SynthRef only ({} for REFER data).
    `cache_dir`: kept there as JSON, since every row of an experiment is evaluated on the same samples."""
    return _guess_bounds(data, split, size, cache_dir, WORD_FREE, _word_free_guesses)


def attributes_only_bounds(data, split: str, size: int | None = None, cache_dir: str | Path | None = None) -> dict:
    """What a reader of attributes alone could reach (notebook 08, §5): the guesses of `word_free_bounds`
    made among the objects that fit the target's colour, shape and size words, its place and relation
    ignored. A model beats them on location and relation queries only by reading place words. On attribute
    queries the attributes are the whole description, so there they fit the target alone (the bound is 1)."""
    return _guess_bounds(data, split, size, cache_dir, ATTRIBUTES_ONLY, _attributes_only_guesses, "attributes_only_")


def kind_bounds_table(run: dict, split: str = "val", cache_dir: str | Path | None = None):
    """A run's per-kind cumulative IoU and Pr@0.5 beside the best word-free guess and the best guess of a
    reader of attributes alone (each metric the best of the three guesses): a pandas DataFrame, rows =
    kinds, columns = (metric, reader). Notebook 08, §5."""
    import pandas as pd

    spec, n = run_spec(run), run["results"][split]["metrics"]["n"]
    readers = {"model": {"": {"by_kind": run["results"][split]["by_kind"]}},
               "no words": word_free_bounds(spec.data, split, n, cache_dir),
               "attributes only": attributes_only_bounds(spec.data, split, n, cache_dir)}
    table = {}
    for metric, key in (("cum IoU", "cum_iou"), ("Pr@0.5", "Pr@0.5")):
        for reader, guesses in readers.items():
            table[(metric, reader)] = {kind: max(g["by_kind"][kind][key] for g in guesses.values())
                                       for kind in run["results"][split]["by_kind"]}
    return pd.DataFrame(table)


#: where each split's threshold is picked (the paper: "optimal thresholds from the training or validation
#: splits"): the test splits' on val, val's own on a train subset (its first `val_size` samples)
THRESHOLD_FROM = {"val": "train"}
TRAIN_SUBSET_LABEL = "train subset"


def evaluate_row(model, vocab, run: RunSpec, device: str, cache_dir: str | Path | None = None) -> tuple[dict, float]:
    """Every split of the row's variant at a threshold picked on another split (notebook 08, §4): the test
    splits at val's best threshold, val at a train subset's. (results, the threshold picked on val).
    Each split also records its oracle (the threshold picked on itself), labelled so."""
    from dmn_lib.data.datasets import make_dataset
    from dmn_lib.inference import evaluate
    from dmn_lib.metrics import threshold_transfer
    from dmn_lib.runtime import make_loader

    def sweep_of(split, size=None):
        loader = make_loader(make_dataset(run.data, split, size), vocab, run.train.batch_size)
        return evaluate(model, loader, device=device)["sweep"]

    sweeps = {split: sweep_of(split) for split in eval_splits(run.data.variant)}
    sweeps["train"] = sweep_of("train", run.data.val_size or len(sweeps["val"]))
    results = {}
    for split in eval_splits(run.data.variant):
        source = THRESHOLD_FROM.get(split, "val")
        picked = threshold_transfer(sweeps[source], sweeps[split])
        t = picked["threshold"]
        results[split] = {"metrics": picked["result"],
                          "threshold_from": TRAIN_SUBSET_LABEL if source == "train" else source,
                          "oracle": {**picked["oracle"], "label": picked["oracle_label"]},
                          "by_kind": {str(k): v for k, v in sweeps[split].summary_by("kind", t).items()},
                          "by_lookalikes": {str(k): v for k, v in sweeps[split].summary_by("n_lookalikes", t).items()},
                          "word_free": word_free_bounds(run.data, split, len(sweeps[split]), cache_dir)}
    return results, sweeps["val"].best_threshold()


def run_row(experiment: str, row: Row, spec_name: str = "course", out: str | Path = "results/course",
            device: str = "cpu", threads: int | None = None, progress: bool = True, seed: int = 0,
            command: str | None = None) -> dict:
    """Train and evaluate one row (or resume it, or return it if done); returns its run.json. Notebook 09, §2."""
    from dmn_lib import count_parameters
    from dmn_lib.benchmark import device_name
    from dmn_lib.data.datasets import build_vocabulary, make_dataset
    from dmn_lib.models.dmn import DMN
    from dmn_lib.train import train, write_json

    if threads:
        torch.set_num_threads(threads)
    folder = run_dir(out, experiment, row, seed)
    where = {"out_dir": str(folder), "device": device, "progress": progress}
    run = row_spec(row, spec_name, seed).override(train=where)
    if (folder / "run.json").is_file():
        saved = json.loads((folder / "run.json").read_text())
        if recipe_fields(run_spec(saved)) != recipe_fields(run):
            raise ckpt.CheckpointError(  # a RuntimeError the CLI reports in one line
                f"{folder} holds a run made with other settings (spec or row). Use another --out, "
                f"or delete {folder} to train this row again.")
        if _is_done(folder):
            return saved

    train_set, val_set = make_dataset(run.data, "train"), make_dataset(run.data, "val")
    vocab = build_vocabulary(train_set)
    torch.manual_seed(seed)
    model = DMN(run.model_config(len(vocab)))
    history = train(model, train_set, vocab, run.train, val_set=val_set, data=run.data, resume=True,
                    extra={"spec": spec_name, "experiment": experiment, "row": row.name, "command": command})
    state = ckpt.load_checkpoint(folder / "checkpoint.pt")
    results, threshold = evaluate_row(model, vocab, run, device, cache_dir=Path(out) / "word_free")
    ckpt.export_model(folder / "checkpoint.pt", folder / "model.pt")

    progress_state = state["progress"]
    t = run.train
    record = {
        "experiment": experiment, "row": row.name, "label": row.label, "variant": run.data.variant,
        "spec_name": spec_name, "spec_label": f"{spec_name} spec ({run.model.backbone}, {run.data.image_size} px, "
                                              f"{t.steps_low}+{t.steps_high} steps of batch {t.batch_size})",
        "spec": run.to_dict(), "overrides": row.overrides, "config": state["config"],
        "train_config": state["train_config"],
        "threshold": threshold, "threshold_from": "val", "results": results, "parameters": count_parameters(model),
        "provenance": {
            "git_commit": _git_commit(), "versions": ckpt.library_versions(),
            "device": device_name(torch.device(device)),
            "torch_threads": torch.get_num_threads(), "host": platform.node(), "seed": seed,
            "steps": progress_state["step"], "epochs": progress_state["step"] / (len(train_set) // t.batch_size),
            "wall_seconds": progress_state["elapsed"], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command,
        },
        "final_val": history["val"][-1] if history["val"] else None,
        "progress": progress_state, "extra": {"data": run.data.to_dict()},  # as in the checkpoint
    }
    write_json(folder / "run.json", record)
    return record


def merge_image_only(out: str | Path) -> dict | None:
    """The 15-minute run's record gets its image-only twin's val metrics, under "image_only" (once both
    are done). Notebook 07, §7."""
    full, image_only = (run_dir(out, "unc15", row) / "run.json" for row in ROWS["unc15"])
    if not (full.is_file() and image_only.is_file()):
        return None
    from dmn_lib.train import write_json

    record, twin = json.loads(full.read_text()), json.loads(image_only.read_text())
    record["image_only"] = {"results": {"val": twin["results"]["val"]}, "final_val": twin["final_val"],
                            "progress": twin["progress"], "parameters": twin["parameters"],
                            "folder": "image_only/"}
    write_json(full, record)
    return record


def _run_row_job(args: tuple) -> tuple[str, str, float, float]:
    experiment, row, seed, kwargs = args
    start = time.perf_counter()
    run = run_row(experiment, row, seed=seed, **kwargs)
    name = f"{row.name} (seed {seed})" if seed else row.name
    return experiment, name, run["results"]["val"]["metrics"]["cum_iou"], time.perf_counter() - start


def _stop_with_parent(parent: int) -> None:
    """In a worker of `run_experiment`: end when the experiment's process (pid `parent`) ends (Linux).
    Without it, killing the command leaves its workers training on, writing into the run folders of the
    next command."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG: a signal when the parent ends
    if os.getppid() != parent:  # it ended before this worker got here
        os._exit(1)


def run_experiment(experiments: str | list[str], spec_name: str = "course", out: str | Path = "results/course",
                   device: str = "cpu", jobs: int = 1, threads: int | None = None, progress: bool = True,
                   command: str | None = None, echo: Callable[[str], None] = print,
                   figures_dir: str | Path | None = None, only: list[str] | None = None,
                   seeds: tuple[int, ...] = (0,)) -> list[Path]:
    """Train and evaluate every row of one or more experiments (done rows are skipped, cut-off rows
    resume; `only` restricts it to the named rows; `seeds`: each row once per training seed), then write
    the experiments' tables and figures.
    With jobs > 1, rows train side by side in separate processes (`threads` torch threads each; the
    default splits the cores between them). Notebook 09, §3."""
    from tqdm.auto import tqdm

    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    if spec_name not in SPECS:
        raise ValueError(f"Unknown spec {spec_name!r}; choose one of {', '.join(SPECS)}")
    known = {row.name for experiment in experiments for row in rows(experiment)}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise ValueError(f"Unknown rows {unknown} for {experiments}; choose from {sorted(known)}")
    todo, seen = [], set()
    for seed in seeds:
        for experiment in experiments:
            for row in rows(experiment):
                folder = run_dir(out, experiment, row, seed)
                if (not only or row.name in only) and folder not in seen:
                    seen.add(folder)
                    todo.append((experiment, row, seed))
    # Runs whose times are compared (Fig. 7) go first, side by side, so they share the machine alike.
    timed_together = {run_dir(out, "rnn", r) for r in rows("rnn")}
    todo.sort(key=lambda ers: run_dir(out, *ers) not in timed_together)
    pending = [(e, r, s) for e, r, s in todo if not _is_done(run_dir(out, e, r, s))]
    echo(f"{len(todo)} runs, {len(todo) - len(pending)} already done; training {len(pending)} "
         f"({spec_name} spec, {device}, {jobs} at a time) into {out}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(jobs, 1)) if device == "cpu" else None
    kwargs = dict(spec_name=spec_name, out=out, device=device, threads=threads, progress=progress and jobs == 1,
                  command=command)
    if jobs <= 1:
        for experiment, row, seed in pending:
            echo(f"-> {experiment}/{row.name}: {row.label}" + (f", seed {seed}" if seed else ""))
            _, _, iou, seconds = _run_row_job((experiment, row, seed, kwargs))
            echo(f"   val cumulative IoU {iou:.3f} ({seconds / 60:.1f} min)")
    elif pending:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_stop_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_run_row_job, (e, r, s, kwargs)) for e, r, s in pending]
            for future in tqdm(as_completed(futures), total=len(futures), desc="runs", disable=not progress):
                experiment, name, iou, seconds = future.result()
                tqdm.write(f"{experiment}/{name}: val cumulative IoU {iou:.3f} ({seconds / 60:.1f} min)")
    if "unc15" in experiments:
        merge_image_only(out)
    paper = [e for e in experiments if e in EXPERIMENTS]
    return report(out, paper, figures_dir=figures_dir, echo=echo) if paper else []


# =============================================================================================
# Results -> tables and figures (the notebooks call the same functions)
# =============================================================================================
def load_runs(out: str | Path, experiment: str) -> dict[str, dict]:
    """{row name: run.json} of the rows of `experiment` that are done under `out`. Notebook 09, §3."""
    found = {}
    for row in rows(experiment):
        path = run_dir(out, experiment, row) / "run.json"
        if path.is_file():
            found[row.name] = json.loads(path.read_text())
    return found


def load_seed_runs(out: str | Path, experiment: str) -> dict[str, list[dict]]:
    """{row name: [run.json of every training seed that is done, seed 0 first]}. Notebook 09, §4."""
    found = {}
    for row in rows(experiment):
        folder = run_dir(out, experiment, row)
        paths = [folder / "run.json"] + sorted(folder.glob("seed*/run.json"), key=lambda p: int(p.parent.name[4:]))
        runs = [json.loads(p.read_text()) for p in paths if p.is_file()]
        if runs:
            found[row.name] = runs
    return found


def load_history(out: str | Path, experiment: str, row_name: str) -> dict:
    """The training curves (history.json) of one row. Notebook 09, §6."""
    row = next(r for r in rows(experiment) if r.name == row_name)
    return json.loads((run_dir(out, experiment, row) / "history.json").read_text())


def make_command(experiment: str, spec_name: str = "course", out: str = "results/course") -> str:
    """The command that makes an experiment's results (notebooks print it where results are missing)."""
    device = "cuda" if spec_name == "paper" else "cpu"
    jobs = " --jobs 2" if spec_name == "course" else ""
    return f".venv/bin/python -m dmn_lib experiment {experiment} --spec {spec_name} --device {device}{jobs} --out {out}"


PRECISIONS = ("Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")


def ablation_table(out: str | Path, split: str = "testA"):
    """Table 1 (ours, percent) with the paper's numbers beside it: a pandas DataFrame, one row per
    ablation row that is done. Notebook 09, §3."""
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
    """Cumulative IoU (percent) by expression kind: rows x {attribute, location, relation}. Notebook 09, §5."""
    import pandas as pd

    runs = load_runs(out, experiment)
    data = {}
    for row in rows(experiment):
        if row.name in runs:
            data[row.label] = {k: 100 * v["cum_iou"] for k, v in runs[row.name]["results"][split]["by_kind"].items()}
    return pd.DataFrame(data).T


def table2(out: str | Path):
    """Table 2's layout: cumulative IoU (percent) per variant and split, ours and the paper's DMN row.
    Notebook 09, §7."""
    import pandas as pd

    runs = load_runs(out, "table2")
    columns = [(v, s) for v in ("referit", "gref", "unc", "unc+") for s in eval_splits(v)]
    ours = {(v, s): 100 * run["results"][s]["metrics"]["cum_iou"]
            for run in runs.values() for (v, s) in columns if run["variant"] == v and s in run["results"]}
    name = spec_name(next(iter(runs.values()))) if runs else "course"
    index = pd.MultiIndex.from_tuples([(PAPER_DATASET_NAMES[v], s) for v, s in columns], names=["dataset", "split"])
    return pd.DataFrame({
        "DMN, paper (real data)": [PAPER_TABLE2.get(c, float("nan")) for c in columns],
        f"DMN, ours (SynthRef, {name} spec)": [ours.get(c, float("nan")) for c in columns],
    }, index=index).T


def rnn_summary(out: str | Path) -> dict:
    """Fig. 7 in numbers: per RNN, wall time per epoch, val IoU per epoch, parameters. Notebook 10, §5."""
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
            # the best guess that never reads the query, on the same val samples (0 for REFER data: none)
            "word_free_val_cum_iou": max((g["metrics"]["cum_iou"] for g in
                                          run["results"]["val"].get("word_free", {}).values()), default=0.0),
        }
    return summary


def plot_ablation(table, ax=None, image_only: float | None = None, spec_name: str = "course"):
    """Bars: our cumulative IoU per row beside the paper's (two panels do not share a scale: SynthRef
    with the course spec is not UNC). Notebook 09, §3."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    frame = table.reset_index().melt(id_vars=["row", "method"], value_vars=["cum IoU", "paper cum IoU"],
                                     var_name="source", value_name="cumulative IoU (%)")
    frame["source"] = frame["source"].map({"cum IoU": f"ours (SynthRef unc testA, {spec_name} spec)",
                                           "paper cum IoU": "paper (UNC testA)"})
    sns.barplot(frame, y="method", x="cumulative IoU (%)", hue="source", ax=ax, palette=["C0", "0.7"])
    if image_only is not None:
        ax.axvline(100 * image_only, color="C3", linestyle=":",
                   label=f"best guess without words ({100 * image_only:.0f})")
    ax.set_ylabel("")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    return ax


def plot_rnn(out: str | Path, axes=None):
    """Fig. 7's two panels: wall time per epoch, and val cumulative IoU against wall time. Notebook 10, §5."""
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
    bound = max((summary[n]["word_free_val_cum_iou"] for n in names), default=0.0)
    if bound > 0:  # a model at this line has not shown that it reads the words
        axes[1].axhline(bound, color="0.3", linestyle=":", label=f"best guess without the words ({bound:.2f})")
    axes[1].set_xlabel("wall-clock time (minutes)")
    axes[1].set_ylabel("val cumulative IoU")
    axes[1].set_title("IoU over time (stage 2)")
    axes[1].legend(loc="center right")
    for ax in axes:
        ax.grid(alpha=0.3)
    return axes


def rnn_table(out: str | Path):
    """Fig. 7 as a table (percent): per RNN, minutes per epoch, epochs, val and testA cumulative IoU, parameters.
    Notebook 10, §5."""
    import pandas as pd

    records = [{"RNN": r["label"], "minutes per epoch (wall)": r["seconds_per_epoch"] / 60, "epochs": r["epochs"],
                "val cum IoU": 100 * r["val_cum_iou"], "testA cum IoU": 100 * r["testA_cum_iou"],
                "parameters": r["parameters"]} for r in rnn_summary(out).values()]
    return pd.DataFrame.from_records(records).set_index("RNN")


def _ablation_figure(out: Path, name: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    plot_ablation(ablation_table(out), ax, spec_name=name)
    return fig


def _rnn_figure(out: Path, name: str):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2), layout="constrained")
    plot_rnn(out, axes)
    return fig


@dataclass(frozen=True)
class Report:
    """What `report` writes for one experiment: tables (file -> DataFrame maker and number formats) and a figure.
    Notebook 09, §3."""

    tables: dict  # file name -> (function of the results folder -> DataFrame, {column: format})
    figure: tuple | None = None  # (file name's stem, function of (results folder, spec name) -> Figure)


REPORTS = {
    "ablation": Report({"table1.md": (ablation_table, {}), "by_kind.md": (by_kind_table, {})},
                       ("ablation", _ablation_figure)),
    "rnn": Report({"fig7.md": (rnn_table, {"epochs": "{:.2f}", "parameters": "{:,.0f}"})},
                  ("sru_vs_lstm", _rnn_figure)),
    "table2": Report({"table2.md": (lambda out: table2(out).T, {})}),
}


def report(out: str | Path, experiments: list[str] | None = None, figures_dir: str | Path | None = None,
           echo: Callable[[str], None] = print) -> list[Path]:
    """Regenerate every table (markdown, under OUT/<experiment>/) and figure (named by spec, e.g.
    results_course_ablation.png; in the repository's figures/ for results under results/, else in
    OUT/figures/) from the results that exist (`REPORTS`); returns the files written. (Notebooks 09-10
    draw their own, more detailed figures from the same files.)"""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from dmn_lib.viz import markdown_table, save_figure

    out = Path(out)
    if figures_dir is None:  # the repository's figures/ for its own results; beside other results otherwise
        inside = (REPO_ROOT / "results") in out.resolve().parents
        figures_dir = REPO_ROOT / "figures" if inside else out / "figures"
    written = []
    for experiment in experiments or list(EXPERIMENTS):
        runs = load_runs(out, experiment)
        if not runs:
            echo(f"{experiment}: no results under {out} yet (make them with: {make_command(experiment)})")
            continue
        name = spec_name(next(iter(runs.values())))  # figures are named by spec: results_course_ablation.png
        plan = REPORTS[experiment]
        for file, (make_table, formats) in plan.tables.items():
            path = out / experiment / file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(markdown_table(make_table(out), formats=formats) + "\n")
            written.append(path)
        if plan.figure is not None:
            stem, make_figure = plan.figure
            fig = make_figure(out, name)
            written.append(save_figure(fig, Path(figures_dir) / f"results_{name}_{stem}.png"))
            plt.close(fig)
    for folder in ("unc15", "unc"):  # the course's own runs: per kind, beside what readers of less could reach
        if (out / folder / "run.json").is_file():
            path = out / folder / "by_kind.md"
            path.write_text(markdown_table(kind_bounds_by_split(out, folder), digits=3) + "\n")
            written.append(path)
    for path in written:
        echo(f"wrote {path}")
    return written


def kind_bounds_by_split(out: str | Path, folder: str = "unc"):
    """`kind_bounds_table` for every split of the run in OUT/<folder>/ (the flagship: "unc"), one row per
    (split, kind), its columns flattened ("cum IoU: model", ...). `experiment report` writes it as
    OUT/<folder>/by_kind.md. Notebook 08, §5."""
    import pandas as pd

    run = json.loads((Path(out) / folder / "run.json").read_text())
    tables = {split: kind_bounds_table(run, split, Path(out) / "word_free") for split in run["results"]}
    frame = pd.concat(tables, names=["split", "kind"])
    frame.columns = [f"{metric}: {reader}" for metric, reader in frame.columns]
    return frame
