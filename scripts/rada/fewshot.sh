#!/usr/bin/env bash
# Few-shot classification: train on SHOTS images of every class, then test on all classes.
#
#   bash scripts/rada/fewshot.sh DATASET SEED [KEY VALUE ...]
#
# DATASET: a file stem of configs/datasets/ (e.g. caltech101); SEED: 1, 2 or 3 as in the papers.
# Trailing KEY VALUE pairs are passed to train.py as yacs options.
# Environment: DATA (dataset root, default ./data), OUTPUT (output root, default ./output),
#   TRAINER (default RAdaCoOp), CFG (default per trainer, see scripts/rada/common.sh),
#   SHOTS (default 16; CoOp's study uses 1 2 4 8 16).
# Output: OUTPUT/fewshot/DATASET/shots_SHOTS/TRAINER/CFG/seedSEED
# A finished run there is skipped; an unfinished one is run again and resumes from its last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "DATASET SEED" "$@"
resolve_cfg fewshot

DIR="$OUTPUT/fewshot/$DATASET/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
run_training "$DIR" DATASET.NUM_SHOTS "$(num_shots)" "${OPTS[@]}"
