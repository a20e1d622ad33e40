#!/usr/bin/env bash
# Base-to-new, step 1: train on the base half of the classes, then test on the base classes.
#
#   bash scripts/rada/base2new_train.sh DATASET SEED [KEY VALUE ...]
#
# DATASET: a file stem of configs/datasets/ (e.g. caltech101); SEED: 1, 2 or 3 as in the papers.
# Trailing KEY VALUE pairs are passed to train.py as yacs options (e.g. OPTIM.MAX_EPOCH 2).
# Environment: DATA (dataset root, default ./data), OUTPUT (output root, default ./output),
#   TRAINER (default RAdaCoOp), CFG (default per trainer, see scripts/rada/common.sh), SHOTS (default 16).
# Output: OUTPUT/base2new/train_base/DATASET/shots_SHOTS/TRAINER/CFG/seedSEED (its log holds the base accuracy).
# A finished run there is skipped; an unfinished one is run again and resumes from its last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "DATASET SEED" "$@"
resolve_cfg base2new

DIR="$OUTPUT/base2new/train_base/$DATASET/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
run_training "$DIR" DATASET.NUM_SHOTS "$(num_shots)" DATASET.SUBSAMPLE_CLASSES base "${OPTS[@]}"
