"""Sensitivity and specificity of a whole-scan nodule model on real CT at an operating threshold
fixed on the validation split.

The data is the model's own training data source rebuilt exactly (``lunggradcam train --source
lidc-vois --task nodule``: real LIDC nodules of each split's patients placed into that split's
background regions, plus that split's real background patches and phantoms), so the test split
holds only patients and background regions the model never saw. The threshold is fixed on the
validation split: the lowest one whose specificity on its real background patches is at least
``--specificity`` (default 0.95), or with ``--sensitivity S`` the highest one whose sensitivity on
its real nodules of ``--min-diameter`` mm and more is at least S; on the test split the script reports the sensitivity
for real nodules of at least ``--min-diameter`` mm (and for all), the specificity on real
background patches (per kind), and the same on phantom patches, with patient-bootstrap 95% CIs.
Prints JSON; ``--out`` also writes it (and ``--card`` copies the result into a model card).

    .venv/bin/python benchmarks/nodule_operating_point.py --model Resources/Models/default.safetensors \\
        --cache /tmp/default-run/patches.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _rate(hit: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """Share of True in ``hit`` with a 95% CI from resampling ``groups`` (patients)."""
    hit = np.asarray(hit, bool)
    if hit.size == 0:
        return {"value": None, "n": 0}
    keys, inverse = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(inverse, hit), np.bincount(inverse)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    boot = sums[draws].sum(1) / np.maximum(counts[draws].sum(1), 1)
    return {
        "value": float(hit.mean()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "n": int(hit.size),
        "patients": int(len(keys)),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from LungGradCAMLib.core.atomic import write_text
    from LungGradCAMLib.engine.models import load_model, save_model
    from LungGradCAMLib.evaluation.evaluate import predict
    from LungGradCAMLib.training.data import PatchSet, patient_split
    from LungGradCAMLib.training.lidc import lidc_voi_detection_patches, lidc_voi_records
    from LungGradCAMLib.training.placement import PLACEMENT_KINDS, SPLITS, load_backgrounds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--vois", default=str(REPO.parent / "shared" / "data" / "lidc_vois"))
    p.add_argument("--backgrounds", default=str(REPO / "benchmarks" / "real_backgrounds.csv"))
    p.add_argument("--cache", help="the training run's patch cache (.npz); rebuilt when absent")
    p.add_argument("--seed", type=int, default=0, help="the training run's --seed (default 0)")
    p.add_argument("--fractions", type=float, nargs=3, default=[0.7, 0.15, 0.15])
    p.add_argument("--placements", type=int, default=3, help="the training run's --placements (default 3)")
    p.add_argument("--min-diameter", type=float, default=4.0, help="nodule size the aim is about (mm, default 4)")
    p.add_argument(
        "--specificity",
        type=float,
        default=0.95,
        help="validation specificity (real backgrounds) the threshold keeps (default 0.95)",
    )
    p.add_argument(
        "--sensitivity", type=float, help="instead: validation sensitivity to keep (nodules >= --min-diameter)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--card", help="write the result into this model card (.json beside the weights)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu")
    card = loaded.card
    records = lidc_voi_records(args.vois)
    if args.cache and Path(args.cache).is_file():
        data = PatchSet.load(args.cache)
    else:
        backgrounds = load_backgrounds(args.backgrounds, card.spacing_mm, card.patch_size, SPLITS)
        data = lidc_voi_detection_patches(
            records,
            backgrounds,
            card.patch_size,
            card.spacing_mm,
            fractions=args.fractions,
            placements=args.placements,
            seed=args.seed,
        )
    # the nodule patches of each split are its records (patient_split order) times the placements
    parts = dict(zip(SPLITS, patient_split([r.patient for r in records], args.fractions, seed=args.seed)))
    score = predict(loaded, data)[:, card.cam_class_index]
    result: Dict[str, Any] = {"model": {"name": card.name, "version": card.version, "sha256": card.sha256}}
    per_split = {}
    for split in ("validation", "test"):
        index = data.split_index(split)
        kinds, labels, patients = data.kinds[index], data.labels[index], data.patients[index]
        real_nodule = (labels == 1) & np.isin(kinds, PLACEMENT_KINDS)
        diameters = np.repeat([records[i].diameter_mm for i in parts[split]], args.placements)
        if real_nodule.sum() != len(diameters):
            print(
                f"the cache does not match --fractions/--seed/--placements ({real_nodule.sum()} real nodule patches "
                f"in {split}, expected {len(diameters)})",
                file=sys.stderr,
            )
            return 2
        per_split[split] = dict(
            s=score[index],
            kinds=kinds,
            labels=labels,
            patients=patients,
            real_nodule=real_nodule,
            diameters=diameters,
            real_background=(labels == 0) & np.char.startswith(patients.astype(str), "background:"),
            phantom=np.char.startswith(patients.astype(str), "phantom-"),
        )
    v = per_split["validation"]
    if args.sensitivity is not None:  # the highest threshold that keeps the sensitivity on validation
        nodule_scores = np.sort(v["s"][v["real_nodule"]][v["diameters"] >= args.min_diameter])
        threshold = float(nodule_scores[int(np.floor((1 - args.sensitivity) * len(nodule_scores)))])
        rule = f"validation: sensitivity >= {args.sensitivity} for real nodules >= {args.min_diameter} mm"
    else:  # the lowest threshold that keeps the specificity on validation's real backgrounds
        background = np.sort(v["s"][v["real_background"]])
        threshold = float(np.nextafter(background[int(np.ceil(args.specificity * len(background))) - 1], 1.0))
        rule = f"validation: specificity >= {args.specificity} on real background patches"
    result["threshold"] = {"value": threshold, "fixed_on": rule}
    for split, d in per_split.items():
        s, hit = d["s"], d["s"] >= threshold
        nodules = d["real_nodule"]
        big = np.zeros(len(s), bool)
        big[np.flatnonzero(nodules)[d["diameters"] >= args.min_diameter]] = True
        block = {
            f"sensitivity_real_nodules_ge_{args.min_diameter:g}mm": _rate(hit[big], d["patients"][big]),
            "sensitivity_real_nodules_all": _rate(hit[nodules], d["patients"][nodules]),
            "specificity_real_background": _rate(~hit[d["real_background"]], d["patients"][d["real_background"]]),
            "specificity_real_background_by_kind": {
                k: _rate(
                    ~hit[d["real_background"] & (d["kinds"] == k)],
                    d["patients"][d["real_background"] & (d["kinds"] == k)],
                )
                for k in sorted(set(d["kinds"][d["real_background"]]))
            },
            "sensitivity_real_by_placement": {
                k: _rate(hit[nodules & (d["kinds"] == k)], d["patients"][nodules & (d["kinds"] == k)])
                for k in PLACEMENT_KINDS
            },
        }
        ph = d["phantom"]
        if ph.any():
            block["sensitivity_phantom_nodules"] = _rate(
                hit[ph & (d["labels"] == 1)], d["patients"][ph & (d["labels"] == 1)]
            )
            block["specificity_phantom_background"] = _rate(
                ~hit[ph & (d["labels"] == 0)], d["patients"][ph & (d["labels"] == 0)]
            )
        result[split] = block
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    if args.card:
        card.metrics["operating_point"] = result
        save_model(loaded.module, card, Path(args.card).with_suffix(".safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
