"""dmn_lib.spec, dmn_lib.course and dmn_lib.runtime: one run specification, the modes on top of it, devices."""
import json

import pytest
import torch

from dmn_lib import course, runtime
from dmn_lib.checkpoint import TrainState
from dmn_lib.config import DMNConfig
from dmn_lib.spec import SPECS, DataSpec, RunSpec, TrainConfig, spec


def test_named_specs_round_trip_through_json():
    for name, run in SPECS.items():
        as_json = json.dumps(run.to_dict())
        assert json.dumps(RunSpec.from_dict(json.loads(as_json)).to_dict()) == as_json, name
    assert spec("course").data.image_size == 128 and spec("paper").model == DMNConfig.preset("paper")
    assert spec("paper").train.lr == 1e-5 and spec("paper").train.batch_size == 1  # §4.3


def test_overrides_change_a_copy_and_name_bad_fields():
    run = spec("course", model={"rnn": "lstm"}, data={"variant": "unc+"}, train={"lr": 2e-3})
    assert (run.model.rnn, run.data.variant, run.train.lr) == ("lstm", "unc+", 2e-3)
    assert SPECS["course"].model.rnn == "sru" and spec("course").train.lr == 1e-3  # the named spec is untouched
    spec("course").train.lr = 5.0
    assert SPECS["course"].train.lr == 1e-3  # a spec is a copy
    with pytest.raises(ValueError, match="data overrides \\['colour'\\].*known fields: source"):
        spec("course", data={"colour": "red"})
    with pytest.raises(ValueError, match="Unknown RunSpec part 'optimizer'"):
        spec("course", optimizer={})
    with pytest.raises(ValueError, match="Unknown spec 'huge'"):
        spec("huge")
    with pytest.raises(ValueError, match="Invalid DataSpec: source='coco'"):
        DataSpec(source="coco")


def test_records_of_earlier_versions_are_read():
    legacy = {"data": "synthref", "variant": "unc", "image_size": 192, "data_seed": 0, "data_root": "data/refer",
              "dataset": "unc", "split_by": None, "train_size": 20000, "val_size": 200}  # extra["data"] before 0.2
    assert DataSpec.from_dict(legacy) == DataSpec(image_size=192, train_size=20000, val_size=200)
    state = TrainState.from_checkpoint({"progress": {"step": 3, "stage": "low"}, "extra": {"threshold": 0.4}})
    assert (state.step, state.stage, state.threshold) == (3, "low", 0.4)
    assert TrainState.from_checkpoint({"progress": state.to_dict()}) == state


def test_modes_are_specs_with_the_notebooks_sizes():
    for mode, name in (("fast", "fast"), ("course", "course")):
        settings = course.settings(mode)
        run = settings.run_spec()
        assert settings.spec == name and run.model == SPECS[name].model
        assert (run.data.image_size, run.data.train_size, run.train.batch_size) == (
            settings.image_size, settings.train_size, settings.batch_size)
    assert course.settings("fast").image_size == 128  # what the stored notebook outputs were made with


def test_cuda_device_gets_the_local_rank(monkeypatch):
    """torchrun with --device cuda: every process its own indexed GPU (no GPU needed to check it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert runtime.resolve_device("auto", local_rank=1) == torch.device("cuda:1")
    assert runtime.resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="has 2 GPU"):
        runtime.resolve_device("cuda", local_rank=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every process on one GPU"):
        runtime.init_distributed("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto") == torch.device("cpu")


def test_mixed_precision_by_gpu_generation(monkeypatch):
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper
    assert runtime.amp_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # Volta: fp16 + scaler
    assert runtime.amp_dtype(cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.Runtime(runtime.DistInfo(), cuda, torch.float16).grad_scaler().is_enabled()
    assert not runtime.Runtime(runtime.DistInfo(), cuda, torch.bfloat16).grad_scaler().is_enabled()
    monkeypatch.undo()
    assert runtime.amp_dtype(cuda, enabled=False) is None and runtime.amp_dtype(torch.device("cpu")) is None
    cpu = runtime.Runtime.start("cpu", amp=True, channels_last=True)
    assert cpu.amp_dtype is None and cpu.channels_last and not cpu.grad_scaler().is_enabled()  # channels_last: CPUs too
    assert not cpu.pin_memory()


def test_train_config_checks_its_choices():
    with pytest.raises(ValueError, match="low_res_target='blurry' is not one of"):
        TrainConfig(low_res_target="blurry")
