#!/usr/bin/env bash
# The offline demo: base-to-new with RAdaCoOp on a synthetic dataset the repo generates, then
# the results table. Sets up .venv (and Dassl) on first use; a few minutes on a 2-core CPU.
#
#   bash scripts/rada/demo.sh
#
# Uses the real ViT-B/16 weights when they are in the CLIP cache ($CLIP_CACHE_DIR or
# ~/.cache/clip), otherwise a tiny random CLIP (numbers near chance: it shows the pipeline,
# not the method). Environment: DEMO_OUTPUT (default output/demo), DATA (default ./data),
# SEEDS, EPOCHS, TRAINER (default RAdaCoOp).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RADA_WITH_DASSL=1 source scripts/setup_env.sh

export DATA="${DATA:-./data}"
export OUTPUT="${DEMO_OUTPUT:-output/demo}"
export TRAINER="${TRAINER:-RAdaCoOp}"
python -m datasets.synthetic --root "$DATA"

if python -c "import os, sys; from trainers.core.clip_loader import cached_weights_path; sys.exit(not os.path.isfile(cached_weights_path('ViT-B/16')))"; then
    BACKBONE="ViT-B/16"
    SEEDS="${SEEDS:-1}"
    EPOCHS="${EPOCHS:-3}"
    echo "[demo] using the cached real CLIP ViT-B/16 weights"
else
    BACKBONE="$OUTPUT/tiny-clip.pt"
    SEEDS="${SEEDS:-1 2 3}"
    EPOCHS="${EPOCHS:-10}"
    mkdir -p "$OUTPUT"
    python -m trainers.core.tiny_clip "$BACKBONE"
    cat <<BANNER
################################################################################################
# [demo] NO REAL CLIP WEIGHTS FOUND (ViT-B/16 is not in the CLIP cache): running with a TINY,  #
# RANDOMLY INITIALISED CLIP. The pipeline is the real one; the accuracies are near chance and  #
# say nothing about RAda. Put ViT-B-16.pt in ~/.cache/clip (or \$CLIP_CACHE_DIR) to use CLIP. #
################################################################################################
BANNER
fi

OPTIONS=(MODEL.BACKBONE.NAME "$BACKBONE" OPTIM.MAX_EPOCH "$EPOCHS" DATALOADER.NUM_WORKERS 2 TRAIN.PRINT_FREQ 10)
for SEED in $SEEDS; do
    bash scripts/rada/base2new_train.sh synthetic_shapes "$SEED" "${OPTIONS[@]}"
    bash scripts/rada/base2new_test.sh synthetic_shapes "$SEED" "${OPTIONS[@]}"
done
python scripts/parse_results.py "$OUTPUT" --protocol base2new --seeds $SEEDS
