#!/usr/bin/env bash
# Cross-dataset and domain generalisation, step 2: evaluate the ImageNet model of xd_train.sh on DATASET.
#
#   bash scripts/rada/xd_test.sh DATASET SEED [KEY VALUE ...]
#
# DATASET: a target stem of configs/datasets/: the 10 other datasets for cross-dataset transfer
# (caltech101 ... ucf101), imagenetv2 imagenet_sketch imagenet_a imagenet_r for domain generalisation.
# Environment as for xd_train.sh, which must have finished first; LOADEP (optional) pins the
# checkpoint epoch (default: the latest). Trailing KEY VALUE pairs are passed to train.py as yacs options.
# Output: OUTPUT/xd/test/DATASET/shots_SHOTS/TRAINER/CFG/seedSEED
# A finished evaluation there is skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "DATASET SEED" "$@"
resolve_cfg xd

TRAIN_DIR="$OUTPUT/xd/train/imagenet/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
DIR="$OUTPUT/xd/test/$DATASET/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
is_training_free || require_trained "$TRAIN_DIR" xd_train.sh "$SEED"
run_evaluation "$TRAIN_DIR" "$DIR" "${OPTS[@]}"
