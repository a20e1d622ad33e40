#!/usr/bin/env bash
# Base-to-new, step 2: evaluate the model trained by base2new_train.sh on the new classes.
#
#   bash scripts/rada/base2new_test.sh DATASET SEED [KEY VALUE ...]
#
# DATASET, SEED and the environment (DATA, OUTPUT, TRAINER, CFG, SHOTS) as for base2new_train.sh,
# which must have finished first. LOADEP (optional) pins the checkpoint epoch; by default train.py
# loads the latest checkpoint. Trailing KEY VALUE pairs are passed to train.py as yacs options.
# Output: OUTPUT/base2new/test_new/DATASET/shots_SHOTS/TRAINER/CFG/seedSEED (its log holds the new accuracy).
# A finished evaluation there is skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "DATASET SEED" "$@"
resolve_cfg base2new

COMMON_DIR="$DATASET/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
TRAIN_DIR="$OUTPUT/base2new/train_base/$COMMON_DIR"
DIR="$OUTPUT/base2new/test_new/$COMMON_DIR"
is_training_free || require_trained "$TRAIN_DIR" base2new_train.sh "$DATASET" "$SEED"
run_evaluation "$TRAIN_DIR" "$DIR" DATASET.NUM_SHOTS "$(num_shots)" DATASET.SUBSAMPLE_CLASSES new "${OPTS[@]}"
