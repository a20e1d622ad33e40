#!/usr/bin/env bash
# Full fine-tuning (the paper's FFT protocol), step 1: fine-tune CLIP on ImageNet (all 1000 classes,
# every training image), then test on ImageNet (the in-distribution accuracy).
#
#   bash scripts/rada/dg_train.sh SEED [KEY VALUE ...]
#
# SEED: 1, 2 or 3. Trailing KEY VALUE pairs are passed to train.py as yacs options.
# Environment: DATA (dataset root, default ./data), OUTPUT (output root, default ./output),
#   TRAINER (default RAdaFT; FT and FLYP are the baselines), CFG (default per trainer, see
#   scripts/rada/common.sh: vit_b16_ep10_batch512, FLYP's ImageNet recipe), SHOTS (default all:
#   every training image; a number trains on that many images per class).
# Output: OUTPUT/dg/train/imagenet/shots_SHOTS/TRAINER/CFG/seedSEED (its log holds the ImageNet accuracy).
# A finished run there is skipped; an unfinished one is run again and resumes from its last checkpoint.
set -euo pipefail
TRAINER="${TRAINER:-RAdaFT}"
SHOTS="${SHOTS:-all}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args SEED "$@"
resolve_cfg dg

DIR="$OUTPUT/dg/train/$DATASET/shots_$SHOTS/$TRAINER/$CFG/seed$SEED"
run_training "$DIR" DATASET.NUM_SHOTS "$(num_shots)" "${OPTS[@]}"
