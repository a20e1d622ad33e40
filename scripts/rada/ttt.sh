#!/usr/bin/env bash
# Test-time training (TPT's protocol) on the test split of DATASET, one unlabeled image at a time.
#
#   bash scripts/rada/ttt.sh DATASET SEED [KEY VALUE ...]
#
# DATASET: a file stem of configs/datasets/: imagenetv2 imagenet_sketch imagenet_a imagenet_r (the
# paper's targets), imagenet, or one of the 10 other datasets (caltech101 ... ucf101). SEED: 1, 2 or 3.
# Trailing KEY VALUE pairs are passed to train.py as yacs options (e.g. TRAINER.TTT.STEPS 2).
# Environment: DATA (dataset root, default ./data), OUTPUT (output root, default ./output),
#   TRAINER: RAdaTTT (default; hand-crafted prompts, the head adapts) or RAdaCoOpTTT (CoOp context
#     and head, both adapt),
#   CFG: default vit_b16_imagenet for imagenet and its variants, vit_b16_finegrained (with AugMix)
#     for the other datasets: TPT's augmentations,
#   PRETRAINED=1: start from the model that xd_train.sh trained on ImageNet with the trainer the
#     test-time trainer is built on (RAda for RAdaTTT, RAdaCoOp for RAdaCoOpTTT), the same SEED and
#     SHOTS (default 16), and config SOURCE_CFG (default: that trainer's in scripts/rada/common.sh):
#     the paper's "RAda†". Without it the head starts as the identity: the paper's "RAda".
#   MODEL_DIR: start from this training output folder instead (implies PRETRAINED=1; SHOTS names
#     the output folder). LOADEP (optional): the epoch of the checkpoint to load (default: the latest).
# Output: OUTPUT/ttt/DATASET/shots_0/TRAINER/CFG/seedSEED from the identity head, shots_SHOTS from a
# trained model. Its log holds the test-time trained accuracy (`* accuracy:`, `* result:`) and the
# accuracy of the same model without test-time training (`* zero-shot accuracy:`).
# A finished run there is skipped.
set -euo pipefail
TRAINER="${TRAINER:-RAdaTTT}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "DATASET SEED" "$@"
[[ "$TRAINER" == *TTT ]] ||
    die "ttt.sh runs a test-time trainer: TRAINER must be RAdaTTT or RAdaCoOpTTT, got '$TRAINER'"
PRETRAINED="${PRETRAINED:-0}"
[[ "$PRETRAINED" =~ ^[01]$ ]] || die "PRETRAINED must be 0 or 1, got '$PRETRAINED'"
if [ -z "$CFG" ]; then
    case "$DATASET" in
        imagenet | imagenetv2 | imagenet_sketch | imagenet_a | imagenet_r) CFG=vit_b16_imagenet ;;
        *) CFG=vit_b16_finegrained ;;
    esac
fi
resolve_cfg ttt

MODEL_DIR="${MODEL_DIR:-}"
START="shots_0"
if [ -n "$MODEL_DIR" ]; then
    [ -d "$MODEL_DIR" ] ||
        die "MODEL_DIR '$MODEL_DIR' does not exist: it must be the output folder of a ${TRAINER%TTT} training run"
    START="shots_$SHOTS"
elif [ "$PRETRAINED" = 1 ]; then
    SOURCE_TRAINER="${TRAINER%TTT}"
    SOURCE_CFG="$(TRAINER="$SOURCE_TRAINER" CFG="${SOURCE_CFG:-}" && resolve_cfg xd && echo "$CFG")" || exit 1
    MODEL_DIR="$OUTPUT/xd/train/imagenet/shots_$SHOTS/$SOURCE_TRAINER/$SOURCE_CFG/seed$SEED"
    (TRAINER="$SOURCE_TRAINER" CFG="$SOURCE_CFG" && require_trained "$MODEL_DIR" xd_train.sh "$SEED") || exit 1
    START="shots_$SHOTS"
fi

DIR="$OUTPUT/ttt/$DATASET/$START/$TRAINER/$CFG/seed$SEED"
run_evaluation "$MODEL_DIR" "$DIR" "${OPTS[@]}"
