"""dmn_lib.train and its parts: the losses (§4.3), the trainer, exact resume, evaluation, DDP under torchrun."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from dmn_lib.config import DMNConfig
from dmn_lib.data.datasets import build_vocabulary
from dmn_lib.data.transforms import image_to_tensor, mask_to_tensor
from dmn_lib.inference import evaluate
from dmn_lib.losses import low_res_target, stage_loss, stage_outputs
from dmn_lib.models.dmn import DMN
from dmn_lib.runtime import ResumableSampler, make_loader
from dmn_lib.spec import TrainConfig, spec
from dmn_lib.train import CHECKPOINT_NAME, Trainer, train

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40)}


class Squares(Dataset):
    """Three squares of different colours, one per column; the query names one colour.

    An image-only model cannot know which square is meant (at best it covers all three: IoU ~ 1/3);
    a model that reads the query can. Cheap to make, so training tests stay fast. The colour is the
    query's LAST word ("the square that is red"): R_N is the mSRU's output at the last word, so the
    deciding word reaches it directly. With "the red square" the colour has to survive one more
    step of the recurrence, and the tiny model took 2-3x longer to start using it (measured).
    """

    def __init__(self, size: int, image_size: int = 128, seed: int = 0):
        self.size, self.image_size, self.seed = size, image_size, seed

    def __len__(self):
        return self.size

    def raw(self, i):
        rng = np.random.default_rng([self.seed, i])
        s, side = self.image_size, self.image_size // 4
        image = (120 + rng.integers(0, 20, (s, s, 3))).astype(np.uint8)
        names = [list(COLOURS)[k] for k in rng.permutation(3)]
        masks = {}
        for column, name in enumerate(names):
            x = column * s // 3 + rng.integers(0, s // 3 - side)
            y = rng.integers(0, s - side)
            image[y:y + side, x:x + side] = COLOURS[name]
            masks[name] = np.zeros((s, s), bool)
            masks[name][y:y + side, x:x + side] = True
        target = names[rng.integers(3)]
        return image, masks[target], f"the square that is {target}", {"colour": target}

    def text(self, i):
        return self.raw(i)[2]

    def __getitem__(self, i):
        image, mask, text, meta = self.raw(i)
        return {"image": image_to_tensor(image), "mask": mask_to_tensor(mask), "text": text, "meta": meta}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for these tests: on a busy 2-core machine two threads wait for each other
    (we measured the training tests up to 10x slower with 2), and results no longer depend on how
    work is split over threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    train_set, val_set = Squares(512, seed=0), Squares(48, seed=1)
    return train_set, val_set, build_vocabulary(train_set)


def tiny_model(vocab, seed=0, **overrides):
    torch.manual_seed(seed)
    return DMN(DMNConfig.preset("tiny", vocab_size=len(vocab), **overrides))


# ---------------------------------------------------------------------------------------------
def test_low_res_target_is_the_covered_fraction():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :2] = 1  # half of the top-left 4x4 cell
    soft = low_res_target(mask, (2, 2), "soft")
    assert torch.allclose(soft, torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]]))
    mask[..., :4, :3] = 1  # now 3/4 of it
    assert low_res_target(mask, (2, 2), "hard")[0, 0, 0, 0] == 1


def test_stage_low_never_runs_the_upsampling_module(data):
    train_set, _, vocab = data
    model = tiny_model(vocab)
    batch = next(iter(make_loader(train_set, vocab, 4)))
    logits, low = stage_outputs(model, batch, "low")
    assert logits is None and low.shape == (4, 1, 4, 4)  # 128 px / stride 32
    loss, parts = stage_loss(logits, low, batch["masks"], TrainConfig())
    loss.backward()
    assert all(p.grad is None for p in model.upsampling.parameters())
    assert model.synthesis.low_res_head.weight.grad is not None

    model.zero_grad()
    logits, low = stage_outputs(model, batch, "high")
    assert logits.shape == (4, 1, 128, 128)
    loss, parts = stage_loss(logits, low, batch["masks"], TrainConfig(low_res_weight=0.5))
    assert torch.allclose(loss, parts["loss_high"] + 0.5 * parts["loss_low"])
    loss_only_high, _ = stage_loss(logits, low, batch["masks"], TrainConfig(low_res_weight=0.0))
    assert torch.allclose(loss_only_high, parts["loss_high"])


def test_train_config_round_trip_and_checks():
    config = spec("paper").train.replace(steps_low=5)
    assert config.lr == 1e-5 and config.batch_size == 1 and config.low_res_weight == 0
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="plateau_metric"):
        TrainConfig(plateau_metric="accuracy")
    with pytest.raises(ValueError, match="Unknown TrainConfig fields \\['colour'\\]"):
        TrainConfig.from_dict({"colour": "red"})


def test_sampler_order_depends_on_seed_and_epoch_only(data):
    dataset = data[0]
    full = ResumableSampler(dataset, seed=3)
    full.set_position(epoch=2)
    order = list(full)
    later = ResumableSampler(dataset, seed=3)
    later.set_position(epoch=2, start=40)
    assert list(later) == order[40:] and len(later) == len(order) - 40
    full.set_position(epoch=3)
    assert list(full) != order
    shards = [list(ResumableSampler(dataset, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(len(dataset)))


def test_evaluate_uses_the_given_threshold(data):
    _, val_set, vocab = data
    model = tiny_model(vocab)
    loader = make_loader(val_set, vocab, 16)
    picked = evaluate(model, loader)
    assert picked["threshold"] == picked["best_threshold"]
    assert picked["metrics"]["n"] == len(val_set) and 0 <= picked["metrics"]["cum_iou"] <= 1
    fixed = evaluate(model, loader, threshold=0.4321, stage="low", loss_config=TrainConfig())
    assert fixed["metrics"]["threshold"] == pytest.approx(0.4321) and fixed["loss"] > 0


@pytest.mark.slow
def test_training_lowers_the_loss_and_uses_the_query():
    """Two short stages on Squares: the losses fall, and after stage 1 the model that reads the
    query beats the image-only model ("Only VM", Table 1 row 1) on cumulative IoU.

    At 96 px the tiny preset's stride-32 map is 3x3, one cell per column of squares. Measured
    while writing this test (1 thread, 6 seeds): the query starts to matter between steps ~50 and
    ~100; after 200 stage-1 steps the query-reading model reached 0.39-0.45 cumulative IoU on val,
    the image-only one 0.14 (it cannot exceed ~1/3: the best it can do is cover all three squares).
    """
    train_set, val_set = Squares(512, image_size=96, seed=0), Squares(48, image_size=96, seed=1)
    vocab = build_vocabulary(train_set)
    steps_low = 200
    config = TrainConfig(steps_low=steps_low, steps_high=15, batch_size=8, lr=3e-3, eval_every=1000,
                         out_dir=None, progress=False)
    results = {}
    for use_language in (True, False):
        model = tiny_model(vocab, use_language=use_language)
        results[use_language] = train(model, train_set, vocab, config, val_set=val_set)
    rows = results[True]["train"]
    low = [row["loss"] for row in rows[:steps_low]]
    assert np.mean(low[-10:]) < 0.8 * np.mean(low[:10])  # stage 1 learns
    high = [row["loss_high"] for row in rows[steps_low:]]
    assert np.mean(high[-5:]) < np.mean(high[:5])  # stage 2 learns
    assert [r["stage"] for r in results[True]["val"]] == ["low", "high"]
    iou = {k: h["val"][0]["val_cum_iou"] for k, h in results.items()}  # at the end of stage 1
    assert iou[True] > iou[False] + 0.1, iou


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [{}, {"lr_schedule": "wsd", "warmup_steps": 2, "backbone_lr_scale": 0.1}],
                         ids=["plateau", "wsd-warmup-backbone-lr"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(data, tmp_path, schedule):
    """Interrupt twice (once in each stage), resume from the last checkpoint each time: the final
    weights equal those of an uninterrupted run, bit for bit (with every learning-rate schedule)."""
    train_set, val_set = Squares(24, seed=0), Squares(8, seed=1)  # 6 steps per epoch: crosses epochs
    vocab = data[2]
    config = TrainConfig(steps_low=4, steps_high=5, batch_size=4, eval_every=3, ckpt_every=3,
                         progress=False, out_dir=str(tmp_path / "straight"), **schedule)
    straight = tiny_model(vocab)
    history = train(straight, train_set, vocab, config, val_set=val_set)

    class Interrupt(Exception):
        pass

    def stop_at(step):
        def callback(trainer):
            if trainer.step == step:
                raise Interrupt
        return callback

    config = config.replace(out_dir=str(tmp_path / "interrupted"))
    with pytest.raises(Interrupt):  # after step 5; the last checkpoint is step 4 (end of stage 1)
        train(tiny_model(vocab), train_set, vocab, config, val_set=val_set, callbacks=[stop_at(5)])
    with pytest.raises(Interrupt):  # after step 8; the last checkpoint is step 6 (mid stage 2)
        train(tiny_model(vocab, seed=1), train_set, vocab, config, val_set=val_set, resume=True,
              callbacks=[stop_at(8)])
    resumed = tiny_model(vocab, seed=2)  # other initial weights: everything must come from the file
    resumed_history = train(resumed, train_set, vocab, config, val_set=val_set, resume=True)

    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [r["loss"] for r in resumed_history["train"]] == [r["loss"] for r in history["train"]]
    assert [r["val_loss"] for r in resumed_history["val"]] == [r["val_loss"] for r in history["val"]]
    assert [r["lr"] for r in resumed_history["train"]] == [r["lr"] for r in history["train"]]


def test_time_limit_stops_early_and_saves(data, tmp_path):
    train_set, _, vocab = data
    config = TrainConfig(steps_low=50, batch_size=4, max_minutes=1e-6, progress=False, out_dir=str(tmp_path))
    trainer = Trainer(tiny_model(vocab), train_set, vocab, config)
    trainer.run()
    assert trainer.step == 1 and (tmp_path / CHECKPOINT_NAME).is_file() and (tmp_path / "history.json").is_file()


def test_config_errors_are_clear(data):
    train_set, _, vocab = data
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(DMN(DMNConfig.preset("tiny", vocab_size=len(vocab) + 1)), train_set, vocab, TrainConfig(steps_low=1))
    with pytest.raises(ValueError, match="Nothing to train"):
        Trainer(tiny_model(vocab), train_set, vocab, TrainConfig(out_dir=None))
    with pytest.raises(ValueError, match="smaller than one batch"):
        Trainer(tiny_model(vocab), Squares(3), vocab, TrainConfig(steps_low=1, batch_size=4))


@pytest.mark.slow
def test_two_process_ddp_run_on_cpu(tmp_path):
    """torchrun with 2 processes (gloo): exits 0, only rank 0 writes one checkpoint, and the validation
    (each process evaluates its share of the batches, gathered back) equals a one-process evaluation of
    the saved model: the same cumulative IoU and threshold, the same loss up to float rounding."""
    from dmn_lib.checkpoint import load_model, saved_data, saved_spec
    from dmn_lib.data.datasets import make_dataset

    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "dmn_lib", "train", "--spec", "tiny", "--image-size", "128", "--train-size", "16",
        "--val-size", "12", "--steps-low", "2", "--steps-high", "2", "--batch-size", "4",
        "--no-progress", "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == [CHECKPOINT_NAME]
    checkpoint = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["progress"]["step"] == 4 and checkpoint["progress"]["world_size"] == 2
    assert result.stdout.count("Done: step 4") == 1  # rank 0 alone reports
    model, vocab, record = load_model(out / CHECKPOINT_NAME)
    val_set = make_dataset(saved_data(record), "val")  # 12 samples: 3 batches, 2 for rank 0 and 1 for rank 1
    alone = evaluate(model, make_loader(val_set, vocab, 4), stage="high", loss_config=saved_spec(record).train)
    last = checkpoint["history"]["val"][-1]
    assert (last["val_cum_iou"], last["val_threshold"]) == (alone["metrics"]["cum_iou"], alone["threshold"])
    # the loss is a float mean: another process may pick other CPU kernels (exact equality of the sharded
    # evaluation itself is test_sharded_evaluation_equals_one_process's)
    assert last["val_loss"] == pytest.approx(alone["loss"], rel=1e-6)


def test_sharded_evaluation_equals_one_process(data):
    """evaluate() under torchrun, simulated in one process: rank 1 evaluates its batches (1, 3), rank 0
    its own (0, 2, 4) and receives rank 1's records through `Runtime.gather`; the result equals one
    process evaluating every batch: the same counts in the same order, the same mean loss."""
    from dmn_lib.runtime import DistInfo, Runtime, ShardedBatches

    _, val_set, vocab = data  # 48 samples: 5 batches of 10 (the last one of 8)
    model = tiny_model(vocab)

    class Rank(Runtime):
        received = []

        def gather(self, items):
            if self.dist.rank == 1:
                Rank.received = items
                return items
            return items + Rank.received

    def loader(rank):
        return make_loader(val_set, vocab, batch_sampler=ShardedBatches(len(val_set), 10, rank, world_size=2))

    assert [len(b) for b in ShardedBatches(len(val_set), 10, 0, 2)] == [10, 10, 8]
    loss = TrainConfig()
    evaluate(model, loader(1), loss_config=loss, runtime=Rank(DistInfo(1, 2), torch.device("cpu")))
    shared = evaluate(model, loader(0), loss_config=loss, runtime=Rank(DistInfo(0, 2), torch.device("cpu")))
    alone = evaluate(model, make_loader(val_set, vocab, 10), loss_config=loss)
    np.testing.assert_array_equal(shared["sweep"].intersections, alone["sweep"].intersections)
    np.testing.assert_array_equal(shared["sweep"].unions, alone["sweep"].unions)
    assert shared["loss"] == alone["loss"] and shared["metrics"] == alone["metrics"]
    assert shared["sweep"].summary_by("colour", 0.5) == alone["sweep"].summary_by("colour", 0.5)  # meta in order


def test_learning_rate_schedules_and_backbone_rate():
    """Each schedule as a function of the step within a stage; the Visual Module's own rate."""
    from dmn_lib.train import lr_factor, make_optimizer

    def curve(**kw):
        config = TrainConfig(**kw)
        return [round(lr_factor(config, step, 10), 3) for step in range(11)]

    assert curve(lr_schedule="constant") == [1.0] * 11
    assert curve(lr_schedule="constant", warmup_steps=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert curve(lr_schedule="cosine")[0] == 1.0 and curve(lr_schedule="cosine")[5] == 0.5
    assert curve(lr_schedule="cosine")[10] == 0.0
    assert curve(lr_schedule="wsd", decay_fraction=0.2) == [1.0] * 9 + [0.5, 0.0]
    by_clock = TrainConfig(lr_schedule="wsd", decay_fraction=0.25)  # stage 2 by a time budget: 90 % spent
    assert lr_factor(by_clock, 3, 10_000, fraction=0.9) == pytest.approx(0.4)
    model = DMN(DMNConfig.preset("tiny", vocab_size=10))
    optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1e-3, backbone_lr_scale=0.1), "low")
    rates = sorted(group["lr"] for group in optimizer.param_groups)
    assert rates == pytest.approx([1e-4, 1e-3])
    visual = {id(p) for p in model.visual.parameters()}
    slow = next(g for g in optimizer.param_groups if g["lr"] < 5e-4)
    assert {id(p) for p in slow["params"]} == visual
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)  # the paper's, by default
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_a_schedule_by_the_clock_decays_by_the_end_of_the_budget(data, tmp_path):
    """lr_schedule_minutes: stage 2's rate follows the time spent, so the decay ends with max_minutes."""
    train_set, _, vocab = data
    config = TrainConfig(steps_low=2, steps_high=100_000, batch_size=4, lr_schedule="wsd", decay_fraction=0.5,
                         lr_schedule_minutes=0.04, max_minutes=0.04, progress=False, out_dir=None)
    history = train(tiny_model(vocab), train_set, vocab, config)
    high = [r["lr"] for r in history["train"] if r["stage"] == "high"]
    assert len(high) >= 3 and high[0] == pytest.approx(config.lr)  # stable first...
    assert high[-1] < 0.5 * config.lr  # ...then down towards 0 as the budget runs out


@pytest.mark.parametrize("eval_batches", [0, 2, 100])
def test_validation_size_is_what_a_validation_reads(data, eval_batches):
    train_set, val_set, vocab = data  # 48 val samples
    config = TrainConfig(steps_low=1, batch_size=5, eval_batches=eval_batches, progress=False, out_dir=None)
    trainer = Trainer(tiny_model(vocab), train_set, vocab, config, val_set=val_set)
    read = sum(len(batch) for batch in trainer.val_loader.batch_sampler)
    assert config.validation_size(len(val_set)) == read == {0: 48, 2: 10, 100: 48}[eval_batches]
