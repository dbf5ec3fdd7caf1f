"""`python -m dmn_lib benchmark`: how fast DMN trains and answers, on the machine at hand.

Taught in notebook 10 (SRU vs LSTM, the paper's §5.3 and Fig. 7). The paper claims that SRUs make
training "up to 3x faster" than LSTMs; (a) measures it, in one run, on whatever device is present:

  (a) one training step (forward + backward) of the Language + Synthesis Modules only, with SRUs
      and with LSTMs, at the paper's sizes (embedding 1000, LM hidden 1000 x 3 layers, SM fusion to
      1000 channels, mSRU hidden 1005 x 3 layers, run per pixel of a 10x10 map over ~12 words) and
      at the course preset's sizes. The Visual Module is replaced by fixed feature maps of the right
      shapes, so the backbone's time (the same for both) does not dilute the comparison; the loss is
      the stage-1 (low-resolution) loss, so the Upsampling Module is not run either. The SRU runs
      its fused kernel (Triton on a GPU, C++ on the CPU; dmn_lib/models/_sru_fused.py), and the SRU
      and LSTM steps are timed in turns in this one process, so their ratio is fair under load;
  (b) the course preset's training throughput at 192 px (images/s, a full stage-2 step with the
      optimizer, as the trainer runs it: AMP and channels_last on a GPU), data already in memory;
  (c) the course preset's single-query inference latency at 192 px (batch 1, full precision);
  (d) how fast SynthRef generates 192 px samples in one process (the data side of (b)).

Figures are medians over repeats after warm-up steps; on a GPU every timing synchronizes the device.
`--quick` runs the same code at toy sizes as a smoke test: its numbers mean nothing.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dmn_lib.config import DMNConfig


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name}, {torch.get_num_threads()} threads"


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class FixedFeatures(nn.Module):
    """Stands in for the Visual Module: returns the same feature maps [I_1..I_N] every call."""

    def __init__(self, features: list[torch.Tensor]):
        super().__init__()
        self.features = features

    def forward(self, images):
        return self.features


def _batch(vocab_size: int, batch: int, words: int, size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    tokens = torch.randint(2, vocab_size, (batch, words), generator=g).to(device)
    lengths = torch.full((batch,), words, dtype=torch.long, device=device)
    masks = (torch.rand(batch, 1, size, size, generator=g) > 0.8).float().to(device)
    return images, tokens, lengths, masks


def lm_sm_model(config: DMNConfig, batch: int, words: int, map_size: int,
                device: torch.device) -> tuple[Callable[[], None], int]:
    """One forward + backward of the Language + Synthesis Modules (stage-1 loss), ready to time.

    -> (step, parameters of the recurrent nets). The Visual Module is replaced by fixed feature maps.
    Used by (a) and by notebook 10 (through `lm_sm_step`).
    """
    from dmn_lib.models.dmn import DMN

    torch.manual_seed(0)
    model = DMN(config)
    size = map_size * config.stride
    channels = model.visual.channels
    features = [torch.randn(batch, c, size >> (n + 1), size >> (n + 1), device=device) for n, c in enumerate(channels)]
    model.visual = FixedFeatures(features)  # drop the backbone: its cost is the same for SRU and LSTM
    model.upsampling = None  # stage "low" never runs it
    model.to(device).train()
    images, tokens, lengths, _ = _batch(config.vocab_size, batch, words, size, device)
    target = (torch.rand(batch, 1, map_size, map_size) > 0.7).float().to(device)

    def step():
        model.zero_grad(set_to_none=True)
        low = model(images, tokens, lengths, stage="low")
        F.binary_cross_entropy_with_logits(low, target).backward()

    # The recurrent nets' parameters: the paper's §5.3 counts (LM SRU 9.0M vs LSTM 24.0M, SM mSRU
    # 10.1M vs mLSTM 24.2M). The rest of LM + SM (filters, fusion conv) is the same for both.
    params = sum(p.numel() for m in (model.language.rnn, model.synthesis.msru) for p in m.parameters())
    return step, params


def lm_sm_step(config: DMNConfig, batch: int, words: int, map_size: int, device: torch.device,
               warmup: int, repeats: int) -> dict:
    """Seconds of one forward + backward of the Language + Synthesis Modules (stage-1 loss)."""
    step, params = lm_sm_model(config, batch, words, map_size, device)
    return {"seconds": timed(step, device, warmup, repeats), "parameters": params}


def timed_alternately(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                      repeats: int) -> dict[str, float]:
    """Median seconds of each step, timed in turns (a, b, a, b, ...) so that a change in the
    machine's load while measuring hits every step alike and their ratio stays fair (used by (a))."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device, 0, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def training_throughput(config: DMNConfig, image_size: int, batch: int, device: torch.device,
                        warmup: int, repeats: int, train_config=None) -> dict:
    """Images per second of the trainer's stage-2 step (forward, loss, backward, Adam), the batch already
    in memory; `train_config` (a TrainConfig) gives the loss, the memory layout and the optimizer's groups."""
    from dmn_lib.losses import stage_loss, stage_outputs
    from dmn_lib.models.dmn import DMN
    from dmn_lib.runtime import amp_dtype, autocast
    from dmn_lib.spec import TrainConfig
    from dmn_lib.train import make_optimizer

    tcfg = train_config or TrainConfig()
    torch.manual_seed(0)
    model = DMN(config).to(device).train()
    images, tokens, lengths, masks = _batch(config.vocab_size, batch, 8, image_size, device)
    dtype = amp_dtype(device)
    if tcfg.channels_last:  # as the trainer does (dmn_lib.runtime), on a GPU and on a CPU
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    optimizer, _ = make_optimizer(model, tcfg.replace(lr=1e-4), "high")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    batch_dict = {"images": images, "tokens": tokens, "lengths": lengths, "masks": masks}

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits, low = stage_outputs(model, batch_dict, "high")
            loss, _ = stage_loss(logits, low, masks, tcfg)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    seconds = timed(step, device, warmup, repeats)
    out = {"seconds_per_step": seconds, "images_per_s": batch / seconds, "batch": batch,
           "precision": str(dtype).replace("torch.", "") if dtype else "float32"}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


