"""Real nodules in real lungs, explained as a user would: does the whole-scan heat map land on a real
nodule, and does it stay cold elsewhere?

    .venv/bin/python benchmarks/real_nodules.py --model default --out runs/real-nodules   # ~4 min, 2 quiet cores

The nodules are those of the LIDC-IDRI patients the model never saw (``../shared/data/lidc_vois``,
the test split of the model's card: the same patients for every model trained with the project's
split), each pasted by its readers' outline (feathered over 2 mm, :func:`training.lidc.place_voi`:
inside the outline the CT holds exactly the source's HU) into a real chest CT region no model was
trained on: the test regions of ``benchmarks/real_backgrounds.csv`` (the full chest CT's test band,
cut as training cuts it with a gap of a 32-voxel patch at 1.5 mm from the other bands, and the
pulmonary-artery contrast crop), on the CT's own grid. Each patient's nodules go into one scan
(four at most, 30 mm apart or more; more make another scan), at a parenchymal, juxta-vascular and
juxta-pleural site in turn, the patients alternating between the two regions. Each scan is
explained with the product's path (``lgc.explain`` + ``lgc.segment_cam``, the card's method and
layer, the absolute heat-map scale):

* **FROC** (LUNA16's): the hot regions at each heat-map threshold of :data:`LEVELS` (inside the
  lungs, >= 10 mm³, as the product segments); a region finds a nodule when its hottest voxel lies
  in the nodule's outline or within its radius of its centre, and is a false hot region when it
  finds none; the sensitivity at 1/8 ... 8 false hot regions per scan (the best threshold with at
  most that many; :func:`evaluation.metrics.froc`) and their mean, the CPM; also at the default
  threshold 0.5. For nodules >= 4 mm (smaller ones neither count nor are false) and for all.
* **Whole-scan heat map** against each nodule's outline, within the lungs without the scan's other
  nodules (``cam_quality.heatmap_metrics``): pointing (the map's maximum inside the nodule),
  within 5 mm, Guan & Loew's mean-Dice and the best Dice; and the same within the ROI box below.
* **Patch maps**: ``explain(mode="roi")`` on a patch-sized region centred within 5 mm of the
  nodule (as a user clicks it), scored within that box.
* **Faithfulness**: deletion (air) and insertion (blurred CT) areas (:mod:`evaluation.metrics`)
  of the whole-scan and the ROI map on the model's input patch around the nodule: the model's
  probability as the hottest voxels are removed (low is faithful) or revealed (high is faithful).
* **Baselines** beside them: the CT itself as a heat map (denser = hotter, HU windowed to the
  model's window), and the nodule's diameter.
* **Nodule-free real CTs** (and the two LIDC slabs): every hot region at the default threshold,
  by CT, with whether the model trained on part of that CT.

``--split validation`` runs the same on the card's validation patients in the validation regions
(the full chest CT's validation band): to choose settings (e.g. ``--method``/``--layer``) without
looking at the test. 95% confidence intervals: percentile bootstrap over patients (1000 replicates). Prints the JSON
and a markdown summary; ``--out DIR`` writes ``real_nodules.json`` and ``real_nodules.md``.
Aims (issue 22): sensitivity >= 0.90 at <= 1 false hot region per scan for nodules >= 4 mm, CPM
>= 0.85, pointing >= 0.90 and mean-Dice >= 0.45 for the whole-scan map, no hot region on the
nodule-free real CTs, LIDC-IDRI-0001 and 0002 both hit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
#: The heat-map thresholds of the FROC (absolute scale); the product's default, 0.5, among them.
LEVELS = tuple(round(v, 2) for v in np.arange(0.1, 0.951, 0.05))
DEFAULT_LEVEL = 0.5
#: The test band is cut as training cuts it for a 32-voxel patch at 1.5 mm (the widest gap any
#: model here trains with), so it never touches a training or validation band.
BAND_SPACING_MM, BAND_PATCH = (1.5, 1.5, 1.5), (32, 32, 32)
NODULES_PER_SCAN, APART_MM, FEATHER_MM, ROI_JITTER_MM, SMALL_MM = 4, 30.0, 2.0, 5.0, 4.0
AIMS = {"sensitivity_at_1_fp_ge4mm": 0.90, "cpm_ge4mm": 0.85, "pointing": 0.90, "mean_dice": 0.45}
#: Nodule-free real CTs (relative to the data folder) whose hot regions are listed by name.
CLEAN_CTS = (
    "full_chest_ct/dicom",
    "totalsegmentator/chest_crop_pulmonary.nii.gz",
    "totalsegmentator/chest_crop_aorta.nii.gz",
)


# --------------------------------------------------------------------------------------------
# the scans: real nodules pasted into held-out real lung regions
# --------------------------------------------------------------------------------------------
def split_backgrounds(manifest: Path, split: str = "test") -> List[Any]:
    """The ``split`` regions of ``manifest`` on their CTs' own grids: a Background per region (the CT
    cut to the band's slices for a ``bands`` scan), with its lungs and the region nodules go in."""
    from LungGradCAMLib.core.volume import crop
    from LungGradCAMLib.engine.lung import lung_mask
    from LungGradCAMLib.training.data import read_image
    from LungGradCAMLib.training.placement import Background, load_backgrounds

    out = []
    for bg in load_backgrounds(manifest, BAND_SPACING_MM, BAND_PATCH, (split,)):
        ct = read_image(bg.source)
        ct = ct.with_array(ct.array.astype(np.float32, copy=False))
        if ":" in bg.name:  # a band: the native slices whose centres lie within the test band's
            ks = np.flatnonzero(bg.region.any(axis=(1, 2)))
            z_band = bg.ijk_to_ras[2, 2] * ks + bg.ijk_to_ras[2, 3]
            z_ct = ct.ijk_to_ras_points(np.c_[np.zeros(ct.shape[0]), np.zeros(ct.shape[0]), np.arange(ct.shape[0])])[
                :, 2
            ]
            keep = np.flatnonzero((z_ct >= z_band.min()) & (z_ct <= z_band.max()))
            ct = crop(ct, ((int(keep[0]), int(keep[-1]) + 1), (0, ct.shape[1]), (0, ct.shape[2])))
        lungs = lung_mask(ct, remove_airways=True)
        region = np.zeros(ct.shape, bool)  # nodules at least 10 mm inside the CT's edges
        margin = [int(math.ceil(10.0 / s)) for s in ct.spacing[::-1]]
        region[tuple(slice(m, n - m) for m, n in zip(margin, ct.shape))] = True
        out.append(
            Background(
                bg.name, split, ct.array, lungs, region, tuple(float(s) for s in ct.spacing), bg.source, ct.ijk_to_ras
            )
        )
    return out


