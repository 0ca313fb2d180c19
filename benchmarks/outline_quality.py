"""How good is the nodule outline? Dice and size against the LIDC readers, on patients never seen
in training, for each outline method side by side with the -500 HU threshold baseline.

Each nodule of the held-out patients (``--split test``: the outline network's and the ``default``
model's test patients, ``training.outline.split_records``) is pasted, on its own voxel grid (the
scan's spacing: the readers' mask is compared where they drew it), into an 80 mm block of a real
lung from the same split's background regions (``--backgrounds``, resampled onto that grid), four
ways: with its own surroundings (``own``: the VOI's real vessels and pleura) and alone in the
parenchyma, touching a vessel and on the pleura (``training.placement``). The outline is asked at
three seeds: the truth's centre, a point ``--displace-mm`` off it in a random direction, and the
peak of the bundled region model's heat map (``lidc-malignancy``, explained on the 40 mm region
around the centre, as an ROI run does). The lungs given are the background's lung mask (the
product passes the scan's). The two whole LIDC slabs (``../shared/data/lidc``, reader XML
consensus on the slices present) are outlined from the consensus centre with their own lung mask.

Per case: Dice with the readers' mask; the mean diameter (mean of the longest axial diameter and
the widest extent perpendicular to it, :func:`measure_outline`) against the readers' mask's, taken
the same way, and against the table's ``diameter_mm``; the volume. Summaries: mean Dice with a 95%
CI over patients (bootstrap), by seed, placement, size and texture; for nodules >= 6 mm (the
table's diameter) the mean absolute mean-diameter error and the share within 1.5 mm, with CIs.
Aims (issue 23): mean Dice >= 0.75, mean diameter within 1.5 mm for nodules >= 6 mm.

    nice -n 10 .venv/bin/python benchmarks/outline_quality.py --threads 1 \\
        --out benchmarks/results/outline_quality.json      # and .md beside it
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KINDS = ("own", "parenchyma", "juxta_vascular", "juxta_pleural")
SEEDS = ("centre", "displaced", "heat-map peak")
BLOCK_MM = 80.0
BG_SPACING = (1.0, 1.0, 1.0)


def _mean_ci(values: np.ndarray, groups: np.ndarray, n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """Mean of ``values`` with a 95% CI from resampling ``groups`` (patients) with replacement."""
    ok = np.isfinite(values)
    values, groups = np.asarray(values, float)[ok], np.asarray(groups)[ok]
    if values.size == 0:
        return {"value": None, "n": 0}
    keys, inverse = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(inverse, values), np.bincount(inverse)
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    boot = sums[draws].sum(1) / np.maximum(counts[draws].sum(1), 1)
    return {
        "value": float(values.mean()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "n": int(values.size),
        "patients": int(len(keys)),
    }


def threshold_outline(
    volume: Any, seed_ras: Sequence[float], lungs: Any = None, hu: float = -500.0, search_mm: float = 10.0
) -> Any:
    """The baseline of issue 23: the connected component above ``hu`` at the seed (no separation)."""
    from LungGradCAMLib.core.results import Outline
    from LungGradCAMLib.core.volume import LabelMap
    from LungGradCAMLib.engine.outline import _at_seed, _block, measure_outline

    seed = np.asarray(seed_ras, float)
    block, _ = _block(volume, seed, BLOCK_MM / 2)
    mask = LabelMap.like(block, _at_seed(block.array > hu, block, seed, search_mm).astype(np.uint8))
    return Outline(mask=mask, seed_ras=tuple(seed), method=f"threshold {hu:g} HU", **measure_outline(mask))


def _pasted(outline: Any, grid: Any) -> np.ndarray:
    """The outline's mask on ``grid`` (the case's CT grid, of which it is a box)."""
    out = np.zeros(grid.shape, bool)
    if not outline.found:
        return out
    lo = np.rint(grid.ras_to_ijk_points(outline.mask.ijk_to_ras_points([[0, 0, 0]]))[0][::-1]).astype(int)
    box = tuple(slice(a, a + n) for a, n in zip(lo, outline.mask.shape))
    out[box] = outline.mask.array > 0
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else 1.0


def make_case(voi: Any, background: Any, kind: str, rng: np.random.Generator) -> Optional[Dict[str, Any]]:
    """The nodule of ``voi`` pasted on its own grid into an 80 mm block of ``background`` (a
    :class:`~LungGradCAMLib.training.placement.Background` at 1 mm) at a site of ``kind``: the CT
    block (Volume, HU), the truth mask, the lung mask (bool) and the truth's centre (RAS)."""
    from LungGradCAMLib.core.volume import LabelMap, Volume, resample_to
    from LungGradCAMLib.training.placement import feather_weight, inner_weight, paste, sample_centres

    image, mask = voi.load()
    spacing = image.spacing
    radius = (3 * mask.sum() * float(np.prod(spacing)) / (4 * math.pi)) ** (1 / 3)
    site = sample_centres(background, "lung" if kind == "own" else kind, 1, rng, radius_mm=radius)
    if len(site) == 0:
        return None
    shape = np.ceil(BLOCK_MM / spacing[::-1]).astype(int)  # K, J, I
    centre_kji = np.rint(np.argwhere(mask).mean(axis=0)).astype(int)
    offset = shape // 2 - centre_kji  # VOI voxel v -> block voxel v + offset
    m = image.ijk_to_ras.copy()
    m[:3, 3] = image.ijk_to_ras_points([(-offset[::-1]).tolist()])[0]
    grid = Volume(np.zeros(tuple(shape), np.float32), m, dict(image.meta))
    # the background around its site, on the VOI's grid and orientation (1 mm -> the scan's spacing)
    bg_m = np.eye(4)
    bg_m[:3, :3] = image.direction * np.asarray(background.spacing_mm)
    bg_m[:3, 3] = grid.ijk_to_ras_points([(shape[::-1] // 2).tolist()])[0] - bg_m[:3, :3] @ site[0][::-1]
    hu = resample_to(Volume(background.hu, bg_m), grid, order=1, default_value=-1024.0).array
    lungs = resample_to(LabelMap(background.lungs.view(np.uint8), bg_m), grid).array > 0
    source = np.full(tuple(shape), np.nan, np.float32)
    truth = np.zeros(tuple(shape), bool)
    lo = np.maximum(offset, 0)
    hi = np.minimum(offset + np.asarray(mask.shape), shape)
    src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
    dst = tuple(slice(a, b) for a, b in zip(lo, hi))
    source[dst] = image.array[src]
    truth[dst] = mask[src]
    weight = feather_weight(truth, spacing, 3.0)
    if kind == "own":
        weight = np.maximum(weight, inner_weight(np.isfinite(source), spacing, 3.0))
    ct = grid.with_array(paste(hu, source, weight))
    centre = grid.ijk_to_ras_points(np.argwhere(truth).mean(axis=0)[None, ::-1])[0]
    return {"ct": ct, "truth": truth, "lungs": lungs | truth, "centre": centre}


def heat_map_peak(case: Dict[str, Any], region_model: Any) -> np.ndarray:
    """The RAS of the region model's heat-map maximum on the 40 mm region around the centre."""
    import LungGradCAMLib as lgc

    exp = lgc.explain(
        case["ct"], model=region_model, roi=(tuple(case["centre"]), 40.0), lung_mask=case["lungs"], device="cpu"
    )
    kji = np.unravel_index(int(np.argmax(exp.cam.array)), exp.cam.shape)
    return exp.cam.ijk_to_ras_points([list(kji[::-1])])[0]


def score(outline: Any, case: Dict[str, Any], truth_measure: dict) -> Dict[str, Any]:
    found = _pasted(outline, case["ct"])
    mean = outline.mean_diameter_mm
    return {
        "dice": dice(found, case["truth"]),
        "found": bool(outline.found),
        "volume_ml": outline.volume_ml,
        "mean_diameter_mm": mean,
        "long_axis_mm": outline.long_axis_mm,
        "short_axis_mm": outline.short_axis_mm,
        "mean_diameter_error_mm": None if mean is None else mean - truth_measure["mean_diameter_mm"],
    }


def run_vois(args: argparse.Namespace, methods: Dict[str, Callable], log: Callable[[str], None]) -> List[dict]:
    from LungGradCAMLib.core.volume import LabelMap
    from LungGradCAMLib.engine.models import load_model
    from LungGradCAMLib.engine.outline import measure_outline
    from LungGradCAMLib.training.lidc import lidc_voi_records
    from LungGradCAMLib.training.outline import split_records
    from LungGradCAMLib.training.placement import load_backgrounds, pick

    records = split_records(lidc_voi_records(args.vois), seed=0)[args.split]
    if args.limit:
        records = records[: args.limit]
    backgrounds = pick(load_backgrounds(args.backgrounds, BG_SPACING, [64] * 3, splits=(args.split,)), args.split)
    region_model = load_model(args.region_model, device="cpu")
    rng = np.random.default_rng(args.seed)
    rows = []
    t0 = time.perf_counter()
    for n, voi in enumerate(records):
        for kind in args.kinds:
            case = make_case(voi, backgrounds[int(rng.integers(len(backgrounds)))], kind, rng)
            if case is None:
                continue
            truth_measure = measure_outline(LabelMap.like(case["ct"], case["truth"].astype(np.uint8)))
            direction = rng.normal(size=3)
            seeds = {
                "centre": case["centre"],
                "displaced": case["centre"] + args.displace_mm * direction / np.linalg.norm(direction),
                "heat-map peak": heat_map_peak(case, region_model),
            }
            for seed_name in args.seeds:
                seed = seeds[seed_name]
                base = {
                    "patient": voi.patient,
                    "nodule": voi.nodule_id,
                    "kind": kind,
                    "seed": seed_name,
                    "seed_offset_mm": float(np.linalg.norm(seed - case["centre"])),
                    "seed_in_nodule": bool(_inside(case, seed)),
                    "table_diameter_mm": voi.diameter_mm,
                    "texture": voi.row.get("Texture", ""),
                    "truth_mean_diameter_mm": truth_measure["mean_diameter_mm"],
                    "truth_volume_ml": truth_measure["volume_ml"],
                }
                for name, method in methods.items():
                    t = time.perf_counter()
                    outline = method(case["ct"], seed, case["lungs"])
                    rows.append(
                        {
                            **base,
                            "method": name,
                            "seconds": time.perf_counter() - t,
                            **score(outline, case, truth_measure),
                        }
                    )
        if (n + 1) % 10 == 0:
            log(f"{n + 1}/{len(records)} nodules, {time.perf_counter() - t0:.0f} s")
    return rows


def _inside(case: Dict[str, Any], seed: np.ndarray) -> bool:
    kji = np.rint(case["ct"].ras_to_ijk_points(seed)[0][::-1]).astype(int)
    return bool(np.all((kji >= 0) & (kji < case["truth"].shape)) and case["truth"][tuple(kji)])


def run_slabs(args: argparse.Namespace, methods: Dict[str, Callable]) -> List[dict]:
    """The two whole LIDC slabs: each reader-consensus nodule outlined from its centre."""
    import LungGradCAMLib as lgc
    from LungGradCAMLib.core.volume import LabelMap
    from LungGradCAMLib.engine.outline import measure_outline
    from LungGradCAMLib.training.lidc import lidc_nodules

    rows = []
    for folder in sorted(Path(args.lidc).glob("LIDC-IDRI-*")):
        for xml in sorted(folder.glob("*.xml")):
            ct = lgc.load_dicom_series(folder)
            lungs = lgc.lung_mask(ct)
            for n, nodule in enumerate(lidc_nodules(xml, ct)):
                truth_measure = measure_outline(LabelMap.like(ct, nodule.mask.astype(np.uint8)))
                case = {"ct": ct, "truth": nodule.mask}
                for name, method in methods.items():
                    outline = method(ct, nodule.centre_ras, lungs)
                    rows.append(
                        {
                            "patient": folder.name,
                            "nodule": n + 1,
                            "readers": len(nodule.readers),
                            "method": name,
                            "truth_mean_diameter_mm": truth_measure["mean_diameter_mm"],
                            "truth_volume_ml": truth_measure["volume_ml"],
                            **score(outline, case, truth_measure),
                        }
                    )
    return rows


def summarise(rows: List[dict]) -> Dict[str, Any]:
    """Per method: mean Dice (CI by patient) overall, by seed, kind, size and texture; the mean
    diameter's absolute error for nodules >= 6 mm (table diameter) against the readers' mask and
    the table, and the share within 1.5 mm."""
    out: Dict[str, Any] = {}
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]

        def pick(**where: Any) -> List[dict]:
            return [r for r in mine if all(where_ok(r, k, v) for k, v in where.items())]

        def dice_of(sel: List[dict]) -> Dict[str, Any]:
            return _mean_ci(np.array([r["dice"] for r in sel]), np.array([r["patient"] for r in sel]))

        def size_of(sel: List[dict]) -> Dict[str, Any]:
            big = [r for r in sel if r["table_diameter_mm"] >= 6.0]
            patients = np.array([r["patient"] for r in big])
            err = np.array(
                [np.nan if r["mean_diameter_error_mm"] is None else abs(r["mean_diameter_error_mm"]) for r in big]
            )
            table = np.array(
                [
                    np.nan if r["mean_diameter_mm"] is None else abs(r["mean_diameter_mm"] - r["table_diameter_mm"])
                    for r in big
                ]
            )
            readers_vs_table = np.array([abs(r["truth_mean_diameter_mm"] - r["table_diameter_mm"]) for r in big])
            signed = np.array(
                [np.nan if r["mean_diameter_error_mm"] is None else r["mean_diameter_error_mm"] for r in big]
            )
            missed = np.where(np.isnan(err), 99.0, err)  # no outline: counted as a 99 mm error
            return {
                "mae_vs_readers_mm": _mean_ci(missed, patients),
                "median_abs_error_vs_readers_mm": float(np.median(missed)) if missed.size else None,
                "bias_vs_readers_mm": _mean_ci(signed, patients),
                "within_1_5mm": _mean_ci((np.nan_to_num(err, nan=99.0) <= 1.5).astype(float), patients),
                "mae_vs_table_mm": _mean_ci(np.where(np.isnan(table), 99.0, table), patients),
                "readers_mask_vs_table_mm": _mean_ci(readers_vs_table, patients),
            }

        out[method] = {
            "dice": dice_of(mine),
            "found": float(np.mean([r["found"] for r in mine])),
            "seconds_mean": float(np.mean([r["seconds"] for r in mine])) if "seconds" in mine[0] else None,
            "by_seed": {s: dice_of(pick(seed=s)) for s in SEEDS if pick(seed=s)},
            "by_kind": {k: dice_of(pick(seed="centre", kind=k)) for k in KINDS if pick(seed="centre", kind=k)},
            "by_size": {
                "< 6 mm": dice_of([r for r in mine if r["table_diameter_mm"] < 6]),
                ">= 6 mm": dice_of([r for r in mine if r["table_diameter_mm"] >= 6]),
            },
            "by_texture": {
                t: dice_of([r for r in mine if r["texture"] == t]) for t in sorted({r["texture"] for r in mine})
            },
            "size_ge_6mm": size_of(mine),
            "size_ge_6mm_by_seed": {s: size_of(pick(seed=s)) for s in SEEDS if pick(seed=s)},
        }
    return out


def where_ok(row: dict, key: str, value: Any) -> bool:
    return row.get(key) == value


def _fmt(m: Dict[str, Any], digits: int = 2) -> str:
    if m.get("value") is None:
        return "-"
    lo, hi = m["ci95"]
    return f"{m['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(result: Dict[str, Any]) -> str:
    lines = [
        f"Outline quality on {result['split']} patients ({result['n_nodules']} nodules, {result['n_patients']} "
        "patients), Dice and mean-diameter error against the readers' masks, 95% CI by patient.",
        "",
        "| method | Dice (all) | centre | displaced | heat-map peak | own | parenchyma | juxta-vascular | "
        "juxta-pleural | < 6 mm | >= 6 mm | mean diam. abs. error >= 6 mm (mm) | median | within 1.5 mm | "
        "vs table (mm) |",
        "|---" * 15 + "|",
    ]
    for method, s in result["summary"].items():
        size = s["size_ge_6mm"]
        lines.append(
            "| "
            + " | ".join(
                [method, _fmt(s["dice"])]
                + [_fmt(s["by_seed"].get(k, {})) for k in SEEDS]
                + [_fmt(s["by_kind"].get(k, {})) for k in KINDS]
                + [_fmt(s["by_size"][k]) for k in ("< 6 mm", ">= 6 mm")]
                + [
                    _fmt(size["mae_vs_readers_mm"], 1),
                    f"{size['median_abs_error_vs_readers_mm']:.1f}",
                    _fmt(size["within_1_5mm"]),
                    _fmt(size["mae_vs_table_mm"], 1),
                ]
            )
            + " |"
        )
    readers = next(iter(result["summary"].values()))["size_ge_6mm"]["readers_mask_vs_table_mm"]
    lines += [
        "",
        f"The readers' masks' own mean diameter (same measurement) differs from the table's diameter_mm by "
        f"{_fmt(readers, 1)} mm on average for these nodules >= 6 mm.",
    ]
    if result.get("slabs"):
        lines += [
            "",
            "Whole LIDC slabs (reader-XML consensus, outlined from its centre):",
            "",
            "| patient | nodule | method | Dice | mean diameter (mm) | readers' (mm) | volume (ml) | readers' (ml) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["slabs"]:
            mean = "-" if r["mean_diameter_mm"] is None else f"{r['mean_diameter_mm']:.1f}"
            lines.append(
                f"| {r['patient']} | {r['nodule']} | {r['method']} | {r['dice']:.2f} | {mean} | "
                f"{r['truth_mean_diameter_mm']:.1f} | {r['volume_ml']:.2f} | {r['truth_volume_ml']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from LungGradCAMLib.core.atomic import write_text
    from LungGradCAMLib.engine.models import load_model
    from LungGradCAMLib.engine.outline import nodule_outline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vois", default=str(REPO.parent / "shared" / "data" / "lidc_vois"))
    p.add_argument("--lidc", default=str(REPO.parent / "shared" / "data" / "lidc"))
    p.add_argument("--backgrounds", default=str(REPO / "benchmarks" / "real_backgrounds.csv"))
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--methods", default="network,classical,threshold", help="network, classical, threshold")
    p.add_argument("--outline-model", default="nodule-outline")
    p.add_argument("--region-model", default="lidc-malignancy", help="whose heat-map peak seeds the outline")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seeds", default=",".join(SEEDS))
    p.add_argument("--displace-mm", type=float, default=4.0)
    p.add_argument("--limit", type=int, default=0, help="only the first N nodules (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the JSON here and the markdown table beside it (.md)")
    p.add_argument("--rows", help="also write every case's row (JSON) here")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    args.seeds = args.seeds.split(",")
    torch.set_num_threads(args.threads)
    chosen = args.methods.split(",")
    methods: Dict[str, Callable] = {}
    if "network" in chosen:
        model = load_model(args.outline_model, device="cpu")
        methods["network"] = lambda ct, seed, lungs: nodule_outline(ct, seed, lungs, method="network", model=model)
    if "classical" in chosen:
        methods["classical"] = lambda ct, seed, lungs: nodule_outline(ct, seed, lungs, method="classical")
    if "threshold" in chosen:
        methods["threshold -500 HU"] = threshold_outline
    t0 = time.perf_counter()
    rows = run_vois(args, methods, lambda text: print(text, file=sys.stderr, flush=True))
    slabs = run_slabs(args, methods) if Path(args.lidc).is_dir() else []
    result = {
        "split": args.split,
        "n_nodules": len({(r["patient"], r["nodule"]) for r in rows}),
        "n_patients": len({r["patient"] for r in rows}),
        "kinds": args.kinds,
        "seeds": args.seeds,
        "displace_mm": args.displace_mm,
        "region_model": args.region_model,
        "outline_model": args.outline_model,
        "command": " ".join(sys.argv),
        "seconds": time.perf_counter() - t0,
        "summary": summarise(rows),
        "slabs": slabs,
    }
    text = markdown(result)
    print(text)
    if args.out:
        write_text(args.out, json.dumps(result, indent=1, default=float) + "\n")
        write_text(Path(args.out).with_suffix(".md"), text + "\n")
    if args.rows:
        write_text(args.rows, json.dumps(rows, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
