#!/usr/bin/env bash
# Reproduces the two bundled real-data models from ../shared/data (see its README) on one CPU thread
# (--threads 1, as they were trained: another thread count changes the floating-point sums):
#
#   default          whole-scan nodule vs background (gradcam3d_cnn width 8, 24^3 patches at 1.5 mm):
#                    real LIDC-IDRI nodules (lidc_vois) placed into the lungs of real chest CTs
#                    (benchmarks/real_backgrounds.csv), real background patches, plus phantoms 0-79;
#                    patients and background regions split 70/15/15 (train/validation/test).
#   lidc-malignancy  region model, benign vs malignant (the table's Diagnosis) on a 48 mm region
#                    around one nodule (48^3 patches at 1 mm): see step 2.
#
# Usage: benchmarks/train_lidc_models.sh [OUT_DIR] [default|malignancy]   (both steps without the
# second argument) then copy OUT_DIR/default/best.* to Resources/Models/default.* and
# OUT_DIR/malignancy/region.* to Resources/Models/lidc-malignancy.*
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-lidc-model-runs}"
VOIS=../shared/data/lidc_vois
BG=benchmarks/real_backgrounds.csv
LGC=.venv/bin/lunggradcam

STEP="${2:-all}"
# 1. the whole-scan default model, then its operating point on the held-out split
if [ "$STEP" = all ] || [ "$STEP" = default ]; then
$LGC train --name default --version 2.0.0 \
  --source lidc-vois --path "$VOIS" --task nodule --backgrounds "$BG" --placements 3 --negatives-per-region 400 \
  --with-phantoms 0-79 --positives-per-nodule 6 --negatives-per-kind 8 \
  --arch gradcam3d_cnn --arch-kwargs '{"width": 8, "dropout": 0.3}' \
  --patch-size 24 24 24 --spacing 1.5 1.5 1.5 --hu-window -1000 400 --normalisation minmax \
  --epochs 40 --patience 6 --batch-size 32 --lr 0.001 --seed 0 --threads 1 \
  --cache "$OUT/default-patches.npz" --out "$OUT/default" --no-progress   # (train refuses a cache inside --out)
.venv/bin/python benchmarks/nodule_operating_point.py --model "$OUT/default/best.safetensors" \
  --cache "$OUT/default-patches.npz" --out "$OUT/default/operating_point.json" --card "$OUT/default/best.json"
fi

# 2. the malignancy region model (lidc-malignancy 2.0.0): an ensemble (region_net) of 5 cross-validation
#    folds x 2 scales (the nodule: the central 24 mm at 1 mm; its surroundings: 48 mm at 2 mm) of an
#    attention gradcam3d_cnn (cam_pools 2, its attention trained on the readers' outlines), 4 test-time
#    flips, the members' logits averaged. 15% of the patients are held out for the test first. (With
#    "features": ["radial_extent", "density_profile"] the image features are fused by a logistic
#    regression fitted out of fold: they lowered the cross-validated AUC, 0.879 against 0.890, so the
#    bundle has none; see README.) Two processes may run this same command at once (one per
#    core): they share the members (OUT/malignancy/viewV/foldK) and one bundles them into
#    OUT/malignancy/region.safetensors + .json.
[ "$STEP" = all ] || [ "$STEP" = malignancy ] || exit 0
REGION_KWARGS='{"member": {"width": 8, "dropout": 0.3, "cam_pools": 2, "head": "attention", "evidence_channels": 16}, "views": [[24, 1], [48, 2]], "flips": 4, "features": []}'
$LGC train --name lidc-malignancy --version 2.0.0 \
  --source lidc-vois --path "$VOIS" --task malignancy --backgrounds "$BG" --placements 2 \
  --arch region_net --arch-kwargs "$REGION_KWARGS" --mask-loss 1 \
  --patch-size 48 48 48 --spacing 1 1 1 --hu-window -1000 400 --normalisation minmax \
  --epochs 24 --patience 5 --batch-size 32 --lr 0.001 --seed 0 --threads 1 --no-progress \
  --folds 5 --cache "$OUT/malignancy/patches.npz" --out "$OUT/malignancy"
# (with two processes, the first here does the rest)
exec 9>"$OUT/malignancy/.after-training.lock"
flock -n 9 || exit 0
# its heat maps on the real nodules of the test patients, through lgc.explain with an ROI, into its card
.venv/bin/python benchmarks/cam_quality.py --source lidc-vois --model "$OUT/malignancy/region.safetensors" \
  --explain --threads 1 --out "$OUT/malignancy/heat_map.json" --card "$OUT/malignancy/region.json"
# the heat-map retraining test on the real nodules: one member (the nodule's scale) of its architecture,
# trained four times on the card's data (the readers' outlines as truth), patients split 70/30
$LGC evaluate --cam-retrain --model "$OUT/malignancy/region.safetensors" --cache "$OUT/malignancy/patches.npz" \
  --retrain-arch-kwargs '{"members": 1, "views": [[24, 1]], "flips": 1, "features": []}' \
  --retrain-epochs 24 --retrain-patience 5 --threads 1 --out "$OUT/malignancy/cam-retrain"
