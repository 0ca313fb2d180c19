"""``lunggradcam bench``: end-to-end timing of ``lunggradcam run`` on a phantom DICOM series.

A phantom CT of the given size is written as a DICOM series, then loaded and explained exactly
as ``lunggradcam run`` does, with the time of each stage. ``benchmarks/end_to_end.py`` calls this.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence


def end_to_end(shape_kji: Sequence[int] = (300, 512, 512), spacing_mm: Sequence[float] = (0.7, 0.7, 1.0),
               device: str = "auto", model: str = "default", seed: int = 3) -> Dict[str, Any]:
    """Seconds per stage for a phantom of ``shape_kji`` (K, J, I) voxels at ``spacing_mm`` (i, j, k)."""
    from . import phantom
    from .dicom import load_dicom_series
    from .options import ExplainOptions
    from .pipeline import resolve_device, run_one

    with tempfile.TemporaryDirectory(prefix="lgc-bench-") as tmp:
        t0 = time.perf_counter()
        ph = phantom.chest_ct(seed=seed, shape=tuple(shape_kji), spacing_mm=tuple(spacing_mm))
        phantom.write_dicom_series(ph.volume, Path(tmp) / "dicom")
        prepare = time.perf_counter() - t0
        t0 = time.perf_counter()
        volume = load_dicom_series(Path(tmp) / "dicom")
        load = time.perf_counter() - t0
        # warm the model cache and the device once, as a server or the Slicer module would
        dev = resolve_device(device)
        t0 = time.perf_counter()
        explanation, segmentation, _ = run_one(volume, Path(tmp) / "out", ExplainOptions(model=model, device=str(dev)))
        run = time.perf_counter() - t0
    return {
        "shape_kji": list(shape_kji), "spacing_ijk_mm": list(spacing_mm), "device": str(dev),
        "phantom_and_dicom_write_s": round(prepare, 3), "dicom_load_s": round(load, 3),
        "explain_segment_write_s": round(run, 3), "total_run_s": round(load + run, 3),
        "stages_s": {k: round(v, 3) for k, v in explanation.timings.items()},
        "n_patches": explanation.extra.get("n_patches"), "n_regions": len(segmentation.regions),
    }


def _numbers(text: str, separator: str, kind: type, what: str) -> List[Any]:
    """``text`` split at ``separator`` into three positive numbers (an argparse ``type=``)."""
    try:
        values = [kind(x) for x in text.lower().split(separator)]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give {what}")
    return values


def _cmd_bench(args: Any) -> int:
    result = end_to_end(args.shape, args.spacing, device=args.device or "auto", model=args.model)
    print(json.dumps(result, indent=2))
    return 0


def add_cli(sub: Any) -> None:
    from .pipeline import _argument_type, _device

    p = sub.add_parser("bench", help="time 'lunggradcam run' end to end on a phantom DICOM series",
                       description="Write a phantom CT as DICOM, then load + explain + segment + write it, "
                                   "printing the seconds of each stage as JSON.")
    p.add_argument("--shape", default=[300, 512, 512], metavar="KxJxI",
                   type=lambda t: _numbers(t, "x", int, "three positive voxel counts K x J x I, e.g. 300x512x512"),
                   help="K x J x I voxels (default 300x512x512)")
    p.add_argument("--spacing", default=[0.7, 0.7, 1.0], metavar="I,J,K",
                   type=lambda t: _numbers(t, ",", float, "three positive voxel sizes in mm i,j,k, e.g. 0.7,0.7,1.0"),
                   help="i,j,k voxel size in mm (default 0.7,0.7,1.0)")
    p.add_argument("--device", default=None, type=_argument_type(_device), help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--model", default="default", help="model name or path")
    p.set_defaults(func=_cmd_bench)
