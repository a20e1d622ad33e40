#!/usr/bin/env bash
# Cross-dataset and domain generalisation, step 1: train on ImageNet (all 1000 classes, SHOTS shots).
#
#   bash scripts/rada/xd_train.sh SEED [KEY VALUE ...]
#
# SEED: 1, 2 or 3 as in the papers. Trailing KEY VALUE pairs are passed to train.py as yacs options.
# Environment: DATA (dataset root, default ./data), OUTPUT (output root, default ./output),
#   TRAINER (default RAdaCoOp), CFG (default per trainer; MaPLe and RAdaMaPLe use their
#   *_cross_datasets config, see scripts/rada/common.sh), SHOTS (default 16).
# Output: OUTPUT/xd/train/imagenet/shots_SHOTS/TRAINER/CFG/seedSEED (its log holds the source accuracy).
# A finished run there is skipped; an unfinished one is run again and resumes from its last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args SEED "$@"
resolve_cfg xd

DIR="$OUTPUT/xd/train/$DATASET/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
run_training "$DIR" DATASET.NUM_SHOTS "$(num_shots)" "${OPTS[@]}"
