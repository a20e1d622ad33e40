#!/usr/bin/env bash
# The GPU check in one command: the RAda head (blocked, fused, dense), training steps of RAda,
# RAdaCoOp, RAdaMaPLe, RAdaAdapter and RAdaFT on a random full-size ViT-B/16, a determinism check,
# evaluation over 1000 classes, one image of test-time training and the offline demo, printed as
# one table; exit status 1 if a check fails. Nothing is downloaded. Under 8 minutes on one CUDA GPU.
#
#   bash bench/gpu_check.sh                   # on a CUDA machine
#   bash bench/gpu_check.sh --device cpu --small   # the CPU parts at toy sizes (the test suite runs this)
#
# Uses .venv like the other scripts (RADA_VENV to point elsewhere); see bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RADA_WITH_DASSL=1 source scripts/setup_env.sh
exec python bench/gpu_check.py "$@"
