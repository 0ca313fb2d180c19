"""Benchmark: our DICOM series loader vs SimpleITK's ImageSeriesReader (GDCM), same series, same run.

Writes a 512x512x300 CT series (the chest phantom when available, else a synthetic HU volume) to a
temporary folder, then times, alternately and ``--repeats`` times each: ``load_dicom_series(folder)``
and SimpleITK's ``GetGDCMSeriesFileNames`` + ``ImageSeriesReader.Execute`` (what a SimpleITK user
runs to get a volume from a folder). Prints JSON with medians, minimums and the ratios sitk / ours
(> 1: we are faster) and whether both gave identical HU. On a shared machine compare the minimums
too (the load average is printed). Run:
``python benchmarks/dicom_load.py [--slices 300] [--repeats 5] [--compression rle] [--cold]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_volume(slices: int, size: int):
    from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix

    try:
        from LungGradCAMLib import phantom
    except ImportError:
        phantom = None
    if phantom is not None:
        return phantom.chest_ct(seed=0, shape=(slices, size, size), spacing_mm=(0.7, 0.7, 1.25)).volume, "phantom"
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    body = ((j - size / 2) ** 2 / (0.4 * size) ** 2 + (i - size / 2) ** 2 / (0.45 * size) ** 2) < 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 20, body.shape).astype(np.float32)
    return Volume(hu, axis_aligned_matrix((0.7, 0.7, 1.25))), "synthetic"


def drop_caches(folder: Path) -> None:
    """Best effort 'cold-ish' start: ask the kernel to forget the files' pages (Linux only)."""
    for f in folder.iterdir():
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (AttributeError, OSError):
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compression", choices=["rle", "jpeg-ls", "jpeg2000"], default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--cold", action="store_true", help="drop the files from the page cache before each run")
    args = parser.parse_args()

    import SimpleITK as sitk

    from LungGradCAMLib.io.dicom import load_dicom_series
    from LungGradCAMLib.io.dicom_write import write_dicom_series

    volume, kind = make_volume(args.slices, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        write_dicom_series(volume, folder, shuffle_names=True, compression=args.compression)
        write_s = time.perf_counter() - t

        def ours():
            return load_dicom_series(folder, workers=args.workers).array

        def simpleitk():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
            return sitk.GetArrayFromImage(reader.Execute())

        times = {"ours": [], "simpleitk": []}
        results = {}
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("simpleitk", simpleitk)):
                if args.cold:
                    drop_caches(folder)
                t = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t)
        same = bool(np.array_equal(results["ours"], np.maximum(results["simpleitk"], -1024)))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "dicom_load",
                "volume": kind,
                "shape_kji": [args.slices, args.size, args.size],
                "compression": args.compression or "none",
                "repeats": args.repeats,
                "cold": args.cold,
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "write_s": round(write_s, 3),
                "ours_median_s": round(med["ours"], 3),
                "simpleitk_median_s": round(med["simpleitk"], 3),
                "ratio_simpleitk_over_ours": round(med["simpleitk"] / med["ours"], 2),
                "ours_min_s": round(best["ours"], 3),
                "simpleitk_min_s": round(best["simpleitk"], 3),
                "ratio_of_minimums": round(best["simpleitk"] / best["ours"], 2),
                "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                "ours_s": [round(t, 3) for t in times["ours"]],
                "simpleitk_s": [round(t, 3) for t in times["simpleitk"]],
                "identical_hu": same,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
