"""Train the bundled nodule outline network (``Resources/Models/nodule-outline.*``) from
``../shared/data``: a small 3D U-Net (``unet3d``, width 8, depth 3) at 1 mm on real LIDC-IDRI
nodules with the readers' masks, placed into the real lungs of ``benchmarks/real_backgrounds.csv``
(each with its own surroundings, and alone in the parenchyma, touching a vessel and on the pleura),
plus real background patches; patients split 70/15/15 as the bundled ``default`` model's nodules
(``patient_split``, seed 0), background regions by their split. The test patients are left for
``benchmarks/outline_quality.py``.

    nice -n 10 .venv/bin/python benchmarks/train_outline_model.py --out outline-run --threads 1
    cp outline-run/best.safetensors Resources/Models/nodule-outline.safetensors
    cp outline-run/best.json Resources/Models/nodule-outline.json

One thread (--threads 1) as the bundled model was trained: another thread count changes the
floating-point sums. About 80 minutes on one core of a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SPACING = [1.0, 1.0, 1.0]
PATCH = 40  # patches cut around each nodule; training crops of CROP^3 are taken at random inside
CROP = 32
INFERENCE_PATCH = 48  # the card's patch: the block around a seed the outline looks at (48 mm)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from LungGradCAMLib.engine.models import ModelCard
    from LungGradCAMLib.training.data import PatchSet
    from LungGradCAMLib.training.lidc import lidc_voi_records
    from LungGradCAMLib.training.outline import fit_outline, outline_patches, split_records
    from LungGradCAMLib.training.placement import load_backgrounds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vois", default=str(REPO.parent / "shared" / "data" / "lidc_vois"))
    p.add_argument("--backgrounds", default=str(REPO / "benchmarks" / "real_backgrounds.csv"))
    p.add_argument("--out", required=True, help="output folder: best.safetensors + best.json, log.jsonl, patches")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    records = split_records(lidc_voi_records(args.vois), seed=0)
    sets = {}
    for split in ("train", "validation"):
        cache = out / f"patches-{split}.npz"
        if cache.is_file():
            sets[split] = PatchSet.load(cache)
            continue
        backgrounds = load_backgrounds(args.backgrounds, SPACING, [PATCH] * 3, splits=(split,))
        sets[split] = outline_patches(records[split], backgrounds, [PATCH] * 3, SPACING, split, seed=args.seed)
        sets[split].save(cache)
        del backgrounds
        print(
            f"{split}: {len(sets[split])} patches ({sets[split].counts()}) after {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    train, val = sets["train"], sets["validation"]
    command = (
        "nice -n 10 .venv/bin/python benchmarks/train_outline_model.py --out OUT "
        f"--epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr} --width {args.width} "
        f"--seed {args.seed} --threads {args.threads}"
    )
    card = ModelCard(
        architecture="unet3d",
        kwargs={"width": args.width, "depth": 3, "num_classes": 1},
        class_names=["nodule"],
        cam_class="nodule",
        target_layer="bottleneck",
        patch_size=[INFERENCE_PATCH] * 3,
        spacing_mm=SPACING,
        hu_window=[-1000.0, 400.0],
        normalisation="minmax",
        activation="sigmoid",
        output="mask",
        name="nodule-outline",
        version="1.0.0",
        input="roi",
        description=(
            "3D U-Net (width 8, depth 3) that marks the voxels of lung nodules at 1 mm; the outline "
            "is its component at a seed point (the heat map's peak). Trained on real LIDC-IDRI nodules "
            "with the readers' masks, placed into real lungs."
        ),
        intended_use=(
            "Research and demonstration only: an automatic nodule outline for measurement research "
            "(volume, diameters). Not for clinical use."
        ),
        training={
            "data": (
                f"real LIDC-IDRI nodules (VOIs with the readers' max-voting masks) from {Path(args.vois).name}, "
                "placed into the lungs of the real CTs of benchmarks/real_backgrounds.csv (2 placements with "
                "their own surroundings, 3 alone: parenchyma, juxta-vascular, juxta-pleural) and real "
                "background patches (lung, vessel, pleura, chest wall); 40^3 patches at 1 mm, random 32^3 "
                "crops, 3D augmentation (rotation, flips, zoom 0.8-1.25, shear, intensity)"
            ),
            "patches": {"train": len(train), "validation": len(val)},
            "split": {
                "by": "patient (patient_split, seed 0, 70/15/15: the default model's)",
                **{f"{s}_patients": sorted({r.patient for r in records[s]}) for s in records},
            },
            "command": command,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "loss": "soft Dice + binary cross-entropy",
            "seed": args.seed,
            "threads": args.threads,
        },
    )

    def report(entry: dict) -> None:
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()), flush=True)

    best = fit_outline(
        train,
        val,
        card,
        out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        crop=CROP,
        seed=args.seed,
        report=report,
    )
    print(f"best: {best} after {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
