"""dmn_lib.checkpoint: atomic saves, safe loads, and errors that say what is wrong."""
import os

import pytest
import torch

from dmn_lib.checkpoint import (
    CheckpointError,
    export_model,
    get_rng_state,
    load_checkpoint,
    load_model,
    load_model_state,
    save_checkpoint,
    set_rng_state,
)
from dmn_lib.config import DMNConfig
from dmn_lib.data.vocab import Vocabulary
from dmn_lib.models.dmn import DMN


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary(["the", "red", "blue", "green", "square", "left", "right"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, vocab):
    """A tiny model and its checkpoint file."""
    torch.manual_seed(0)
    model = DMN(DMNConfig.preset("tiny", vocab_size=len(vocab)))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, vocab, extra={"threshold": 0.35, "data": {"image_size": 128}})
    return model, path


def test_round_trip_rebuilds_the_model(saved, vocab):
    model, path = saved
    loaded, loaded_vocab, meta = load_model(path)
    assert loaded_vocab == vocab
    assert loaded.config == model.config
    assert not loaded.training  # ready for evaluation
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert meta["extra"]["threshold"] == 0.35
    assert meta["versions"]["torch"] == str(torch.__version__)


def test_file_loads_with_weights_only(saved):
    checkpoint = torch.load(saved[1], weights_only=True)  # no code can run from the file
    assert checkpoint["format"] == "dmn_lib.checkpoint/1"
    assert checkpoint["config"]["vocab_size"] == saved[0].config.vocab_size


def test_mismatched_model_names_keys_shapes_and_config(saved, vocab):
    _, path = saved
    other = DMN(DMNConfig.preset("tiny", vocab_size=len(vocab), sm_channels=24, dynamic_filters=False))
    with pytest.raises(CheckpointError) as info:
        load_model_state(other, load_checkpoint(path), source=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "sm_channels: checkpoint 16 vs model 24" in message  # the differing config fields
    assert "dynamic_filters: checkpoint True vs model False" in message
    assert "unexpected in the checkpoint" in message and "language.filters.weight" in message
    assert "shape mismatches" in message and "synthesis.fusion.weight: checkpoint (16," in message


def test_missing_keys_are_named(saved, vocab):
    _, path = saved
    other = DMN(DMNConfig.preset("tiny", vocab_size=len(vocab)))
    checkpoint = load_checkpoint(path)
    key = sorted(k for k in checkpoint["model"] if k.startswith("upsampling."))[-1]
    del checkpoint["model"][key]
    with pytest.raises(CheckpointError) as info:
        load_model_state(other, checkpoint)
    assert f"missing from the checkpoint (1): {key}" in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_file_is_a_clear_error(saved, tmp_path, damage):
    data = saved[1].read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="Could not read checkpoint .*bad.pt.*truncated, corrupted"):
        load_checkpoint(bad)


def test_other_files_and_missing_files(tmp_path):
    plain = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a DMN checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_model(tmp_path / "nowhere.pt")


def test_save_is_atomic(saved, vocab, tmp_path, monkeypatch):
    model, _ = saved
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, vocab, extra={"version": 1})
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):  # the process dies half-way through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, vocab, extra={"version": 2})
    assert path.read_bytes() == before  # the previous checkpoint is intact...
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # ...and no temporary file is left behind


def test_only_plain_values_are_saved(saved, vocab, tmp_path):
    import numpy as np

    model, _ = saved
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, vocab, extra={"iou": np.float64(0.5), "curve": np.arange(3), "where": tmp_path})
    extra = torch.load(path, weights_only=True)["extra"]
    assert extra["iou"] == 0.5 and type(extra["iou"]) is float
    assert torch.equal(extra["curve"], torch.arange(3)) and extra["where"] == str(tmp_path)
    with pytest.raises(TypeError, match="extra\\['thing'\\] holds a builtins.object"):
        save_checkpoint(path, model, vocab, extra={"thing": object()})


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = get_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and (first[1] == second[1]).all() and first[2] == second[2]


def test_export_half_precision(saved, tmp_path):
    model, path = saved
    small = export_model(path, tmp_path / "model_fp16.pt")
    assert small.stat().st_size < path.stat().st_size
    loaded, _, _ = load_model(small)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(loaded.state_dict()[key], value.half().float())
