#!/usr/bin/env bash
# The offline demo: base-to-new with RAdaCoOp on a synthetic dataset the repo generates, then
# the results table and the figures (output/demo/figures). Runs in your Python environment when it has
# what is needed, else sets up .venv (and Dassl) on first use; a few minutes on a 2-core CPU.
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

if python -c "import os, sys; from trainers.model.backbones.openai_loader import cached_weights_path; sys.exit(not os.path.isfile(cached_weights_path('ViT-B/16')))"; then
    BACKBONE="ViT-B/16"
    SEEDS="${SEEDS:-1}"
    EPOCHS="${EPOCHS:-3}"
    echo "[demo] using the cached real CLIP ViT-B/16 weights"
else
    BACKBONE="$OUTPUT/tiny-clip.pt"
    SEEDS="${SEEDS:-1 2 3}"
    EPOCHS="${EPOCHS:-10}"
    mkdir -p "$OUTPUT"
    python -m trainers.model.tiny_clip "$BACKBONE"
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
FIGURES="$OUTPUT/figures"
python scripts/parse_results.py "$OUTPUT" --protocol base2new --seeds $SEEDS --plot "$FIGURES/results.png"

# The pictures of the first seed's head (trained on the base classes) on the new classes, and its training curves.
SEED="${SEEDS%% *}"
RUN="$(ls -d "$OUTPUT/base2new/train_base/synthetic_shapes/shots_16/$TRAINER"/*/"seed$SEED" | head -n 1)"
CFG_NAME="$(basename "$(dirname "$RUN")")"
python scripts/visualize.py --out "$FIGURES" --root "$DATA" --trainer "$TRAINER" \
    --dataset-config-file configs/datasets/synthetic_shapes.yaml --config-file "configs/trainers/$TRAINER/$CFG_NAME.yaml" \
    --model-dir "$RUN" --images 2 "${OPTIONS[@]}" DATASET.NUM_SHOTS 16 DATASET.SUBSAMPLE_CLASSES new
python scripts/visualize.py --curves "$RUN" --out "$FIGURES"
echo "[demo] figures in $FIGURES"
