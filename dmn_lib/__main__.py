"""`python -m dmn_lib {train,evaluate,predict,benchmark,experiment}`: the library from a shell.

For GPU machines and real data; the notebooks call the same functions (training: notebook 07,
evaluation: notebook 08, benchmark: notebook 10). Examples:

    python -m dmn_lib train --preset course --data synthref --image-size 192 --steps-low 500 --steps-high 1500 --out runs/course
    python -m dmn_lib train ... --out runs/course --resume          # go on after an interruption
    torchrun --nproc_per_node 4 -m dmn_lib train --preset paper --data refer --dataset unc --out runs/unc
    python -m dmn_lib evaluate --checkpoint runs/course/checkpoint.pt --split testA --threshold-from val
    python -m dmn_lib predict --checkpoint runs/course/checkpoint.pt --image photo.png --query "the red circle" --out pred/
    python -m dmn_lib benchmark

Wrong inputs (missing files, unreadable images, unknown words, missing data) end with a one-line
`error:` and exit status 2, not a traceback; set DMN_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = "Errors are reported in one line (exit status 2); set DMN_DEBUG=1 for the full traceback."


class UsageError(Exception):
    """A problem with the command's inputs, reported argparse-style (exit status 2)."""


# =============================================================================================
# Data
# =============================================================================================
def add_data_args(p: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """Data flags. For `evaluate` they default to what the checkpoint was trained on."""
    title = "data" + (" (default: what the checkpoint was trained on)" if from_checkpoint else "")
    g = p.add_argument_group(title)

    def default(value):
        return None if from_checkpoint else value

    g.add_argument("--data", choices=("synthref", "refer"), default=default("synthref"),
                   help="synthref: generated on the fly; refer: the real datasets (see data/README.md)")
    g.add_argument("--variant", default=default("unc"), help="SynthRef variant: unc, unc+, gref, referit")
    g.add_argument("--image-size", type=int, default=default(192), help="square image side in pixels")
    g.add_argument("--data-seed", type=int, default=default(0), help="SynthRef generation seed")
    g.add_argument("--data-root", default=default("data/refer"), help="REFER root folder (data/README.md)")
    g.add_argument("--dataset", default=default("unc"), help="REFER dataset: unc, unc+, gref, referit")
    g.add_argument("--split-by", default=None, help="REFER split scheme (default: the usual one per dataset)")


def data_settings(args, saved: dict | None = None) -> dict:
    """The data flags, filled in from a checkpoint's saved settings where not given."""
    saved = dict(saved or {})
    keys = ("data", "variant", "image_size", "data_seed", "data_root", "dataset", "split_by")
    out = {k: getattr(args, k, None) for k in keys}
    for k in keys:
        if out[k] is None:
            out[k] = saved.get(k)
    defaults = {"data": "synthref", "variant": "unc", "image_size": 192, "data_seed": 0,
                "data_root": "data/refer", "dataset": "unc"}
    for k, v in defaults.items():
        if out[k] is None:
            out[k] = v
    return out


def make_dataset(settings: dict, split: str, size: int | None = None):
    """A split of SynthRef or of a REFER dataset; a missing REFER folder says where to get it."""
    if settings["data"] == "synthref":
        from dmn_lib.data.synthetic import SynthRef

        return SynthRef(settings["variant"], split, size=size, image_size=settings["image_size"],
                        seed=settings["data_seed"])
    from dmn_lib.data.refer import ReferDataset

    root = Path(settings["data_root"])
    if not root.is_dir():
        raise UsageError(
            f"REFER data not found: {root} does not exist. Put the datasets there in the layout of "
            "data/README.md ('Real datasets'), e.g. with `bash data/download_refer.sh --root "
            f"{root}`, or pass --data-root DIR. (Without real data use --data synthref.)"
        )
    ds = ReferDataset(root, settings["dataset"], split, split_by=settings["split_by"],
                      image_size=settings["image_size"])
    if size is not None and size < len(ds):
        ds = _Subset(ds, size)
    return ds


class _Subset:
    """The first `size` samples of a dataset (keeps `.texts` for the vocabulary)."""

    def __init__(self, dataset, size):
        self.dataset, self.size = dataset, size
        self.texts = list(dataset.texts[:size])

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        return self.dataset[i]


# =============================================================================================
# train
# =============================================================================================
def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train DMN in two stages (§4.3); notebook 07", epilog=EPILOG,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=("course", "tiny", "paper"), default="course", help="model sizes (DMNConfig.preset)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a DMNConfig field, e.g. --set rnn=lstm --set use_language=false (values are JSON)")
    p.add_argument("--recipe", choices=("course", "paper"), default="course",
                   help="TrainConfig preset: course (fast on CPU) or paper (§4.3: lr 1e-5, batch 1, plain BCE)")
    add_data_args(p)
    p.add_argument("--train-size", type=int, default=None, help="training samples (SynthRef default 20000; REFER: all)")
    p.add_argument("--val-size", type=int, default=500, help="validation samples")
    g = p.add_argument_group("schedule (TrainConfig; unset = the recipe's value)")
    for flag, typ, field, text in [
        ("--steps-low", int, "steps_low", "optimizer steps of stage 1 (low resolution, no UM)"),
        ("--steps-high", int, "steps_high", "optimizer steps of stage 2 (with the UM)"),
        ("--epochs-low", float, "epochs_low", "stage 1 length in epochs (when --steps-low is 0)"),
        ("--epochs-high", float, "epochs_high", "stage 2 length in epochs (when --steps-high is 0)"),
        ("--batch-size", int, "batch_size", "images per step and process"),
        ("--lr", float, "lr", "Adam learning rate"),
        ("--lr-high", float, "lr_high", "stage 2's learning rate (default: --lr)"),
        ("--weight-decay", float, "weight_decay", "Adam weight decay"),
        ("--pos-weight", float, "pos_weight", "BCE weight of foreground pixels"),
        ("--low-res-weight", float, "low_res_weight", "weight of the low-res loss kept in stage 2 (0 = paper)"),
        ("--low-res-target", str, "low_res_target", "soft or hard low-res targets"),
        ("--plateau-metric", str, "plateau_metric", "val_loss or val_iou"),
        ("--patience", int, "plateau_patience", "validations without improvement before lr /= 10"),
        ("--grad-clip", float, "grad_clip", "max gradient norm (0 = off)"),
        ("--eval-every", int, "eval_every", "steps between validations (0 = once per epoch)"),
        ("--eval-batches", int, "eval_batches", "val batches per validation (0 = all)"),
        ("--ckpt-every", int, "ckpt_every", "steps between checkpoints (0 = at each validation)"),
        ("--max-minutes", float, "max_minutes", "stop (and save) after this many minutes"),
        ("--workers", int, "num_workers", "DataLoader worker processes"),
        ("--seed", int, "seed", "seed of the data order and the RNGs"),
        ("--device", str, "device", "auto, cpu, cuda, cuda:1, ..."),
    ]:
        g.add_argument(flag, type=typ, dest=field, default=None, help=text)
    g.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="full precision on GPU")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    p.add_argument("--out", default="runs/dmn", help="output folder: checkpoint.pt and history.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.set_defaults(run=cmd_train)
    return p


def parse_sets(items: list[str]) -> dict:
    from dmn_lib.config import DMNConfig
    import dataclasses

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


def cmd_train(args) -> int:
    import torch

    from dmn_lib.checkpoint import load_checkpoint
    from dmn_lib.config import DMNConfig
    from dmn_lib.data.vocab import Vocabulary
    from dmn_lib.models.dmn import DMN
    from dmn_lib.train import CHECKPOINT_NAME, TrainConfig, Trainer, build_vocabulary, distributed_from_env

    fields = [f for f in TrainConfig.__dataclass_fields__ if getattr(args, f, None) is not None]
    tcfg = TrainConfig.preset(args.recipe, out_dir=args.out, **{f: getattr(args, f) for f in fields})
    if not (tcfg.steps_low or tcfg.steps_high or tcfg.epochs_low or tcfg.epochs_high):
        raise UsageError("say how long to train: --steps-low/--steps-high or --epochs-low/--epochs-high")
    settings = data_settings(args)
    train_set = make_dataset(settings, "train", args.train_size)
    val_set = make_dataset(settings, "val", args.val_size) if args.val_size else None

    resume_file = Path(args.out) / CHECKPOINT_NAME
    if args.resume and resume_file.is_file():
        vocab = Vocabulary.from_dict(load_checkpoint(resume_file)["vocab"])  # the words the model knows
    else:
        vocab = build_vocabulary(train_set)
    try:
        config = DMNConfig.preset(args.preset, vocab_size=len(vocab), **parse_sets(args.set))
    except TypeError as err:
        raise UsageError(f"--set: {err}") from err
    main = distributed_from_env().is_main
    torch.manual_seed(tcfg.seed)  # the model's initial weights
    model = DMN(config)
    trainer = Trainer(model, train_set, vocab, tcfg, val_set, resume=args.resume,
                      extra={"data": {**settings, "train_size": len(train_set), "val_size": args.val_size},
                             "preset": args.preset,
                             "command": "python -m dmn_lib " + " ".join(sys.argv[1:])})
    if main:
        print(f"DMN {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
              f"{trainer.device}, {trainer.dist.world_size} process(es); {len(train_set)} training samples, "
              f"vocabulary of {len(vocab)} words; stages: {trainer.steps_low} + {trainer.steps_high} steps"
              + (f"; resuming at step {trainer.step} from {resume_file}" if trainer.step else ""))
    try:
        history = trainer.run()
    except KeyboardInterrupt:
        if main:
            where = resume_file if resume_file.is_file() else "none written yet"
            print(f"\nInterrupted at step {trainer.step}. Last checkpoint: {where}. "
                  "Run the same command with --resume to continue.", file=sys.stderr)
        return 130
    if main:
        last = history["val"][-1] if history["val"] else {}
        summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
        print(f"Done: step {trainer.step}. Last validation: {summary or 'none'}")
        if tcfg.out_dir:
            print(f"Checkpoint: {resume_file}\nHistory:    {Path(args.out) / 'history.json'}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


# =============================================================================================
# evaluate
# =============================================================================================
def add_evaluate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="cumulative IoU and Pr@X of a checkpoint on a split; notebook 08",
                       epilog=EPILOG, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by `train`")
    p.add_argument("--split", default="val", help="the split to evaluate (val, testA, testB, test, ...)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--threshold-from", metavar="SPLIT",
                   help="pick the probability threshold on SPLIT (e.g. val) and apply it to --split "
                        "(default: the threshold picked on val during training, else val)")
    t.add_argument("--threshold", type=float, help="a fixed probability threshold")
    p.add_argument("--size", type=int, default=1000, help="samples per split (0 = the whole split)")
    p.add_argument("--by", default=None, help="also report per value of this meta key (e.g. kind)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_data_args(p, from_checkpoint=True)
    p.set_defaults(run=cmd_evaluate)
    return p


def cmd_evaluate(args) -> int:
    from dmn_lib.checkpoint import load_model
    from dmn_lib.metrics import ORACLE_LABEL
    from dmn_lib.train import evaluate, make_loader, resolve_device

    device = resolve_device(args.device)
    model, vocab, meta = load_model(args.checkpoint, map_location=device)
    settings = data_settings(args, (meta.get("extra") or {}).get("data"))
    size = args.size or None

    def run(split, threshold=None):
        ds = make_dataset(settings, split, size)
        loader = make_loader(ds, vocab, args.batch_size, num_workers=args.workers)
        return evaluate(model, loader, threshold=threshold, device=device, progress=sys.stderr.isatty())

    saved_threshold = (meta.get("extra") or {}).get("threshold")
    if args.threshold is not None:
        threshold, source = args.threshold, "given"
    elif args.threshold_from is None and saved_threshold is not None:
        threshold, source = saved_threshold, "picked on val during training"
    else:
        select = args.threshold_from or "val"
        threshold = run(select)["best_threshold"]
        source = f"picked on {select}"
    result = run(args.split, threshold)
    m = result["metrics"]
    oracle = result["sweep"].summary(result["best_threshold"])
    name = settings["variant"] if settings["data"] == "synthref" else settings["dataset"]
    print(f"{args.checkpoint} on {settings['data']}/{name} {args.split} ({m['n']} samples)")
    print(f"  threshold {threshold:g} ({source})")
    print("  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("threshold", "n")))
    print(f"  {ORACLE_LABEL}: cum_iou {oracle['cum_iou']:.4f} at threshold {result['best_threshold']:g}")
    out = {"checkpoint": str(args.checkpoint), "split": args.split, "data": settings, "threshold": threshold,
           "threshold_source": source, "metrics": m, "oracle": oracle}
    if args.by:
        out["by"] = {str(k): v for k, v in result["sweep"].summary_by(args.by, threshold).items()}
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
    p = sub.add_parser("predict", help="segment what a query describes in one image", epilog=EPILOG,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, help="an RGB or grayscale image file")
    p.add_argument("--query", required=True, help='the referring expression, e.g. "the red circle"')
    p.add_argument("--out", required=True, help="folder for mask.png, overlay.png and prediction.json")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: the one picked on val during training, else 0.5)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side the image is resized to for the network (default: the training size)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_predict)
    return p


def cmd_predict(args) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from dmn_lib.checkpoint import load_model
    from dmn_lib.data.transforms import image_to_tensor, load_image
    from dmn_lib.train import resolve_device

    image = load_image(args.image)  # clear errors: missing file, not an image, unsupported mode
    device = resolve_device(args.device)
    model, vocab, meta = load_model(args.checkpoint, map_location=device)
    try:
        ids = vocab.encode(args.query, strict=True)
    except ValueError as err:
        raise UsageError(f"--query: {err}") from err
    stride = model.config.stride
    width, height = image.size
    if min(width, height) < stride:
        raise UsageError(
            f"{args.image} is {width}x{height} pixels, smaller than the network's stride of {stride} pixels "
            "(it would have no cell at the coarsest scale); use a larger image"
        )
    size = args.image_size or ((meta.get("extra") or {}).get("data") or {}).get("image_size") or 192
    if size < stride or size % stride:
        raise UsageError(f"--image-size must be a multiple of the stride {stride}, got {size}")
    threshold = args.threshold if args.threshold is not None else (meta.get("extra") or {}).get("threshold") or 0.5

    # The network sees the image as it was trained: resized to size x size; the probabilities
    # are resized back to the original image for the outputs.
    pixels = image_to_tensor(np.asarray(image.resize((size, size), Image.BILINEAR)))
    tokens = torch.tensor([ids], device=device)
    with torch.inference_mode():
        logits = model(pixels[None].to(device), tokens, torch.tensor([len(ids)], device=device))
        prob = torch.sigmoid(F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False))
    prob = prob[0, 0].cpu().numpy()
    mask = prob > threshold

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out / "mask.png")
    from dmn_lib.viz import heatmap

    Image.fromarray(heatmap(prob, np.asarray(image), alpha=0.5)).save(out / "overlay.png")
    info = {"checkpoint": str(args.checkpoint), "image": str(args.image), "query": args.query,
            "tokens": [vocab.itos[i] for i in ids], "threshold": threshold, "network_size": size,
            "mask_fraction": float(mask.mean()), "max_probability": float(prob.max())}
    (out / "prediction.json").write_text(json.dumps(info, indent=1))
    unknown = [w for w, i in zip(info["tokens"], ids) if i == 1]
    print(f"{args.query!r}: {100 * mask.mean():.1f}% of the image at threshold {threshold:g} "
          f"(max probability {prob.max():.2f})" + (f"; unknown words ignored: {unknown}" if unknown else ""))
    print(f"wrote {out / 'mask.png'}, {out / 'overlay.png'}, {out / 'prediction.json'}")
    return 0