def make_scans(records: Sequence[Any], backgrounds: Sequence[Any], seed: int = 0) -> List[Dict[str, Any]]:
    """The synthetic scans: per patient, groups of up to :data:`NODULES_PER_SCAN` nodules pasted
    into one background (patients alternate between the backgrounds), each nodule at a
    parenchymal / juxta-vascular / juxta-pleural site in turn, :data:`APART_MM` from the others."""
    from LungGradCAMLib.core.volume import Volume
    from LungGradCAMLib.training.lidc import place_voi
    from LungGradCAMLib.training.placement import PLACEMENT_KINDS, sample_centres

    rng = np.random.default_rng(seed)
    by_patient: Dict[str, List[Any]] = {}
    for r in records:
        by_patient.setdefault(r.patient, []).append(r)
    scans = []
    for p, (patient, vois) in enumerate(sorted(by_patient.items())):
        for start in range(0, len(vois), NODULES_PER_SCAN):
            bg = backgrounds[(p + start // NODULES_PER_SCAN) % len(backgrounds)]
            hu = bg.hu.copy()
            truth = np.zeros(hu.shape, np.uint8)
            spacing_kji = np.asarray(bg.spacing_mm)[::-1]
            nodules = []
            for n, voi in enumerate(vois[start : start + NODULES_PER_SCAN]):
                wanted = PLACEMENT_KINDS[(start + n) % len(PLACEMENT_KINDS)]  # else anywhere in the lungs
                far = [
                    (kind, s)
                    for kind in (wanted, "lung")
                    for s in sample_centres(bg, kind, 20, rng, radius_mm=voi.diameter_mm / 2)
                    if all(np.linalg.norm((s - o["kji"]) * spacing_kji) >= APART_MM for o in nodules)
                ]
                if not far:
                    continue
                kind, site = far[0]
                where, mask = place_voi(hu, bg.spacing_mm, voi, site, FEATHER_MM)
                block = truth[where]
                block[mask & (block == 0)] = len(nodules) + 1
                nodules.append(
                    {
                        "patient": patient,
                        "nodule_id": voi.nodule_id,
                        "diameter_mm": voi.diameter_mm,
                        "malignant": voi.malignant,
                        "kind": kind,
                        "kji": np.asarray(site),
                        "label": len(nodules) + 1,
                    }
                )
            for nod in nodules:
                inside = np.argwhere(truth == nod["label"])
                nod["voxels"] = len(inside)
                nod["centre_kji"] = inside.mean(axis=0) if len(inside) else nod["kji"].astype(float)
            scans.append(
                {
                    "patient": patient,
                    "background": bg.name,
                    "volume": Volume(hu, bg.ijk_to_ras),
                    "truth": truth,
                    "nodules": [n for n in nodules if n["voxels"]],
                }
            )
    return scans


# --------------------------------------------------------------------------------------------
# scoring one scan
# --------------------------------------------------------------------------------------------
def region_hits(
    exp: Any, truth: np.ndarray, nodules: Sequence[Dict[str, Any]], levels: Sequence[float]
) -> Tuple[np.ndarray, np.ndarray]:
    """At each threshold of ``levels``: which nodules a hot region found (bool (levels, nodules))
    and how many hot regions found none (levels,); regions as ``lgc.segment_cam`` makes them."""
    import LungGradCAMLib as lgc

    ct = exp.cam
    spacing_kji = np.asarray(ct.spacing)[::-1]
    centres = np.array([n["centre_kji"] for n in nodules]).reshape(-1, 3)
    radii = np.array([n["diameter_mm"] / 2 for n in nodules])
    hits = np.zeros((len(levels), len(nodules)), bool)
    false = np.zeros(len(levels), np.int64)
    for a, level in enumerate(levels):
        for region in lgc.segment_cam(exp, threshold=level, max_regions=None).regions:
            peak = np.rint(ct.ras_to_ijk_points(region.peak_ras)[0][::-1]).astype(int)
            label = int(truth[tuple(np.clip(peak, 0, np.asarray(truth.shape) - 1))])
            near = np.linalg.norm((centres - peak) * spacing_kji, axis=1) <= radii if len(nodules) else []
            found = {label - 1} if label else set(np.flatnonzero(near))
            if found:
                hits[a, list(found)] = True
            else:
                false[a] += 1
    return hits, false


def _roi_box(cam: Any, centre_ras: np.ndarray, size_mm: np.ndarray) -> Tuple[slice, slice, slice]:
    """The CT voxels (K, J, I slices) of the axis-aligned box of ``size_mm`` (i, j, k) around ``centre_ras``."""
    corners = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)]) * size_mm
    ijk = cam.ras_to_ijk_points(centre_ras + corners)
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, None)[::-1]
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, np.asarray(cam.shape)[::-1])[::-1]
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def faithfulness(loaded: Any, space: Any, maps: Dict[str, Any], centre_ras: np.ndarray) -> Dict[str, float]:
    """Deletion (air) and insertion (blur) areas of each map (Volumes on the CT's grid) on the model's
    input patch centred at ``centre_ras``: the resampled CT ``space`` (the model's grid) cut to it."""
    import torch

    from LungGradCAMLib.core.volume import AIR_HU, Volume, resample_to
    from LungGradCAMLib.evaluation import metrics
    from LungGradCAMLib.training.data import crop_patch

    card = loaded.card
    size = np.asarray(card.patch_size)
    c = np.rint(space.ras_to_ijk_points(centre_ras)[0][::-1]).astype(int)
    corner = space.ijk_to_ras.copy()  # past the CT's edges the patch is air, as the sliding window pads it
    corner[:3, 3] = space.ijk_to_ras_points((c - size // 2)[::-1])[0]
    patch = Volume(crop_patch(space.array, c, size, fill=AIR_HU), corner)

    def score(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = loaded.prepare(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))[:, None])
            return torch.softmax(loaded.module(x).float(), 1)[:, card.cam_class_index].numpy()

    out = {}
    for name, cam in maps.items():
        local = resample_to(cam, patch, order=1, default_value=0.0).array
        out[f"{name}_deletion"] = metrics.deletion_curve(patch.array, local, score).auc
        out[f"{name}_insertion"] = metrics.insertion_curve(patch.array, local, score, spacing=patch.spacing).auc
    return out


def score_scan(loaded: Any, scan: Dict[str, Any], rng: np.random.Generator, **cam: Any) -> Dict[str, Any]:
    """Explain one scan (whole, then one ROI per nodule; ``cam``: ``method``/``layer`` other than
    the card's) and score it: per-level hits and false regions, and one row of heat-map metrics
    per nodule."""
    from cam_quality import heatmap_metrics

    import LungGradCAMLib as lgc
    from LungGradCAMLib.core.volume import AIR_HU, resample

    volume, truth, nodules = scan["volume"], scan["truth"], scan["nodules"]
    t0 = time.perf_counter()
    exp = lgc.explain(volume, model=loaded, device="cpu", **cam)
    seconds = time.perf_counter() - t0
    hits, false = region_hits(exp, truth, nodules, LEVELS)
    card = loaded.card
    space = resample(volume, card.spacing_mm, order=1, default_value=AIR_HU)
    lo, hi = card.hu_window
    density = volume.with_array(np.clip((volume.array - lo) / (hi - lo), 0, 1).astype(np.float32))
    size_mm = np.asarray(card.patch_size[::-1], float) * np.asarray(card.spacing_mm)
    rows = []
    for n, nod in enumerate(nodules):
        mask = truth == nod["label"]
        others = (truth > 0) & ~mask
        region = (exp.lung_mask | mask) & ~others
        centre = volume.ijk_to_ras_points(nod["centre_kji"][::-1])[0]
        roi_centre = centre + rng.uniform(-ROI_JITTER_MM, ROI_JITTER_MM, 3)
        roi = lgc.explain(
            volume,
            model=loaded,
            mode="roi",
            roi=(tuple(roi_centre), tuple(size_mm)),
            device="cpu",
            lung_mask=exp.lung_mask,
            **cam,
        )
        box = _roi_box(volume, roi_centre, size_mm)
        in_box = np.zeros(volume.shape, bool)
        in_box[box] = True
        row = {
            "patient": nod["patient"],
            "nodule_id": nod["nodule_id"],
            "diameter_mm": nod["diameter_mm"],
            "malignant": nod["malignant"],
            "kind": nod["kind"],
            "background": scan["background"],
            "p_at_nodule": float(exp.score_map.array[mask].max()),
            "found_at_default": bool(hits[LEVELS.index(DEFAULT_LEVEL), n]),
        }
        for name, heat, where in (
            ("whole", exp.cam, region),
            ("whole_roi", exp.cam, region & in_box),
            ("roi", roi.cam, region & in_box),
            ("hu", density, region),
        ):
            for key, value in heatmap_metrics(heat, mask, where).items():
                if key in ("pointing", "peak_mm", "mean_dice", "best_dice"):
                    row[f"{name}_{key}"] = float(value)
            row[f"{name}_pointing_5mm"] = float(row[f"{name}_peak_mm"] <= 5.0)
        row.update(faithfulness(loaded, space, {"whole": exp.cam, "roi": roi.cam, "hu": density}, centre))
        rows.append(row)
    return {
        "patient": scan["patient"],
        "background": scan["background"],
        "nodules": len(nodules),
        "hits": hits,
        "false": false,
        "rows": rows,
        "seconds": seconds,
        "p": exp.probabilities[exp.target_class],
    }


# --------------------------------------------------------------------------------------------
# summaries with patient-bootstrap CIs
# --------------------------------------------------------------------------------------------
def froc_summary(scans: Sequence[Dict[str, Any]], min_diameter_mm: float, n_boot: int) -> Dict[str, Any]:
    """FROC (and the default threshold's operating point) over the nodules >= ``min_diameter_mm``,
    with patient-bootstrap CIs."""
    from LungGradCAMLib.evaluation.evaluate import group_bootstrap
    from LungGradCAMLib.evaluation.metrics import FROC_RATES, froc

    keep = [np.array([r["diameter_mm"] >= min_diameter_mm for r in s["rows"]], bool) for s in scans]
    patients = np.array([s["patient"] for s in scans])
    level = LEVELS.index(DEFAULT_LEVEL)

    def stats(index: np.ndarray) -> np.ndarray:
        hits = np.concatenate([scans[i]["hits"][:, keep[i]] for i in index], axis=1)
        false = np.sum([scans[i]["false"] for i in index], axis=0)
        if hits.shape[1] == 0:
            return np.full(len(FROC_RATES) + 3, np.nan)
        f = froc(hits, false, len(index))
        return np.concatenate([f.at, [f.cpm, f.sensitivity[level], f.fp_per_scan[level]]])

    value = stats(np.arange(len(scans)))
    ci = group_bootstrap(patients, stats, n_boot=n_boot)
    names = [f"sensitivity_at_{r:g}_fp" for r in FROC_RATES] + ["cpm", "sensitivity_at_0.5", "fp_per_scan_at_0.5"]
    return {
        "nodules": int(sum(k.sum() for k in keep)),
        "scans": len(scans),
        **{n: {"value": float(v), "ci95": [float(a), float(b)]} for n, v, a, b in zip(names, value, *ci)},
    }


def row_summary(rows: Sequence[Dict[str, Any]], n_boot: int) -> Dict[str, Any]:
    """Mean of every numeric column over the nodules, with patient-bootstrap CIs."""
    from LungGradCAMLib.evaluation.evaluate import group_bootstrap

    keys = [k for k in rows[0] if isinstance(rows[0][k], (float, int, bool)) and k not in ("malignant",)]
    table = np.array([[float(r.get(k, np.nan)) for k in keys] for r in rows])
    patients = [r["patient"] for r in rows]
    value = np.nanmean(table, axis=0)
    ci = group_bootstrap(patients, lambda i: np.nanmean(table[i], axis=0), n_boot=n_boot)
    return {k: {"value": float(v), "ci95": [float(a), float(b)]} for k, v, a, b in zip(keys, value, *ci)}


# --------------------------------------------------------------------------------------------
# real CTs as they are: hot regions on nodule-free CTs, and the LIDC slabs
# --------------------------------------------------------------------------------------------
def trained_on(card: Any, name: str) -> str:
    """Whether the card's training (or validation) split used part of the CT ``name``."""
    split = (card.training or {}).get("split") or {}
    used = [
        p
        for key in ("train_patients", "validation_patients")
        for p in split.get(key, [])
        if p.startswith("background:")
    ]
    stem = Path(name).name if not name.endswith("dicom") else "dicom"
    mine = sorted(u[len("background:") :] for u in used if u[len("background:") :].split(":")[0] == stem)
    return "yes: " + ", ".join(mine) if mine else "no"


def region_list(seg: Any) -> List[Dict[str, Any]]:
    return [
        {
            "peak": round(r.peak_cam, 3),
            "volume_mm3": round(r.volume_mm3, 1),
            "max_hu": r.max_hu and round(r.max_hu),
            "mean_hu": r.mean_hu and round(r.mean_hu),
            "peak_ras": [round(v, 1) for v in r.peak_ras],
        }
        for r in seg.regions
    ]


def clean_cts(loaded: Any, backgrounds: Sequence[Any], **cam: Any) -> List[Dict[str, Any]]:
    """Every hot region at the default threshold on the nodule-free real CTs (and the test band alone)."""
    import LungGradCAMLib as lgc
    from LungGradCAMLib.core.volume import Volume
    from LungGradCAMLib.io.inputs import load_input

    cases = [(name, lambda name=name: load_input(DATA / name)) for name in CLEAN_CTS if (DATA / name).exists()]
    cases += [
        (f"{bg.name} (the benchmark's band)", lambda bg=bg: Volume(bg.hu, bg.ijk_to_ras))
        for bg in backgrounds
        if ":" in bg.name
    ]
    out = []
    for name, load in cases:
        t0 = time.perf_counter()
        exp = lgc.explain(load(), model=loaded, device="cpu", **cam)
        seg = lgc.segment_cam(exp, threshold=DEFAULT_LEVEL, max_regions=None)
        out.append(
            {
                "ct": name,
                "trained_on": trained_on(loaded.card, name.split(" ")[0]),
                "p": round(exp.probabilities[exp.target_class], 4),
                "hot_regions": len(seg.regions),
                "highest_heat": round(float(seg.peak), 3),
                "regions": region_list(seg),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    return out


def lidc_slabs(loaded: Any, **cam: Any) -> List[Dict[str, Any]]:
    """LIDC-IDRI-0001 and 0002: is each nodule (reader consensus) hit, and how many other hot regions?"""
    from cam_quality import heatmap_metrics

    import LungGradCAMLib as lgc
    from LungGradCAMLib.io.dicom import load_dicom_series
    from LungGradCAMLib.training.lidc import lidc_nodules, parse_lidc_xml

    out = []
    root = DATA / "lidc"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for xml in sorted(folder.rglob("*.xml")):
            volume = load_dicom_series(folder, series_uid=parse_lidc_xml(xml)[0] or None)
            nodules = lidc_nodules(xml, volume, consensus=0.5)
            if not nodules:
                continue
            exp = lgc.explain(volume, model=loaded, device="cpu", **cam)
            seg = lgc.segment_cam(exp, threshold=DEFAULT_LEVEL, max_regions=None)
            truth = np.zeros(volume.shape, np.uint8)
            for n, nodule in enumerate(nodules):
                truth[nodule.mask] = n + 1
            ranks = {}
            for rank, region in enumerate(seg.regions, start=1):
                peak = np.rint(volume.ras_to_ijk_points(region.peak_ras)[0][::-1]).astype(int)
                label = int(truth[tuple(peak)])
                if label and label not in ranks:
                    ranks[label] = rank
            for n, nodule in enumerate(nodules):
                m = heatmap_metrics(exp.cam, nodule.mask, (exp.lung_mask | nodule.mask) & ~((truth > 0) & ~nodule.mask))
                out.append(
                    {
                        "case": f"{folder.name} nodule {n + 1}",
                        "hit_region_rank": ranks.get(n + 1),
                        "hot_regions": len(seg.regions),
                        "pointing": bool(m["pointing"]),
                        "peak_mm": round(float(m["peak_mm"]), 1),
                        "mean_dice": round(float(m["mean_dice"]), 3),
                        "p_at_nodule": round(float(exp.score_map.array[nodule.mask].max()), 4),
                        "regions": region_list(seg),
                    }
                )
    return out


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _ci(entry: Dict[str, Any]) -> str:
    return f"{entry['value']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"


def markdown(report: Dict[str, Any]) -> str:
    model, fr, frall, mean = report["model"], report["froc_ge4mm"], report["froc_all"], report["heat_maps"]
    lines = [
        f"**Real nodules of {report['patients']} {report['split']} patients in {report['split']} real lungs: "
        f"{model['name']} {model['version']}, {model['method']} @ {model['layer']}** ({report['scans']} scans, {frall['nodules']} nodules, {fr['nodules']} >= 4 mm; "
        f"{report['seconds']:.0f} s)",
        "",
        "| FROC (false hot regions per scan) | 1/8 | 1/4 | 1/2 | 1 | 2 | 4 | 8 | CPM | at 0.5: sensitivity | at 0.5: FP/scan |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in (("nodules >= 4 mm", fr), ("all nodules", frall)):
        cells = [f"{f[f'sensitivity_at_{r:g}_fp']['value']:.3f}" for r in (0.125, 0.25, 0.5, 1, 2, 4, 8)]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_ci(f['cpm'])} | {_ci(f['sensitivity_at_0.5'])} | "
            f"{_ci(f['fp_per_scan_at_0.5'])} |"
        )
    lines += [
        "",
        "| heat map (vs the readers' outline) | pointing | within 5 mm | mean-Dice | best Dice | deletion (low = faithful) | insertion (high = faithful) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("whole", "whole scan, within the lungs"),
        ("whole_roi", "whole scan, within the ROI box"),
        ("roi", "ROI (patch map), within its box"),
        ("hu", "baseline: the CT (denser = hotter)"),
    ):

        def cell(key: str) -> str:
            return _ci(mean[key]) if key in mean else ""

        lines.append(
            f"| {label} | {cell(name + '_pointing')} | {cell(name + '_pointing_5mm')} | {cell(name + '_mean_dice')} | "
            f"{cell(name + '_best_dice')} | {cell(name + '_deletion')} | {cell(name + '_insertion')} |"
        )
    lines += [
        "",
        "| real CT without a known nodule | trained on part of it | P(nodule) | hot regions at 0.5 | highest heat | regions (peak heat, max HU) |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["clean_cts"]:
        regions = "; ".join(f"{r['peak']:.2f}, {r['max_hu']} HU" for r in c["regions"][:10])
        lines.append(
            f"| {c['ct']} | {c['trained_on']} | {c['p']:.3f} | {c['hot_regions']} | {c['highest_heat']:.2f} | {regions} |"
        )
    lines += [
        "",
        "| LIDC slab | hit (rank of its region) | hot regions at 0.5 | pointing | peak to nodule (mm) | mean-Dice | P at the nodule |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["lidc_slabs"]:
        lines.append(
            f"| {c['case']} | {'hit, region ' + str(c['hit_region_rank']) if c['hit_region_rank'] else 'miss'} | "
            f"{c['hot_regions']} | {'hit' if c['pointing'] else 'miss'} | {c['peak_mm']} | {c['mean_dice']} | "
            f"{c['p_at_nodule']} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch
    from cam_quality import held_out_patients

    from LungGradCAMLib.core.atomic import write_text
    from LungGradCAMLib.engine.models import load_model
    from LungGradCAMLib.training.lidc import lidc_voi_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model name or .safetensors path (default: default)")
    parser.add_argument(
        "--vois", default=str(DATA / "lidc_vois"), help="LIDC VOI folder (default ../shared/data/lidc_vois)"
    )
    parser.add_argument(
        "--backgrounds",
        default=str(HERE / "real_backgrounds.csv"),
        help="backgrounds CSV whose test regions hold the nodules (default benchmarks/real_backgrounds.csv)",
    )
    parser.add_argument("--patients", type=int, default=0, help="only the first N held-out patients (0 = all)")
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="test (default): the card's test patients in the test regions; validation: its "
        "validation patients in the validation regions, to choose settings before the test",
    )
    parser.add_argument("--method", help="CAM method (default: the card's)")
    parser.add_argument("--layer", help="CAM layer(s), '+' fuses (default: the card's)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="placement seed (default 0)")
    parser.add_argument("--no-real-cts", action="store_true", help="skip the nodule-free CTs and the LIDC slabs")
    parser.add_argument("--out", help="folder for real_nodules.json and real_nodules.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model, device="cpu")
    card = loaded.card
    records = lidc_voi_records(args.vois)
    if args.split == "test":
        keep = set(held_out_patients(card, [r.patient for r in records]))
    else:
        keep = set(((card.training or {}).get("split") or {}).get("validation_patients", []))
    patients = sorted(keep)[: args.patients or None]
    records = [r for r in records if r.patient in set(patients)]
    backgrounds = split_backgrounds(Path(args.backgrounds), args.split)
    cam = {k: v for k, v in (("method", args.method), ("layer", args.layer)) if v}
    rng = np.random.default_rng(args.seed)
    scored = []
    for scan in make_scans(records, backgrounds, seed=args.seed):
        if scan["nodules"]:
            scored.append(score_scan(loaded, scan, rng, **cam))
            print(
                f"{scan['patient']} in {scan['background']}: {scored[-1]['nodules']} nodules, "
                f"{scored[-1]['seconds']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    rows = [r for s in scored for r in s["rows"]]
    report = {
        "model": {
            "name": card.name,
            "version": card.version,
            "sha256": card.sha256,
            "architecture": card.architecture,
            "kwargs": card.kwargs,
            "patch_size": card.patch_size,
            "spacing_mm": card.spacing_mm,
            "method": args.method or card.cam_method,
            "layer": args.layer or card.target_layer,
        },
        "split": args.split,
        "command": "python benchmarks/real_nodules.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "patients": len({s["patient"] for s in scored}),
        "scans": len(scored),
        "levels": list(LEVELS),
        "backgrounds": [b.name for b in backgrounds],
        "aims": AIMS,
        "froc_ge4mm": froc_summary(scored, SMALL_MM, args.boot),
        "froc_all": froc_summary(scored, 0.0, args.boot),
        "heat_maps": row_summary(rows, args.boot),
        "clean_cts": [] if args.no_real_cts else clean_cts(loaded, backgrounds, **cam),
        "lidc_slabs": [] if args.no_real_cts else lidc_slabs(loaded, **cam),
        "seconds_per_scan": float(np.median([s["seconds"] for s in scored])),
        "nodules": rows,
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1, default=float)
    table = markdown(report)
    print(text)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "real_nodules.json", text + "\n")
        write_text(out / "real_nodules.md", table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
