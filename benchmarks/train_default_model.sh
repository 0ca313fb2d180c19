#!/usr/bin/env bash
# Reproduces the bundled default model (Resources/Models/default.safetensors + default.json):
# a compact gradcam3d_cnn (width 8: 8-16-32-32-64-128 filters) classifying 24^3-voxel patches at
# 1.5 mm as nodule vs background, trained on 80 synthetic chest CT phantoms (seeds 0-79,
# patient-wise 70/15/15 train/validation/test split) on 2 CPU threads.
# Usage: benchmarks/train_default_model.sh [OUT_DIR]   (then copy OUT_DIR/best.* to Resources/Models/default.*;
# the card of the shipped model also records the held-out check below under metrics.heldout_phantoms_1000_1023)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-default-model-run}"
.venv/bin/lunggradcam train --name default --version 1.1.0 \
  --source phantom --phantom-seeds 0-79 --task nodule --positives-per-nodule 6 --negatives-per-kind 16 \
  --arch gradcam3d_cnn --arch-kwargs '{"width": 8, "dropout": 0.3}' \
  --patch-size 24 24 24 --spacing 1.5 1.5 1.5 --hu-window -1000 400 --normalisation minmax \
  --epochs 40 --patience 6 --batch-size 32 --lr 0.001 --seed 0 --threads 2 \
  --cache "$OUT/patches.npz" --out "$OUT" --no-progress
# Independent held-out check on 24 phantoms never used in training (seeds 1000-1023):
.venv/bin/lunggradcam evaluate --model "$OUT/best.safetensors" --source phantom --phantom-seeds 1000-1023 \
  --cache "$OUT/heldout_1000_1023.npz" --out "$OUT/heldout_1000_1023" --device cpu
