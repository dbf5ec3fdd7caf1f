#!/usr/bin/env bash
# One GPU check of DMN, for a machine with one CUDA GPU (written for an H100/H200), in at most ~6 minutes:
#   1. the CUDA tests (tests/test_sru_kernels.py, tests/test_sru.py, tests/test_models.py);
#   2. the Triton SRU kernel vs the Python-loop SRU on the GPU, forward + backward, float32 and bf16,
#      and dmn_lib.benchmark's figures: the LSTM/SRU step ratio at the paper's sizes and the paper
#      preset's training images/s at 320 px (scripts/gpu_check.py);
#   3. a 100-step training of the paper preset at 320 px with AMP, through the CLI;
# and writes OUT_DIR/check.json (every figure, every step's status) and OUT_DIR/gpu_check.log.
#
#   bash scripts/gpu_check.sh OUT_DIR               # on the GPU machine
#   bash scripts/gpu_check.sh OUT_DIR --cpu-smoke   # anywhere: the same steps on the CPU at toy sizes,
#                                                   # Triton in its interpreter (< 1 min; numbers meaningless)
#
# No network is needed. Packages missing on the GPU machine (sru, ninja, ...) travel as wheels in
# .whl/ (fetch them beforehand with `bash scripts/gpu_wheels.sh` on a machine with network); they are
# installed into /tmp/site, never into the system. Each step has a time limit and a failing step does
# not stop the others; the exit status is 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--cpu-smoke]}"
SMOKE=0
[ "${2:-}" = "--cpu-smoke" ] || [ "${DMN_GPU_CHECK_SMOKE:-0}" = 1 ] && SMOKE=1
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  echo "== gpu_check --cpu-smoke: the script's own test, on the CPU at toy sizes; its numbers mean nothing"
  echo "   (uses this environment's packages: set PYTHON=.venv/bin/python; the .whl/ wheels are for python 3.12)"
else
  # The compiled C++ ops (the sru package's, dmn_lib's CPU SRU): somewhere writable, kept between runs
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/dmn_torch_extensions}"
fi
if [ "$SMOKE" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"  # (ninja's binary lands in bin/)
fi
"$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF

declare -A STATUS SECONDS_TAKEN
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, record its exit status and duration
  local name=$1 limit=$2 t0=$(date +%s)
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@"
  STATUS[$name]=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - t0 ))
  echo "== $name: exit ${STATUS[$name]} after ${SECONDS_TAKEN[$name]}s"
}

# 1. tests: the CUDA ones run here (they skip without a GPU); the smoke run keeps to a few fast ones
if [ "$SMOKE" = 1 ]; then TESTS=(tests/test_sru_kernels.py -k "on_cuda or no-skip-projection")
else TESTS=(tests/test_sru_kernels.py tests/test_sru.py tests/test_models.py); fi
step tests 150 "$PY" -m pytest -o addopts="" -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" "${TESTS[@]}"

# 2. kernel vs Python SRU, and the benchmark's figures
step measurements 150 "$PY" scripts/gpu_check.py --out "$OUT" $([ "$SMOKE" = 1 ] && echo --smoke)

# 3. training through the CLI.
# ---- THE TRAINING COMMAND: the one place to adapt when the CLI's flags change --------------------
if [ "$SMOKE" = 1 ]; then
  TRAIN=(--preset tiny --image-size 64 --train-size 16 --val-size 4 --steps-low 2 --steps-high 2 --batch-size 2
         --eval-every 2 --eval-batches 1 --workers 0)
else
  TRAIN=(--preset paper --image-size 320 --train-size 1600 --val-size 64 --steps-low 50 --steps-high 50 --batch-size 16
         --eval-every 50 --eval-batches 2 --workers 8)
fi
step train 150 "$PY" -m dmn_lib train --data synthref "${TRAIN[@]}" --no-progress --out "$OUT/train"
# ---------------------------------------------------------------------------------------------------

# check.json: every step's status and time, the measurements, and the training's history
STATUS_JSON="{"; for k in "${!STATUS[@]}"; do STATUS_JSON+="\"$k\": {\"exit\": ${STATUS[$k]}, \"seconds\": ${SECONDS_TAKEN[$k]}},"; done
STATUS_JSON="${STATUS_JSON%,}}"
"$PY" - "$OUT" "$STATUS_JSON" "$SMOKE" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, steps, smoke, total = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
check = {"smoke": smoke, "total_seconds": total, "steps": steps}
if (out / "tests.xml").is_file():
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    check["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
if (out / "measurements.json").is_file():
    check.update(json.loads((out / "measurements.json").read_text()))
history = out / "train" / "history.json"
if history.is_file():
    records = json.loads(history.read_text())
    check["train"] = {"history_tail": records[-3:] if isinstance(records, list) else records}
check["ok"] = all(s["exit"] == 0 for s in steps.values()) and all(r.get("ok") for r in check.get("kernels", [{}]))
(out / "check.json").write_text(json.dumps(check, indent=1))
print(f"== wrote {out / 'check.json'}: ok={check['ok']} in {total}s")
sys.exit(0 if check["ok"] else 1)
EOF
