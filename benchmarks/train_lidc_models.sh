#!/usr/bin/env bash
# Reproduces the two bundled real-data models from ../shared/data (see its README) on one CPU thread
# (--threads 1, as they were trained: another thread count changes the floating-point sums):
#
#   default          whole-scan nodule vs background (gradcam3d_cnn width 8 with two pools before its CAM
#                    layer, 24^3 patches at 1.5 mm): real LIDC-IDRI nodules (lidc_vois) placed into the lungs
#                    of real chest CTs (benchmarks/real_backgrounds.csv), real background patches, plus
#                    phantoms 0-79; patients and background regions split 70/15/15 (train/validation/test).
#                    3.0.0 is 2.0.0 (step 1, the issue-14 model) fine-tuned in two rounds of hard-negative
#                    mining (steps 2 and 3): each round explains the background regions and the phantoms
#                    with the models before it, adds their false hot spots as negatives, and continues from
#                    the last model, with contrast-enhanced vessels (+0-600 HU) as augmentation.
#   lidc-malignancy  region model, benign vs malignant (the table's Diagnosis) on a 40 mm region
#                    around one nodule (gradcam3d_cnn width 8, 32^3 patches at 1.25 mm); patient-wise
#                    5-fold cross-validation for the reported metrics, then the bundled model on a
#                    70/15/15 patient split.
#
# Usage: benchmarks/train_lidc_models.sh [OUT_DIR]   then copy OUT_DIR/default/best.* to
# Resources/Models/default.* and OUT_DIR/malignancy/best.* to Resources/Models/lidc-malignancy.*
# (the bundled cards add their description, intended use and the benchmarks' metrics), and score the
# default model with `python benchmarks/real_nodules.py --model OUT_DIR/default/best.safetensors`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-lidc-model-runs}"
VOIS=../shared/data/lidc_vois
BG=benchmarks/real_backgrounds.csv
LGC=.venv/bin/lunggradcam

# 1. the starting point: the whole-scan model 2.0.0 of issue 14, then its operating point on the held-out split
DATA=(--source lidc-vois --path "$VOIS" --task nodule --backgrounds "$BG" --placements 3 --negatives-per-region 400
      --with-phantoms 0-79 --positives-per-nodule 6 --negatives-per-kind 8
      --patch-size 24 24 24 --spacing 1.5 1.5 1.5 --hu-window -1000 400 --normalisation minmax
      --batch-size 32 --seed 0 --threads 1 --no-progress)
$LGC train --name default --version 2.0.0 "${DATA[@]}" \
  --arch gradcam3d_cnn --arch-kwargs '{"width": 8, "dropout": 0.3}' --epochs 40 --patience 6 --lr 0.001 \
  --cache "$OUT/default-2.0.0/patches.npz" --out "$OUT/default-2.0.0"
.venv/bin/python benchmarks/nodule_operating_point.py --model "$OUT/default-2.0.0/best.safetensors" \
  --cache "$OUT/default-2.0.0/patches.npz" --out "$OUT/default-2.0.0/operating_point.json" --card "$OUT/default-2.0.0/best.json"

# 2. and 3. two rounds of hard-negative mining, each fine-tuning the model before it (3.0.0, the bundled default)
TUNE=(--arch gradcam3d_cnn --arch-kwargs '{"width": 8, "dropout": 0.3, "cam_pools": 2}' --contrast-hu 600
      --hard-negatives-per-region 400 --patience 4 --lr 0.0003 --cam-method layercam)
V2="$OUT/default-2.0.0/best.safetensors"
$LGC train --name default --version 3.0.0 "${DATA[@]}" "${TUNE[@]}" --hard-negatives "$V2" --init "$V2" --epochs 12 \
  --target-layer features.act2+features.act4+features.act6 --cache "$OUT/round1/patches.npz" --out "$OUT/round1"
$LGC train --name default --version 3.0.0 "${DATA[@]}" "${TUNE[@]}" --hard-negatives "$V2,$OUT/round1/best.safetensors" \
  --hard-negatives-per-phantom 10 --init "$OUT/round1/best.safetensors" --epochs 10 \
  --target-layer features.act2+features.act4 --cache "$OUT/default/patches.npz" --out "$OUT/default"

# 2. the malignancy region model: 5-fold cross-validation, then the bundled split
MAL=(--source lidc-vois --path "$VOIS" --task malignancy --backgrounds "$BG" --placements 4
     --arch gradcam3d_cnn --arch-kwargs '{"width": 8, "dropout": 0.3}'
     --patch-size 32 32 32 --spacing 1.25 1.25 1.25 --hu-window -1000 400 --normalisation minmax
     --epochs 40 --patience 6 --batch-size 32 --lr 0.001 --seed 0 --threads 1 --no-progress)
$LGC train --name lidc-malignancy --version 1.0.0 "${MAL[@]}" --folds 5 \
  --cache "$OUT/malignancy/patches.npz" --out "$OUT/malignancy-cv"
$LGC train --name lidc-malignancy --version 1.0.0 "${MAL[@]}" \
  --cache "$OUT/malignancy/patches.npz" --out "$OUT/malignancy"
