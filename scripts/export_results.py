"""Turn a training run folder into the small, committed results the notebooks load.

    .venv/bin/python scripts/export_results.py runs/course_unc results/course/unc

writes  model.pt      the weights in fp16 (dmn_lib.checkpoint.export_model; loads with load_model)
        history.json  the training curves
        run.json      config, data, train config, progress (the TrainState), final validation metrics,
                      library versions, git commit and the command that trained it; `extra` keeps the
                      data and the threshold picked on val too, as run.json files always had them
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from dmn_lib import checkpoint as ckpt
from dmn_lib.experiment import _git_commit as git_commit  # the commit of this checkout, as experiments record it


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="folder with checkpoint.pt (python -m dmn_lib train --out)")
    parser.add_argument("out_dir", type=Path, help="results folder, e.g. results/course/unc")
    parser.add_argument("--command", default=None, help="the command that trained the run (recorded)")
    args = parser.parse_args(argv)

    source = args.run_dir / "checkpoint.pt"
    state = ckpt.load_checkpoint(source)
    data, progress = ckpt.saved_data(state), ckpt.TrainState.from_checkpoint(state)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.export_model(source, args.out_dir / "model.pt")
    if (args.run_dir / "history.json").is_file():
        shutil.copyfile(args.run_dir / "history.json", args.out_dir / "history.json")
    history = state.get("history") or {}
    val = history.get("val") or []
    run = {
        "command": args.command or (state.get("extra") or {}).get("command"),
        "config": state["config"],
        "data": data.to_dict() if data else None,
        "train_config": state.get("train_config"),
        "progress": progress.to_dict(),
        "final_val": val[-1] if val else None,
        "extra": {**(state.get("extra") or {}), "data": data.to_dict() if data else None,
                  "threshold": progress.threshold, "threshold_from": "val"},
        "versions": state.get("versions"),
        "git_commit": git_commit(),
        "spec": (state.get("extra") or {}).get("spec", "course"),
    }
    (args.out_dir / "run.json").write_text(json.dumps(run, indent=1, default=str))
    sizes = {p.name: p.stat().st_size for p in args.out_dir.iterdir()}
    print(f"wrote {args.out_dir}: " + ", ".join(f"{k} ({v / 1e6:.2f} MB)" for k, v in sorted(sizes.items())))


if __name__ == "__main__":
    main(sys.argv[1:])
