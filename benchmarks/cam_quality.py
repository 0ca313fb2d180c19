"""Is the bundled model's heat map right? Whole-scan Grad-CAM quality on held-out phantoms and on
the real LIDC-IDRI slabs, against the nodule truth.

For each held-out phantom chest CT (seeds the model card's training never used) the pipeline
explains the whole scan (``explain(..., mode="sliding")``: the sliding window over the lungs'
bounding box, the product's path) and the CAM is scored against the phantom's nodule labelmap;
for each LIDC slab (``../shared/data/lidc``) against each nodule's reader consensus (voxels
outlined by >= 50% of the readings that cover it, on the slices present: ``lidc.lidc_nodules``).

Metrics (``LungGradCAMLib.evaluation.metrics``), all within the region R = lungs (the pipeline's lung mask)
plus the nodule(s), minus any OTHER nodule (for per-nodule rows), as the product segments within
the lungs:

* ``pointing``: the CAM's maximum over R lies in the truth (``pointing_game``), ``peak_mm`` its
  distance to the nearest truth voxel, ``pointing_tol``: within ``--tolerance-mm`` of it (10 mm by
  default, about a nodule's diameter); ``pointing_raw``: the exact game for the CAM's maximum
  anywhere in the scan;
* ``mean_dice``: Guan & Loew's mean-Dice over the 256 thresholds of the 8-bit CAM (in R),
  ``best_dice``: the best single threshold;
* ``energy``: the share of the CAM's mass in R that lies in the truth (``energy_pointing_game``);
  ``energy_uniform``: what a uniform CAM would score (the truth's share of R's voxels);
* ``p``: the model's scan-level probability of its CAM class; ``p_at_nodule``: the highest blended
  patch probability over the nodule; ``found``: share of the scan's nodules whose CAM peak is >= 0.5.

A third table scores the model's CAM on single patches (the model's own input: phantom patches of
the same held-out seeds, centred on nodules up to a quarter patch off, truth from
``cam_retrain.phantom_patch_masks``), which separates the CAM's own localisation from the
whole-scan blending. ``--method``/``--layer`` try another CAM method or layer than the card's.

``--source lidc-vois`` scores real nodules instead: the LIDC VOIs of the patients the model never
saw (its card's test split), each put into a real lung (the test regions of ``--backgrounds``) as
the model's input patch, against the readers' masks, for each of ``--methods`` and ``--layers``
(see :func:`voi_rows`).

Targets (issues 7 and 14): pointing >= 0.90 and mean-Dice >= 0.45. Prints a JSON object and a
markdown table; ``--out`` also writes the JSON.

    .venv/bin/python benchmarks/cam_quality.py --seeds 1000-1019 --n 5 --device cpu --threads 2
    .venv/bin/python benchmarks/cam_quality.py --source lidc-vois --model lidc-malignancy \
        --methods gradcam,layercam --layers 'features.act6;features.act4+features.act6' --threads 2
    .venv/bin/python benchmarks/cam_quality.py --source lidc-vois --model lidc-malignancy --explain --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: The field of view of the phantoms the default model was trained on: (i, j, k) mm.
CHEST_FOV_MM = (345.6, 345.6, 240.0)
TARGETS = {"pointing": 0.90, "mean_dice": 0.45}
METRIC_KEYS = (
    "pointing",
    "pointing_tol",
    "pointing_raw",
    "peak_mm",
    "mean_dice",
    "best_dice",
    "energy",
    "energy_uniform",
    "p",
    "p_at_nodule",
)
#: pointing_tol's tolerance (mm); set by --tolerance-mm
TOLERANCE_MM = [10.0]


def training_seeds(card: Any) -> Set[int]:
    """Phantom seeds the card's training data came from (its split's patients ``phantom-<seed>``
    and the ``--phantom-seeds`` of its training command)."""
    from LungGradCAMLib.training.sources import parse_seeds

    training = card.training or {}
    seeds: Set[int] = set()
    for patients in (training.get("split") or {}).values():
        seeds.update(int(m.group(1)) for p in patients for m in [re.match(r"phantom-(\d+)$", str(p))] if m)
    match = re.search(r"--phantom-seeds[ =](\S+)", str(training.get("command", "")))
    if match:
        seeds.update(parse_seeds(match.group(1)))
    return seeds


def heatmap_metrics(cam: Any, truth: np.ndarray, region: np.ndarray) -> Dict[str, Any]:
    """The metrics of one CAM (a Volume, K, J, I in [0, 1]) against one bool ``truth`` mask, within
    the bool ``region`` (see the module doc)."""
    from LungGradCAMLib.evaluation import metrics

    inside = cam.with_array(np.where(region, cam.array, 0.0).astype(np.float32))
    peak_mm = metrics.peak_distance_mm(inside, truth)
    return {
        "pointing": peak_mm == 0.0,
        "pointing_tol": peak_mm <= TOLERANCE_MM[0],
        "pointing_raw": metrics.pointing_game(cam, truth),
        "peak_mm": peak_mm,
        "mean_dice": metrics.mean_dice(cam, truth, within=region),
        "best_dice": metrics.best_dice(cam, truth, within=region).dice,
        "energy": metrics.energy_pointing_game(cam, truth, within=region),
        "energy_uniform": float(truth[region].mean()),
    }


def phantom_rows(
    loaded: Any, seeds: Sequence[int], shape: Sequence[int], device: str, method: str, layer: Optional[str] = None
) -> List[Dict[str, Any]]:
    """One row per phantom: the whole-scan CAM against all its nodules."""
    from LungGradCAMLib import phantom
    from LungGradCAMLib.pipeline import explain

    spacing = [f / s for f, s in zip(CHEST_FOV_MM, tuple(shape)[::-1])]
    rows = []
    for seed in seeds:
        ph = phantom.chest_ct(seed=seed, shape=shape, spacing_mm=spacing)
        truth = ph.nodule_labelmap > 0
        t0 = time.perf_counter()
        exp = explain(ph.volume, model=loaded, method=method, mode="sliding", device=device, layer=layer)
        seconds = time.perf_counter() - t0
        region = exp.lung_mask | truth
        labels = [int(v) for v in np.unique(ph.nodule_labelmap) if v]
        found = [float(exp.cam.array[ph.nodule_labelmap == v].max()) >= 0.5 for v in labels]
        rows.append(
            {
                "case": f"phantom-{seed}",
                "nodules": len(labels),
                "diameters_mm": [round(n.diameter_mm, 1) for n in ph.nodules],
                **heatmap_metrics(exp.cam, truth, region),
                "p": exp.probabilities[exp.target_class],
                "p_at_nodule": float(exp.score_map.array[truth].max()),
                "found": float(np.mean(found)) if found else math.nan,
                "seconds": seconds,
            }
        )
    return rows


def lidc_rows(loaded: Any, root: Path, device: str, method: str, layer: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per LIDC nodule (reader consensus >= 50% on the slices present)."""
    from LungGradCAMLib.io.dicom import load_dicom_series
    from LungGradCAMLib.pipeline import explain
    from LungGradCAMLib.training.lidc import lidc_nodules, parse_lidc_xml

    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for xml in sorted(folder.rglob("*.xml")):
            series_uid, _ = parse_lidc_xml(xml)
            volume = load_dicom_series(folder, series_uid=series_uid or None)
            nodules = lidc_nodules(xml, volume, consensus=0.5)
            if not nodules:
                continue
            t0 = time.perf_counter()
            exp = explain(volume, model=loaded, method=method, mode="sliding", device=device, layer=layer)
            seconds = time.perf_counter() - t0
            voxel_ml = float(np.prod(volume.spacing)) / 1000.0
            for n, nodule in enumerate(nodules):
                others = np.zeros(volume.shape, bool)
                for m, other in enumerate(nodules):
                    if m != n:
                        others |= other.mask
                region = (exp.lung_mask | nodule.mask) & ~others
                slices = np.flatnonzero(nodule.mask.any(axis=(1, 2)))
                rows.append(
                    {
                        "case": f"{folder.name} nodule {n + 1}",
                        "readers": len(nodule.readers),
                        "malignancy": nodule.malignancy,
                        "volume_ml": round(nodule.mask.sum() * voxel_ml, 3),
                        "slices": f"{len(slices)} of {volume.shape[0]}",
                        "scan_shape_kji": list(volume.shape),
                        "spacing_ijk_mm": [round(float(s), 3) for s in volume.spacing],
                        **heatmap_metrics(exp.cam, nodule.mask, region),
                        "p": exp.probabilities[exp.target_class],
                        "p_at_nodule": float(exp.score_map.array[nodule.mask].max()),
                        "found": float(exp.cam.array[nodule.mask].max() >= 0.5),
                        "seconds": seconds,
                    }
                )
    return rows


