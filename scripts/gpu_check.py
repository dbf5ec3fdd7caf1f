"""The measurements of `bash scripts/gpu_check.sh OUT_DIR` (see that script): writes OUT_DIR/measurements.json.

  kernels    the Triton SRU kernel against the Python-loop SRU (the same weights), forward and backward,
             in float32 (agreement to ~1e-5) and under bf16 autocast (each one's error against the
             float32 loop: the kernel keeps its state in float32, the loop in bf16), plus their speeds;
  benchmark  dmn_lib.benchmark's LSTM/SRU training-step ratio of the Language + Synthesis Modules at
             the paper's sizes (SRU and LSTM timed in turns; float32, and under bf16 autocast), and the
             paper preset's training throughput at 320 px (images/s, AMP, channels_last).

--smoke runs the same code on the CPU at toy sizes (the Triton kernel in its interpreter): a test of
this script, whose numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dmn_lib import benchmark
from dmn_lib.config import DMNConfig
from dmn_lib.models.sru import SRU


def _run(net, x, dtype):
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        h, c = net(x)
    loss = (h.float() * torch.linspace(-1, 1, h.shape[-1], device=x.device)).sum() + c.float().sum()
    grads = torch.autograd.grad(loss, [x, *net.parameters()])
    return [h.float(), c.float(), *(g.float() for g in grads)]


def _error(got, ref) -> float:
    """Largest |got - ref| / (1 + |ref|) over h, c and every gradient."""
    return max(((a - b).abs() / (1 + b.abs())).max().item() for a, b in zip(got, ref))


def compare_kernels(device, sizes, echo) -> list[dict]:
    rows = []
    for name, (length, batch, n_in, hidden, layers) in sizes.items():
        torch.manual_seed(0)
        loop = SRU(n_in, hidden, layers).to(device)
        with torch.no_grad():
            for layer in loop.layers:
                layer.bias.normal_(0, 0.5)
        fused = SRU(n_in, hidden, layers, kernel="triton").to(device)
        fused.load_state_dict(loop.state_dict())
        x = torch.randn(length, batch, n_in, device=device)
        reference = _run(loop, x, None)  # the Python loop in float32
        row = {"sizes": name, "shape": [length, batch, n_in, hidden, layers],
               "float32_error": _error(_run(fused, x, None), reference)}
        for label, net in (("triton", fused), ("python", loop)):
            row[f"bf16_error_{label}"] = _error(_run(net, x, torch.bfloat16), reference)
            row[f"{label}_ms"] = 1000 * benchmark.timed(lambda: _run(net, x, None), device, 1, 3)
        row["ok"] = row["float32_error"] < 1e-4 and row["bf16_error_triton"] <= 1.5 * row["bf16_error_python"] + 1e-2
        rows.append(row)
        echo(f"  {name:<6} float32 max error {row['float32_error']:.1e}; bf16 error: triton "
             f"{row['bf16_error_triton']:.1e}, python loop {row['bf16_error_python']:.1e}; fwd+bwd "
             f"triton {row['triton_ms']:.1f} ms, python loop {row['python_ms']:.1f} ms  "
             f"{'ok' if row['ok'] else 'FAIL'}")
    return rows


def rnn_ratio(config, step_sizes, device, warmup, repeats, dtype) -> dict:
    steps, params = {}, {}
    for rnn in ("sru", "lstm"):
        step, params[rnn] = benchmark.lm_sm_model(config.replace(rnn=rnn), *step_sizes, device)

        def run(step=step):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                step()

        steps[rnn] = run
    seconds = benchmark.timed_alternately(steps, device, warmup, repeats)
    return {"precision": str(dtype).replace("torch.", "") if dtype else "float32",
            "sru_ms": 1000 * seconds["sru"], "lstm_ms": 1000 * seconds["lstm"],
            "lstm_over_sru": seconds["lstm"] / seconds["sru"], "sru_params": params["sru"],
            "lstm_params": params["lstm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes (Triton interpreted)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; run `bash scripts/gpu_check.sh OUT --cpu-smoke` to test the script")
    result = {"device": benchmark.device_name(device), "torch": torch.__version__, "smoke": args.smoke}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None

    def echo(line):
        print(line, flush=True)

    start = time.perf_counter()
    echo("kernels: Triton SRU vs the Python-loop SRU, forward + backward")
    sizes = ({"toy": (3, 2, 5, 6, 2)} if args.smoke else
             {"LM": (12, 64, 1000, 1000, 3), "mSRU": (12, 64 * 100, 1000, 1005, 3)})
    result["kernels"] = compare_kernels(device, sizes, echo)

    echo("benchmark: LSTM/SRU step of the Language + Synthesis Modules (timed in turns)")
    if args.smoke:
        config, step_sizes, image, batch, warm, reps = DMNConfig.preset("tiny", vocab_size=100), (2, 4, 2), 64, 2, 0, 1
    else:
        config, step_sizes = DMNConfig.preset("paper", vocab_size=100), (4, 12, 10)
        image, batch, warm, reps = 320, 16, 2, 5
    result["lm_sm_step"] = []
    for dtype in (None, torch.bfloat16):
        row = rnn_ratio(config, step_sizes, device, warm, reps, dtype)
        row["batch"], row["words"], row["map"] = step_sizes
        result["lm_sm_step"].append(row)
        echo(f"  {row['precision']:<8} SRU {row['sru_ms']:.1f} ms, LSTM {row['lstm_ms']:.1f} ms: "
             f"LSTM/SRU {row['lstm_over_sru']:.2f}x (batch {step_sizes[0]}, {step_sizes[1]} words, "
             f"{step_sizes[2]}x{step_sizes[2]} map)")
    tp = benchmark.training_throughput(config, image, batch, device, warm, reps)
    result["train_throughput"] = {"preset": "tiny" if args.smoke else "paper", "image_size": image, **tp}
    echo(f"  {result['train_throughput']['preset']} preset training at {image} px: {tp['images_per_s']:.1f} images/s "
         f"(batch {batch}, {tp['precision']})")
    result["seconds"] = time.perf_counter() - start
    (out / "measurements.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