@torch.inference_mode()
def inference_latency(config: DMNConfig, image_size: int, device: torch.device, warmup: int, repeats: int) -> float:
    """Seconds to segment one image for one query (batch 1, eval mode, float32)."""
    from dmn_lib.models.dmn import DMN

    torch.manual_seed(0)
    model = DMN(config).to(device).eval()
    images, tokens, lengths, _ = _batch(config.vocab_size, 1, 6, image_size, device)
    return timed(lambda: model(images, tokens, lengths), device, warmup, repeats)


def synthref_rate(image_size: int, samples: int) -> float:
    """SynthRef samples generated per second in this process."""
    from dmn_lib.data.synthetic import SynthRef

    ds = SynthRef("unc", "train", size=samples, image_size=image_size, seed=0)
    start = time.perf_counter()
    for i in range(samples):
        ds[i]
    return samples / (time.perf_counter() - start)


# The course recipe of d847ad3, the commit before the speed work of this version: the README's course-mode
# command trained the course preset (small DPN from scratch, the sru package's CPU loop) at 192 px, batch 16.
_OLD_STEP = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from dmn_lib.benchmark import training_throughput
from dmn_lib.config import DMNConfig
print(json.dumps(training_throughput(DMNConfig.preset("course", vocab_size=100), 192, 16, torch.device("cpu"),
                                     1, int(sys.argv[2]))))
