"""`python -m dmn_lib ...`: train -> evaluate -> predict, and clear one-line errors for bad inputs."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dmn_lib.__main__ import main

COMMANDS = ("train", "evaluate", "predict", "benchmark", "experiment")


def run_cli(args, capsys):
    """main(args) in this process -> (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps on SynthRef at 128 px, and a test image."""
    root = tmp_path_factory.mktemp("cli")
    out = root / "run"
    code = main(["train", "--preset", "tiny", "--image-size", "128", "--train-size", "32", "--val-size", "8",
                 "--steps-low", "2", "--steps-high", "2", "--batch-size", "4", "--no-progress", "--out", str(out)])
    assert code == 0
    from dmn_lib.data.synthetic import SynthRef

    image, _, text, _ = SynthRef("unc", "val", size=1, image_size=128).raw(0)
    Image.fromarray(image).resize((150, 100)).save(root / "scene.png")  # not square, not 128 px
    return {"root": root, "checkpoint": out / "checkpoint.pt", "image": root / "scene.png", "text": text}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and "usage: python -m dmn_lib " + command in out


def test_train_writes_checkpoint_and_history(trained):
    run = trained["checkpoint"].parent
    history = json.loads((run / "history.json").read_text())
    assert [row["stage"] for row in history["train"]] == ["low", "low", "high", "high"]
    checkpoint = torch.load(trained["checkpoint"], weights_only=True)
    assert checkpoint["data"]["image_size"] == 128 and checkpoint["train_config"]["steps_high"] == 2
    assert checkpoint["extra"]["spec"] == "course" and checkpoint["extra"]["preset"] == "tiny"
    from dmn_lib.__main__ import preset_name
    from dmn_lib.spec import SPECS

    assert [preset_name(s.model) for s in SPECS.values()] == ["tiny", "course", "course", "paper"]


def test_evaluate_picks_the_threshold_on_val(trained, capsys, tmp_path):
    result_file = tmp_path / "result.json"
    code, out, err = run_cli(["evaluate", "--checkpoint", trained["checkpoint"], "--split", "testA", "--test-size", "8",
                              "--threshold-from", "val", "--json", result_file], capsys)
    assert code == 0, err
    assert "threshold" in out and "picked on val" in out and "cum_iou" in out and "oracle" in out
    result = json.loads(result_file.read_text())
    assert result["metrics"]["n"] == 8 and result["data"]["image_size"] == 128  # from the checkpoint


def test_predict_writes_mask_and_overlay(trained, capsys, tmp_path):
    code, out, err = run_cli(["predict", "--checkpoint", trained["checkpoint"], "--image", trained["image"],
                              "--query", trained["text"], "--out", tmp_path], capsys)
    assert code == 0, err
    mask, overlay = Image.open(tmp_path / "mask.png"), Image.open(tmp_path / "overlay.png")
    assert mask.size == (150, 100)  # the input image's own size
    assert overlay.size[0] > overlay.size[1]  # the image beside its probability map (viz.image_and_prob)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert json.loads((tmp_path / "prediction.json").read_text())["query"] == trained["text"]


def _bad_inputs(trained, tmp_path):
    Image.new("CMYK", (64, 64)).save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    (tmp_path / "broken.pt").write_bytes(trained["checkpoint"].read_bytes()[:1000])
    ck, img, small = trained["checkpoint"], trained["image"], "smaller than the network's stride"
    return {
        "missing image": (["--checkpoint", ck, "--image", tmp_path / "nope.png", "--query", "red"],
                          "Image file not found"),
        "CMYK image": (["--checkpoint", ck, "--image", tmp_path / "cmyk.jpg", "--query", "red"], "mode 'CMYK'"),
        "small image": (["--checkpoint", ck, "--image", tmp_path / "small.png", "--query", "red"], small),
        "empty query": (["--checkpoint", ck, "--image", img, "--query", "  "], "The query is empty"),
        "unknown words": (["--checkpoint", ck, "--image", img, "--query", "xyzzy plugh"], "None of the words"),
        "missing checkpoint": (["--checkpoint", tmp_path / "none.pt", "--image", img, "--query", "red"],
                               "Checkpoint not found"),
        "broken checkpoint": (["--checkpoint", tmp_path / "broken.pt", "--image", img, "--query", "red"], "broken.pt"),
    }


@pytest.mark.parametrize("case", ["missing image", "CMYK image", "small image", "empty query", "unknown words",
                                  "missing checkpoint", "broken checkpoint"])
def test_predict_bad_inputs_are_one_line_errors(case, trained, capsys, tmp_path):
    args, expected = _bad_inputs(trained, tmp_path)[case]
    code, _, err = run_cli(["predict", *args, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert "error:" in err and expected in err and "Traceback" not in err


def test_missing_real_data_says_where_to_get_it(capsys, tmp_path):
    code, _, err = run_cli(["train", "--data", "refer", "--data-root", tmp_path / "refer", "--steps-low", "1",
                            "--out", tmp_path / "run"], capsys)
    assert code == 2 and "data/README.md" in err and "download_refer.sh" in err


def test_bad_config_override(capsys, tmp_path):
    code, _, err = run_cli(["train", "--preset", "tiny", "--set", "colour=red", "--steps-low", "1",
                            "--train-size", "8", "--image-size", "128", "--out", tmp_path], capsys)
    assert code == 2 and "'colour' is not a DMNConfig field" in err


def test_errors_from_a_real_shell_have_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dmn_lib", "predict", "--checkpoint", tmp_path / "x.pt",
                             "--image", tmp_path / "x.png", "--query", "red", "--out", tmp_path],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Image file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_benchmark_quick_prints_every_row(capsys):
    code, out, err = run_cli(["benchmark", "--quick"], capsys)
    assert code == 0, err
    assert out.startswith("device: ")
    for row in ("(a) Language + Synthesis Modules", "LSTM/SRU", "(b) tiny preset training throughput",
                "(c) tiny preset single-query inference latency", "(d) SynthRef generation"):
        assert row in out


def test_train_flags_are_the_spec_fields(capsys):
    """Every DataSpec and TrainConfig field has a flag whose help is the field's own text; unset flags keep
    the spec's values, given ones replace them."""
    import dataclasses
    import re

    from dmn_lib.__main__ import build_parser, run_spec
    from dmn_lib.spec import DataSpec, TrainConfig, spec

    code, out, _ = run_cli(["train", "--help"], capsys)
    text = re.sub(r"\s+", " ", out)
    for cls in (DataSpec, TrainConfig):
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            assert flag in out, flag
            assert f.metadata["help"].split(" (")[0] in text, f.name
    args = build_parser().parse_args(["train", "--spec", "fast", "--lr", "0.5", "--no-amp", "--split-by", "none",
                                      "--workers", "2", "--out", "x", "--set", "rnn=lstm", "--image-size", "64"])
    run = run_spec(args)
    assert run.train == spec("fast").train.replace(lr=0.5, amp=False, num_workers=2, out_dir="x")
    assert run.data == spec("fast").data.replace(image_size=64) and run.model.rnn == "lstm"
    code, _, err = run_cli(["train", "--plateau-metric", "accuracy"], capsys)
    assert code == 2 and "invalid choice: 'accuracy'" in err


def test_benchmark_against_an_unknown_commit_says_what_it_needs():
    from dmn_lib.benchmark import throughput_against

    with pytest.raises(RuntimeError, match="needs git and the repository's history"):
        throughput_against("no-such-commit-0000", repeats=1, rounds=1)