# =============================================================================================
# benchmark, experiment
# =============================================================================================
def add_benchmark_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("benchmark", help="SRU vs LSTM step time, training throughput, inference latency; notebook 10",
                       epilog=EPILOG, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test (numbers meaningless)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (after warm-up)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(run=cmd_benchmark)
    return p


def cmd_benchmark(args) -> int:
    from dmn_lib.benchmark import run_all

    results = run_all(quick=args.quick, device=args.device, repeats=args.repeats, echo=print)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def add_experiment_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "experiment", epilog=EPILOG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="the paper's experiments: ablation (Table 1), rnn (Fig. 7), table2; notebooks 09-10",
        description="Train and evaluate every row of an experiment into OUT/<experiment>/<row>/ (resumable: "
                    "done rows are skipped, cut-off rows resume), then write its tables and figures. "
                    "`report` only regenerates the tables and figures from the results under --out.")
    p.add_argument("experiment", choices=("ablation", "rnn", "table2", "all", "report"),
                   help="all = the three experiments in one queue")
    p.add_argument("--size", choices=("course", "full", "fast"), default="course",
                   help="course: the course preset on 2 CPU cores; full: the paper's sizes on a GPU; "
                        "fast: seconds per row, to check the pipeline (numbers meaningless)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="results folder (default: results/<size>)")
    p.add_argument("--jobs", type=int, default=1, help="rows trained side by side (separate processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    p.add_argument("--only", default=None, metavar="ROW[,ROW...]",
                   help="train only these rows, e.g. --only full,only_vm (default: every row)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_experiment)
    return p


def cmd_experiment(args) -> int:
    from dmn_lib import experiment

    out = Path(args.out or f"results/{args.size}")
    if args.experiment == "report":
        if not out.is_dir():
            raise UsageError(f"No results folder {out}: run an experiment first, e.g. "
                             f"{experiment.make_command('ablation', args.size, str(out))}")
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
    experiment.run_experiment(names, size=args.size, out=out, device=args.device, jobs=args.jobs,
                              threads=args.threads, progress=not args.no_progress, command=command,
                              only=args.only.split(",") if args.only else None)
    return 0


# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
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
