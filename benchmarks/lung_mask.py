"""Benchmark: lung_mask on a 512x512x300 chest CT, side by side with the classical full-resolution
method that most lung-nodule pipelines copy (the Kaggle DSB 2017 "full preprocessing tutorial":
threshold -320 HU, 3D labelling, air connected to the corner removed, per-slice largest air region,
largest 3D component), same volumes, same run.

Volumes: the chest phantom at 512x512x300 (0.7 x 0.7 x 1.0 mm; its true lungs give the Dice), and
the real full chest CT of ../shared/data (when present) resampled to 300 slices. Times are the
median of ``--repeats`` runs: wall clock, and CPU time of this process (on a shared machine the CPU
time is the better estimate of what an idle 2-core machine would take, as the work is mostly
single-threaded). Prints JSON.

    python benchmarks/lung_mask.py [--repeats 3] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FULL_CHEST = REPO.parent / "shared" / "data" / "full_chest_ct" / "dicom"


def classical_lung_mask(hu: np.ndarray) -> np.ndarray:
    """The Kaggle DSB 2017 tutorial's ``segment_lung_mask(image, fill_lung_structures=True)``
    (G. Zuidhof), with scikit-image as there; the peer of :func:`lung_mask`."""
    from skimage import measure

    def largest_label(labels: np.ndarray, bg: int) -> Optional[int]:
        vals, counts = np.unique(labels, return_counts=True)
        counts, vals = counts[vals != bg], vals[vals != bg]
        return int(vals[np.argmax(counts)]) if len(counts) else None

    binary = np.array(hu > -320, dtype=np.int8) + 1
    labels = measure.label(binary)
    binary[labels == labels[0, 0, 0]] = 2
    for i, axial in enumerate(binary):
        labeling = measure.label(axial - 1)
        l_max = largest_label(labeling, bg=0)
        if l_max is not None:
            binary[i][labeling != l_max] = 1
    binary = 1 - (binary - 1)
    labels = measure.label(binary, background=0)
    l_max = largest_label(labels, bg=0)
    if l_max is not None:
        binary[labels != l_max] = 0
    return binary.astype(bool)


def timed(fn: Callable[[], np.ndarray], repeats: int) -> Dict[str, object]:
    walls, cpus = [], []
    result = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s": round(statistics.median(walls), 3), "cpu_s": round(statistics.median(cpus), 3), "mask": result}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))), 4)


def run_case(name: str, volume, truth: Optional[np.ndarray], repeats: int, peer: bool) -> Dict[str, object]:
    from LungGradCAMLib.engine.lung import lung_mask

    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    case: Dict[str, object] = {
        "volume": name,
        "shape_kji": list(volume.shape),
        "spacing_ijk_mm": [round(float(s), 3) for s in volume.spacing],
    }
    runs = {"lung_mask": lambda: lung_mask(volume)}
    if peer:
        runs["classical_full_resolution"] = lambda: classical_lung_mask(volume.array)
    for label, fn in runs.items():
        r = timed(fn, repeats if label == "lung_mask" else 1)
        mask = r.pop("mask")
        r["lung_volume_l"] = round(float(np.count_nonzero(mask)) * voxel_ml / 1000.0, 3)
        if truth is not None:
            r["dice_vs_truth"] = dice(mask, truth)
        case[label] = r
    if peer:
        case["speedup_cpu"] = round(case["classical_full_resolution"]["cpu_s"] / case["lung_mask"]["cpu_s"], 1)
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--no-peer", action="store_true", help="time lung_mask only")
    args = parser.parse_args()

    from LungGradCAMLib import phantom
    from LungGradCAMLib.core.volume import resample

    t = time.perf_counter()
    ph = phantom.chest_ct(seed=0, shape=(args.slices, 512, 512), spacing_mm=(0.7, 0.7, 1.0))
    report = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "phantom_build_s": round(time.perf_counter() - t, 1),
        "target": "< 2 s on 2 cores",
        "cases": [],
    }
    report["cases"].append(run_case("phantom seed 0", ph.volume, ph.lungs, args.repeats, not args.no_peer))
    del ph
    if FULL_CHEST.is_dir():
        from LungGradCAMLib.io.dicom import load_dicom_series

        chest = load_dicom_series(FULL_CHEST)
        extent_k = chest.shape[0] * chest.spacing[2]
        chest = resample(chest, (chest.spacing[0], chest.spacing[1], extent_k / args.slices))
        report["cases"].append(run_case("full_chest_ct resampled", chest, None, args.repeats, not args.no_peer))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