def patch_rows(loaded: Any, seeds: Sequence[int], method: str, layer: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per nodule patch (2 per nodule): the model's CAM of the patch against its nodule voxels."""
    from LungGradCAMLib.evaluation import metrics
    from LungGradCAMLib.training.cam_retrain import model_inputs, patch_cams, phantom_patch_masks
    from LungGradCAMLib.training.data import phantom_patches

    card = loaded.card
    patches = phantom_patches(seeds, card.patch_size, card.spacing_mm, positives_per_nodule=2, negatives_per_kind=0)
    masks = phantom_patch_masks(patches)
    cams = patch_cams(loaded, model_inputs(patches.patches, card), method, layer=layer)
    rows = []
    for n, (cam, truth) in enumerate(zip(cams, masks)):
        peak_mm = metrics.peak_distance_mm(cam, truth, spacing=card.spacing_mm)
        rows.append(
            {
                "case": f"{patches.patients[n]} patch {n}",
                "pointing": peak_mm == 0.0,
                "pointing_tol": peak_mm <= TOLERANCE_MM[0],
                "peak_mm": peak_mm,
                "mean_dice": metrics.mean_dice(cam, truth),
                "best_dice": metrics.best_dice(cam, truth).dice,
                "energy": metrics.energy_pointing_game(cam, truth),
                "energy_uniform": float(truth.mean()),
            }
        )
    return rows


def held_out_patients(card: Any, patients: Sequence[str]) -> List[str]:
    """The patients of ``patients`` the model never trained or validated on: those of its card's
    test split, or all of them when its split names none of them (trained on other data)."""
    split = (card.training or {}).get("split") or {}
    named = set().union(*(set(v) for v in split.values())) if split else set()
    if not named & set(patients):
        return sorted(set(patients))
    return sorted(set(patients) & set(split.get("test_patients", [])))


def voi_rows(
    loaded: Any, root: Path, backgrounds: Optional[Path], methods: Sequence[str], layers: Sequence[str], seed: int = 0
) -> Dict[str, List[Dict[str, Any]]]:
    """Per (method @ layer), one row per real LIDC nodule of the held-out patients: the CAM of the
    model's own input patch (the nodule in a real lung: a region model's patch is the VOI with its
    own surroundings centred on the nodule, up to 2 voxels off; a whole-scan model's patches put the
    nodule alone into the parenchyma, next to a vessel and on the pleura, up to a quarter patch
    off) against the readers' mask."""
    from LungGradCAMLib.evaluation import metrics
    from LungGradCAMLib.training.cam_retrain import model_inputs, patch_cams
    from LungGradCAMLib.training.lidc import lidc_voi_patches, lidc_voi_records
    from LungGradCAMLib.training.placement import load_backgrounds

    card = loaded.card
    records = lidc_voi_records(root)
    keep = set(held_out_patients(card, [r.patient for r in records]))
    records = [r for r in records if r.patient in keep]
    regions = load_backgrounds(backgrounds, card.spacing_mm, card.patch_size, ("test",)) if backgrounds else None
    region_model = card.input == "roi"
    patches = lidc_voi_patches(
        records,
        card.patch_size,
        card.spacing_mm,
        task="malignancy" if region_model else "nodule",
        backgrounds=regions,
        placements=1 if region_model else 3,
        jitter_vox=2 if region_model else max(card.patch_size) // 4,
        seed=seed,
    )
    inputs = model_inputs(patches.patches, card)
    out: Dict[str, List[Dict[str, Any]]] = {}
    for method in methods:
        for layer in layers:
            cams = patch_cams(loaded, inputs, method, layer=layer)
            rows = []
            for n, (cam, truth) in enumerate(zip(cams, patches.masks)):
                peak_mm = metrics.peak_distance_mm(cam, truth, spacing=card.spacing_mm)
                rows.append(
                    {
                        "case": f"{patches.patients[n]} {patches.kinds[n]} {n}",
                        "pointing": peak_mm == 0.0,
                        "pointing_tol": peak_mm <= TOLERANCE_MM[0],
                        "peak_mm": peak_mm,
                        "mean_dice": metrics.mean_dice(cam, truth),
                        "best_dice": metrics.best_dice(cam, truth).dice,
                        "energy": metrics.energy_pointing_game(cam, truth),
                        "energy_uniform": float(truth.mean()),
                    }
                )
            out[f"{method} @ {layer}"] = rows
    return out


def voi_explain_rows(
    loaded: Any,
    root: Path,
    backgrounds: Optional[Path],
    margin_mm: float = 16.0,
    seed: int = 0,
    methods: Sequence[str] = (),
    layers: Sequence[str] = (),
) -> Dict[str, List[Dict[str, Any]]]:
    """A region model's heat maps on real nodules of its held-out patients, through the product's
    path: each nodule (with its own surroundings, in a test lung region, up to 2 voxels off
    centre) in a CT block ``margin_mm`` wider than the model's patch on every side, explained by
    ``lgc.explain`` with an ROI at the block's centre (the user's click on the nodule); the heat
    map on the block's grid against the readers' outline. One row list per method @ layer
    (default: the card's)."""
    from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
    from LungGradCAMLib.pipeline import explain
    from LungGradCAMLib.training.lidc import lidc_voi_patches, lidc_voi_records
    from LungGradCAMLib.training.placement import load_backgrounds

    card = loaded.card
    records = lidc_voi_records(root)
    keep = set(held_out_patients(card, [r.patient for r in records]))
    records = [r for r in records if r.patient in keep]
    block = [int(p + 2 * round(margin_mm / s)) for p, s in zip(card.patch_size, card.spacing_mm[::-1])]
    regions = load_backgrounds(backgrounds, card.spacing_mm, block, ("test",)) if backgrounds else None
    placed = lidc_voi_patches(
        records, block, card.spacing_mm, task="malignancy", backgrounds=regions, placements=1, jitter_vox=2, seed=seed
    )
    matrix = axis_aligned_matrix(tuple(card.spacing_mm), (0.0, 0.0, 0.0))
    centre = [(n // 2) * s for n, s in zip(block[::-1], card.spacing_mm)]  # RAS of the centre voxel (i, j, k)
    out: Dict[str, List[Dict[str, Any]]] = {}
    for method in methods or [card.cam_method]:
        for layer in layers or [card.target_layer]:
            rows = []
            for n, (patch, truth) in enumerate(zip(placed.patches, placed.masks)):
                ct = Volume(patch.astype(np.float32), matrix)
                # a block is too small for the lung mask (which the ROI path does not use): all of it
                exp = explain(
                    ct,
                    model=loaded,
                    method=method,
                    layer=layer,
                    roi=(tuple(centre), 1.0),
                    device="cpu",
                    lung_mask=np.ones(ct.shape, bool),
                )
                row = heatmap_metrics(exp.cam, truth, np.ones(truth.shape, bool))
                rows.append(
                    {
                        "case": f"{placed.patients[n]} nodule {n}",
                        "diameter_mm": float(placed.diameters[n]),
                        "label": int(placed.labels[n]),
                        "p": exp.probabilities[card.cam_class],
                        **row,
                    }
                )
            out[f"{method} @ {layer}"] = rows
    return out


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Mean of every numeric metric over the rows (booleans as hit rates)."""
    keys = [k for k in METRIC_KEYS + ("found", "seconds") if rows and k in rows[0]]
    return {k: float(np.nanmean([float(r[k]) for r in rows])) for k in keys}


def markdown(title: str, rows: Sequence[Dict[str, Any]], mean: Dict[str, float], per_row: bool = True) -> str:
    """A markdown table of the rows (or only their mean) in the columns both have."""
    cols = [
        c
        for c in (
            "pointing",
            "pointing_tol",
            "peak_mm",
            "mean_dice",
            "best_dice",
            "energy",
            "energy_uniform",
            "p",
            "p_at_nodule",
            "found",
        )
        if c in mean
    ]

    def fmt(v: Any) -> str:
        if isinstance(v, (bool, np.bool_)):
            return "hit" if v else "miss"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"**{title}**", "", "| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    if per_row:
        lines += ["| " + r["case"] + " | " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    lines.append(f"| **mean of {len(rows)}** | " + " | ".join(f"**{mean[c]:.3f}**" for c in cols) + " |")
    return "\n".join(lines)


def voi_main(args: argparse.Namespace, loaded: Any) -> int:
    """``--source lidc-vois``: one summary row per CAM method and layer (see :func:`voi_rows`)."""
    from LungGradCAMLib.core.atomic import write_text

    card = loaded.card
    layers = args.layers.split(";") if args.layers else [card.target_layer]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else [card.cam_method]
    backgrounds = Path(args.backgrounds) if args.backgrounds != "none" else None
    t0 = time.perf_counter()
    if args.explain:
        results = voi_explain_rows(loaded, Path(args.vois), backgrounds, methods=methods, layers=layers)
    else:
        results = voi_rows(loaded, Path(args.vois), backgrounds, methods, layers)
    summary = {name: summarise(rows) for name, rows in results.items()}
    n = len(next(iter(results.values())))
    report = {
        "model": {
            "name": card.name,
            "version": card.version,
            "sha256": card.sha256,
            "input": card.input,
            "patch_size": card.patch_size,
            "spacing_mm": card.spacing_mm,
        },
        "source": "lidc-vois",
        "path": "lgc.explain with an ROI" if args.explain else "the model's input patch",
        "patches": n,
        "seconds": round(time.perf_counter() - t0, 1),
        "targets": TARGETS,
        "mean": summary,
        "rows": results,
    }
    text = json.dumps(report, indent=1, default=float)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    if args.card:
        _record(loaded, Path(args.card), results, summary, report["path"])
    cols = ("pointing", "pointing_tol", "peak_mm", "mean_dice", "best_dice", "energy", "energy_uniform")
    print(f"\n**Real LIDC nodules of held-out patients, {card.name} ({n} patches)**\n")
    print("| method @ layer | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for name, mean in summary.items():
        print(f"| {name} | " + " | ".join(f"{mean[c]:.3f}" for c in cols) + " |")
    return 0


def _record(
    loaded: Any, card_path: Path, results: Dict[str, List[Dict[str, Any]]], summary: Dict[str, Any], path: str
) -> None:
    """Write the heat maps' quality on real nodules into the model card at ``card_path`` (beside the
    weights ``loaded`` came from): ``metrics.heat_map`` (the card's method and layer: what the demo
    states) and ``metrics.heat_map_real_nodules`` (every method and layer measured)."""
    from LungGradCAMLib.engine.models import save_model

    card = loaded.card
    name = f"{card.cam_method} @ {card.target_layer}"
    rows = results.get(name) or next(iter(results.values()))
    card.metrics["heat_map"] = {
        "data": f"{card.cam_method} at {card.target_layer} on the real LIDC nodules of the test-split patients, {path}",
        "scans": len(rows),
        "peak_in_lesion": int(sum(bool(r["pointing"]) for r in rows)),
        "peak_within_10mm": int(sum(bool(r["pointing_tol"]) for r in rows)),
        "mean_dice": round(float(np.mean([r["mean_dice"] for r in rows])), 4),
    }
    card.metrics["heat_map_real_nodules"] = {
        "data": f"{len(rows)} real LIDC nodules of the test-split patients with their own surroundings, {path} "
        "(benchmarks/cam_quality.py --source lidc-vois)",
        **{k: {m: round(float(v), 4) for m, v in mean.items() if m in METRIC_KEYS} for k, mean in summary.items()},
    }
    save_model(loaded.module, card, card_path.with_suffix(".safetensors"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from LungGradCAMLib.core.atomic import write_text
    from LungGradCAMLib.engine.models import load_model
    from LungGradCAMLib.training.sources import parse_seeds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model name or .safetensors path (default: default)")
    parser.add_argument("--seeds", default="1000-1019", help="held-out phantom seeds, e.g. '1000-1019' (default)")
    parser.add_argument("--n", type=int, default=5, help="phantoms to explain: the first N of --seeds (default 5)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[96, 192, 192],
        metavar=("K", "J", "I"),
        help="phantom size in voxels over a 345.6 x 345.6 x 240 mm chest (default 96 192 192)",
    )
    parser.add_argument(
        "--lidc",
        default=str(REPO.parent / "shared" / "data" / "lidc"),
        help="folder of LIDC-IDRI patient folders (DICOM + reader XML); 'none' to skip",
    )
    parser.add_argument("--method", default="gradcam", help="CAM method (default gradcam, the product's)")
    parser.add_argument("--layer", help="CAM layer (default: the model card's target_layer)")
    parser.add_argument("--tolerance-mm", type=float, default=10.0, help="pointing_tol's tolerance (default 10 mm)")
    parser.add_argument("--no-patches", action="store_true", help="skip the single-patch table")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument(
        "--card", help="--source lidc-vois: write the result into this model card (.json beside the weights of --model)"
    )
    parser.add_argument(
        "--source",
        choices=("phantom", "lidc-vois"),
        default="phantom",
        help="phantom: held-out phantoms + LIDC slabs, whole scan (default); lidc-vois: real "
        "LIDC nodules of the model's held-out patients, on its input patches",
    )
    parser.add_argument(
        "--vois",
        default=str(REPO.parent / "shared" / "data" / "lidc_vois"),
        help="LIDC VOI folder (nodules.csv, image/, nodule_mask/) for --source lidc-vois",
    )
    parser.add_argument(
        "--backgrounds",
        default=str(REPO / "benchmarks" / "real_backgrounds.csv"),
        help="backgrounds CSV whose test regions hold the nodules (--source lidc-vois)",
    )
    parser.add_argument("--methods", help="--source lidc-vois: comma-separated CAM methods (default: the card's)")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="--source lidc-vois, a region model: through lgc.explain with an ROI on each nodule, in a "
        "CT block 16 mm wider than the patch, the heat map on the block's grid (the product's path)",
    )
    parser.add_argument(
        "--layers",
        help="--source lidc-vois: ';'-separated CAM layers, '+' fuses several (default: the card's target_layer)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    TOLERANCE_MM[0] = args.tolerance_mm

    loaded = load_model(args.model, device=args.device)
    if args.source == "lidc-vois":
        return voi_main(args, loaded)
    seen = training_seeds(loaded.card)
    seeds = parse_seeds(args.seeds)[: args.n]
    overlap = sorted(set(seeds) & seen)
    if overlap:
        print(f"seeds {overlap} were used to train {args.model}; choose held-out seeds (e.g. 1000+)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    layer = args.layer or loaded.card.target_layer  # explain(layer=...): the card stays as it is
    phantoms = phantom_rows(loaded, seeds, args.shape, args.device, args.method, layer)
    lidc_root = Path(args.lidc)
    lidc = (
        lidc_rows(loaded, lidc_root, args.device, args.method, layer)
        if args.lidc != "none" and lidc_root.is_dir()
        else []
    )
    patches = [] if args.no_patches else patch_rows(loaded, seeds, args.method, layer)
    card = loaded.card
    report = {
        "model": {
            "name": args.model,
            "sha256": card.sha256,
            "architecture": card.architecture,
            "kwargs": card.kwargs,
            "patch_size": card.patch_size,
            "spacing_mm": card.spacing_mm,
            "training_seeds": f"{min(seen)}-{max(seen)}" if seen else "unknown",
        },
        "method": args.method,
        "layer": layer,
        "mode": "sliding",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "phantom_shape_kji": args.shape,
        "tolerance_mm": args.tolerance_mm,
        "targets": TARGETS,
        "seconds": round(time.perf_counter() - t0, 1),
        "phantoms": {"mean": summarise(phantoms), "scans": phantoms},
        "lidc": {"mean": summarise(lidc), "nodules": lidc, "root": str(lidc_root)},
        "patches": {"mean": summarise(patches), "n": len(patches)},
    }
    mean = report["phantoms"]["mean"]
    report["meets_targets"] = {k: bool(mean.get(k, 0.0) >= v) for k, v in TARGETS.items()}
    text = json.dumps(report, indent=1, default=float)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    what = f"{args.method} at {layer}"
    print()
    print(
        markdown(
            f"Held-out phantoms, whole scan ({what}; seeds {seeds[0]}-{seeds[-1]}, shape {args.shape})", phantoms, mean
        )
    )
    if lidc:
        print()
        print(
            markdown(
                f"LIDC-IDRI slabs, whole slab, per nodule ({what}; consensus >= 50%)", lidc, report["lidc"]["mean"]
            )
        )
    if patches:
        print()
        print(
            markdown(
                f"Single nodule patches of the same phantoms ({what})",
                patches,
                report["patches"]["mean"],
                per_row=False,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