"""


def throughput_against(commit: str, repeats: int = 3, rounds: int = 2, echo: Callable[[str], None] = print) -> dict:
    """The course spec's training throughput now against the course recipe at `commit`, both measured on this
    machine in one run, in turns (old, new, old, new, ...): the old code runs from `git archive` in a
    subprocess. Compute only (the batch in memory), and with the data each recipe reads: the old one
    rendered SynthRef on the fly at 192 px, the new one caches the rendered samples (DataSpec.cache)."""
    import io
    import os
    import subprocess
    import sys
    import tarfile
    import tempfile

    from dmn_lib.course import REPO_ROOT
    from dmn_lib.spec import spec

    try:
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"benchmark --against {commit} needs git and the repository's history (a clone): "
                           f"{getattr(err, 'stderr', b'').decode().strip() or err}") from err
    run, threads = spec("course"), torch.get_num_threads()
    config = run.model.replace(vocab_size=100, pretrained_file=None)
    old, new = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(tmp, filter="data")
        env = {**os.environ, "PYTHONPATH": tmp}
        for _ in range(rounds):
            out = subprocess.run([sys.executable, "-c", _OLD_STEP, str(threads), str(repeats)], cwd=tmp, env=env,
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"the {commit} code failed to run: {out.stderr.strip()[-500:]}")
            old.append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
            new.append(training_throughput(config, run.data.image_size, run.train.batch_size, torch.device("cpu"),
                                           1, repeats, run.train)["images_per_s"])
    old_data = synthref_rate(192, 32)  # the same generator then and now
    result = {"commit": commit, "threads": threads, "old_images_per_s": statistics.median(old),
              "new_images_per_s": statistics.median(new), "old_synthref_per_s": old_data}
    result["compute_ratio"] = result["new_images_per_s"] / result["old_images_per_s"]
    old_with_data = 1 / (1 / result["old_images_per_s"] + 1 / old_data)
    result["with_data_ratio"] = result["new_images_per_s"] / old_with_data
    echo(f"(e) training throughput, the course recipe now vs at {commit} ({threads} thread(s), in turns, "
         f"{rounds} rounds): {result['new_images_per_s']:.1f} vs {result['old_images_per_s']:.1f} images/s = "
         f"{result['compute_ratio']:.2f}x; with the data each reads (then rendered on the fly, "
         f"{old_data:.0f} samples/s; now cached): {result['with_data_ratio']:.2f}x")
    return result


BASELINE_COMMIT = "d847ad3"  # the course recipe before this version's speed work (`throughput_against`)


def run_all(quick: bool = False, device: str = "auto", repeats: int | None = None,
            echo: Callable[[str], None] = print, against: str | None = BASELINE_COMMIT) -> dict:
    """Measure (a)-(e) and print them as they come; returns the figures as a dict."""
    from dmn_lib.runtime import resolve_device

    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    reps = repeats or (1 if quick else 5 if gpu else 3)
    warm = 1 if quick else 3 if gpu else 1
    results: dict = {"device": device_name(dev), "torch": str(torch.__version__), "quick": quick, "repeats": reps}
    echo(f"device: {results['device']}   torch {torch.__version__}   median of {reps} repeat(s)"
         + ("   [--quick: toy sizes, the numbers mean nothing]" if quick else ""))

    # (a) SRU vs LSTM, Language + Synthesis Modules
    if quick:
        setups = [("tiny", DMNConfig.preset("tiny", vocab_size=100), 2, 4, 2)]
    else:
        setups = [
            ("paper", DMNConfig.preset("paper", vocab_size=100), 4, 12, 10),
            ("course", DMNConfig.preset("course", vocab_size=100), 16, 12, 12),
        ]
    from dmn_lib.models._sru_fused import resolve_kernel

    results["sru_kernel"] = resolve_kernel("auto", dev)
    echo(f"(a) Language + Synthesis Modules, one training step (forward + backward), float32; "
         f"SRU kernel: {results['sru_kernel']}; SRU and LSTM timed in turns")
    echo(f"    {'sizes':<8}{'batch':>6}{'words':>6}{'map':>7}{'SRU ms':>10}{'LSTM ms':>10}{'LSTM/SRU':>10}"
         f"{'RNN params: SRU':>17}{'LSTM':>8}")
    results["lm_sm_step"] = []
    for name, config, batch, words, map_size in setups:
        row = {"sizes": name, "batch": batch, "words": words, "map": f"{map_size}x{map_size}"}
        steps = {}
        for rnn in ("sru", "lstm"):
            steps[rnn], row[f"{rnn}_params"] = lm_sm_model(config.replace(rnn=rnn), batch, words, map_size, dev)
        for rnn, seconds in timed_alternately(steps, dev, warm, reps).items():
            row[f"{rnn}_ms"] = 1000 * seconds
        del steps
        row["lstm_over_sru"] = row["lstm_ms"] / row["sru_ms"]
        results["lm_sm_step"].append(row)
        echo(f"    {name:<8}{batch:>6}{words:>6}{row['map']:>7}{row['sru_ms']:>10.1f}{row['lstm_ms']:>10.1f}"
             f"{row['lstm_over_sru']:>9.2f}x{row['sru_params'] / 1e6:>16.2f}M{row['lstm_params'] / 1e6:>7.2f}M")

    # (b) training throughput, (c) inference latency, (d) data generation: the course preset
    name, size = ("tiny", 64) if quick else ("course", 192)
    config = DMNConfig.preset(name, vocab_size=100)
    batch = 2 if quick else (64 if gpu else 16)
    tp = training_throughput(config, size, batch, dev, warm, reps)
    results["train_throughput"] = {"preset": name, "image_size": size, **tp}
    memory = f", peak memory {tp['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in tp else ""
    echo(f"(b) {name} preset training throughput at {size} px: {tp['images_per_s']:.1f} images/s "
         f"(batch {batch}, {1000 * tp['seconds_per_step']:.0f} ms/step, {tp['precision']}{memory})")

    latency = inference_latency(config, size, dev, warm, max(reps, 1 if quick else 10))
    results["inference_latency"] = {"preset": name, "image_size": size, "ms": 1000 * latency}
    echo(f"(c) {name} preset single-query inference latency at {size} px: {1000 * latency:.1f} ms (batch 1, float32)")

    rate = synthref_rate(size, 2 if quick else 32)
    results["synthref_samples_per_s"] = rate
    echo(f"(d) SynthRef generation at {size} px: {rate:.1f} samples/s per process "
         "(use DataLoader workers when (b) is faster)")
    if against and not quick and not gpu:
        results["against"] = throughput_against(against, reps, echo=echo)
    return results
