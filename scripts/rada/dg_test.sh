#!/usr/bin/env bash
# Full fine-tuning (the paper's FFT protocol), step 2: evaluate the ImageNet model of dg_train.sh on
# a distribution shift.
#
#   bash scripts/rada/dg_test.sh DATASET SEED [KEY VALUE ...]
#
# DATASET: imagenetv2, imagenet_r, imagenet_a, imagenet_sketch or objectnet (the paper's five
# shifts). ImageNet-A, -R and ObjectNet cover some of ImageNet's classes: the fine-tuning trainers
# classify over all 1000 and keep the logits of those classes, as WiSE-FT and FLYP evaluate.
# Environment as for dg_train.sh, which must have finished first; LOADEP (optional) pins the
# checkpoint epoch (default: the latest). Trailing KEY VALUE pairs are passed to train.py.
# Output: OUTPUT/dg/test/DATASET/shots_SHOTS/TRAINER/CFG/seedSEED
# A finished evaluation there is skipped. Tables: python scripts/parse_results.py OUTPUT --protocol dg
set -euo pipefail
TRAINER="${TRAINER:-RAdaFT}"
SHOTS="${SHOTS:-all}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "DATASET SEED" "$@"
resolve_cfg dg

TRAIN_DIR="$OUTPUT/dg/train/imagenet/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
DIR="$OUTPUT/dg/test/$DATASET/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
is_training_free || require_trained "$TRAIN_DIR" dg_train.sh "$SEED"
run_evaluation "$TRAIN_DIR" "$DIR" "${OPTS[@]}"
