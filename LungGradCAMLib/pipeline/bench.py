"""``lunggradcam run`` timed end to end on a phantom DICOM series, stage by
stage, beside the floor each stage is measured against.

A phantom CT of the given size is written once as a DICOM series. Then ``runs`` runs, each in a
fresh Python process (so imports and the model's first load cost what a ``lunggradcam run`` pays),
load the series and explain, segment and write it exactly as ``run`` does. The report (JSON) gives
per stage the median of the runs, their min and max, and the floor; the median total (DICOM load
to report.json, imports apart) and its spread over the runs; each run's peak resident memory; the
size and time of each output file; the machine's load before and after; where the lung mask's time
goes (a profile). ``benchmarks/end_to_end.py`` calls this.

A floor is the least work any implementation of the stage must do on the same data, timed here
(the best of three): what is left above it is ours to remove.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

#: The stages of a run, in order, and what each one's floor does.
FLOORS = {
    "dicom_load": "read every file's bytes and copy its pixels into one float32 array (no parsing, no decoding)",
    "load_model": "read the weights file into tensors (safetensors), torch already imported",
    "lung_mask": "one pass over the CT: the voxels below -350 HU",
    "resample": "nearest-neighbour copy of the CT onto the model grid (no interpolation)",
    "cam": "plain forward passes of as many zero patches (no CAM); on the CPU one thread's, divided by the threads",
    "resample_back": "fill two CT-sized float32 arrays (the CAM and the score map) in fresh memory",
    "segment": "one pass over the CAM: the voxels >= 0.5",
    "write": "write the output files' bytes, as compressed, to disk",
}
STAGES = tuple(FLOORS)


def _best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB; Linux reports kB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _one_run(dicom_dir: str, out_dir: str, device: str, model: str, files: bool) -> Dict[str, Any]:
    """One ``lunggradcam run`` in this (fresh) process: seconds per stage, peak memory, and with
    ``files`` each output file's size and time when written alone (after the run, not counted)."""
    t0 = time.perf_counter()
    from ..engine.device import resolve_device
    from ..io.dicom import load_dicom_series
    from ..options import ExplainOptions
    from .outputs import run_one

    dev = resolve_device(device)
    imports = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    volume = load_dicom_series(dicom_dir)
    load = time.perf_counter() - t0
    explanation, segmentation, written = run_one(volume, out_dir, ExplainOptions(model=model, device=str(dev)))
    stages = {"dicom_load": load, **explanation.timings}
    result = {
        "imports_s": imports,
        "stages_s": {k: stages[k] for k in STAGES},
        "peak_rss_mb": _peak_rss_mb(),
        "cpu_s": time.process_time() - cpu0,
        "device": str(dev),
        "n_patches": explanation.n_patches,
        "n_regions": len(segmentation.regions),
        "shape_model_grid": [b - a for a, b in explanation.box_model_space],
        "output_bytes": {p.name: p.stat().st_size for p in written.values()},
    }
    if files:
        result["files"] = _file_costs(explanation, segmentation, Path(out_dir) / "alone")
    return result


def _file_costs(explanation: Any, segmentation: Any, folder: Path) -> Dict[str, Dict[str, float]]:
    """Each output file written alone: seconds and bytes."""
    from ..core.results import Segmentation
    from ..io.segnrrd import write_segmentation
    from ..io.volume_files import write_volume
    from .outputs import write_overlay

    lungs = Segmentation(explanation.cam.with_array(explanation.lung_mask.view(np.uint8)), [])
    writers = {
        "cam.nrrd": lambda p: write_volume(explanation.cam, p),
        "segmentation.seg.nrrd": lambda p: write_segmentation(segmentation, p),
        "lungs.seg.nrrd": lambda p: write_segmentation(lungs, p, names={1: "lungs"}),
        "overlay.png": lambda p: write_overlay(explanation, segmentation, p),
    }
    costs = {}
    for name, write in writers.items():
        t0 = time.perf_counter()
        path = write(folder / name)
        costs[name] = {"s": round(time.perf_counter() - t0, 3), "bytes": path.stat().st_size}
    return costs


def _floors(dicom_dir: Path, volume: Any, run: Dict[str, Any], model: str, device: str) -> Dict[str, float]:
    """Seconds of each stage's floor (see :data:`FLOORS`) on the benchmark's data."""
    import torch
    from safetensors.torch import load_file

    from ..core.volume import resample, resample_to
    from ..engine.models import load_model, resolve_model_path

    files = sorted(dicom_dir.iterdir())
    ct = volume.array
    slice_bytes = ct[0].size * 2  # int16 pixels, the tail of each file

    def dicom() -> None:
        out = np.empty(ct.shape, np.float32)
        for k, path in enumerate(files):
            data = path.read_bytes()
            out[k] = np.frombuffer(data[len(data) - slice_bytes :], np.int16).reshape(ct[0].shape)

    loaded = load_model(model, device=device)
    grid = resample(volume, loaded.card.spacing_mm, order=0)  # the model grid's geometry
    weights = resolve_model_path(model)
    patch = tuple(loaded.card.patch_size or grid.shape)
    n, batch = run["n_patches"], 32
    x = torch.zeros(batch, 1, *patch, device=device)
    threads = torch.get_num_threads()
    cpu = torch.device(device).type == "cpu"
    workers = threads if cpu else 1  # the CPU's floor: one thread's forward passes, shared out

    def forward() -> None:
        torch.set_num_threads(1 if cpu else threads)
        try:
            with torch.inference_mode():
                for _ in range(0, n, batch):
                    loaded.module(x)
            if not cpu:
                torch.cuda.synchronize()
        finally:
            torch.set_num_threads(threads)

    sizes = run["output_bytes"]
    with tempfile.TemporaryDirectory(prefix="lgc-floor-") as tmp:

        def write() -> None:
            for name, size in sizes.items():
                (Path(tmp) / name).write_bytes(bytes(size))

        floors = {
            "dicom_load": _best_of(dicom),
            "load_model": _best_of(lambda: load_file(str(weights))),
            "lung_mask": _best_of(lambda: ct < -350),
            "resample": _best_of(lambda: resample_to(volume, grid, order=0)),
            "cam": _best_of(forward, 2) / workers,
            "resample_back": _best_of(lambda: [np.zeros(ct.shape, np.float32).fill(0) for _ in range(2)]),
            "segment": _best_of(lambda: ct >= 0.5),
            "write": _best_of(write),
        }
    return floors


def _lung_mask_profile(volume: Any, top: int = 8) -> List[Dict[str, Any]]:
    """Where :func:`~LungGradCAMLib.engine.lung.lung_mask`'s time goes: the functions with the most
    time of their own (a cProfile run on the benchmark's CT)."""
    from ..engine.lung import lung_mask

    lung_mask(volume)  # imports and first-touch costs apart
    profile = cProfile.Profile()
    profile.enable()
    lung_mask(volume)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    rows = sorted(((v[2], f"{Path(k[0]).name}:{k[2]}") for k, v in stats.items()), reverse=True)[:top]
    return [{"function": name, "s": round(t, 4), "share": round(t / total, 3)} for t, name in rows]


def end_to_end(
    shape_kji: Sequence[int] = (300, 512, 512),
    spacing_mm: Sequence[float] = (0.7, 0.7, 1.0),
    device: str = "auto",
    model: str = "default",
    seed: int = 3,
    runs: int = 3,
) -> Dict[str, Any]:
    """The benchmark's report for a phantom of ``shape_kji`` (K, J, I) voxels at ``spacing_mm``
    (i, j, k): see the module docstring."""
    import multiprocessing

    from .. import phantom
    from ..io.dicom import load_dicom_series

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lgc-bench-") as tmp:
        dicom_dir = Path(tmp) / "dicom"
        t0 = time.perf_counter()
        ph = phantom.chest_ct(seed=seed, shape=tuple(shape_kji), spacing_mm=tuple(spacing_mm))
        phantom.write_dicom_series(ph.volume, dicom_dir)
        prepare = time.perf_counter() - t0
        del ph
        results = []
        context = multiprocessing.get_context("spawn")  # a fresh interpreter per run
        for n in range(runs):
            with context.Pool(1) as pool:
                results.append(
                    pool.apply(_one_run, (str(dicom_dir), str(Path(tmp) / f"out{n}"), device, model, n == 0))
                )
        load_after = os.getloadavg()
        volume = load_dicom_series(dicom_dir)
        floors = _floors(dicom_dir, volume, results[0], model, results[0]["device"])
        profile = _lung_mask_profile(volume)

    totals = [sum(r["stages_s"].values()) for r in results]
    stages = {}
    for stage in STAGES:
        values = [r["stages_s"][stage] for r in results]
        median = statistics.median(values)
        stages[stage] = {
            "median_s": round(median, 3),
            "min_s": round(min(values), 3),
            "max_s": round(max(values), 3),
            "floor_s": round(floors[stage], 3),
            "x_floor": round(median / floors[stage], 1) if floors[stage] > 0 else None,
            "floor": FLOORS[stage],
        }
    return {
        "benchmark": "end_to_end",
        "shape_kji": list(shape_kji),
        "spacing_ijk_mm": list(spacing_mm),
        "device": results[0]["device"],
        "model": model,
        "runs": runs,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "total_s": {
            "median": round(statistics.median(totals), 3),
            "min": round(min(totals), 3),
            "max": round(max(totals), 3),
            "max_over_min": round(max(totals) / min(totals), 2),
            "runs": [round(t, 3) for t in totals],
        },
        "stages": stages,
        "imports_s": [round(r["imports_s"], 3) for r in results],
        # CPU seconds of all the process's threads over the stages: what the run costs whatever
        # else runs on the machine (the wall time can be less, where threads ran side by side)
        "cpu_s": [round(r["cpu_s"], 3) for r in results],
        "peak_rss_mb": [round(r["peak_rss_mb"]) for r in results],
        "files": results[0].get("files"),
        "lung_mask_profile": profile,
        "n_patches": results[0]["n_patches"],
        "n_regions": results[0]["n_regions"],
        "phantom_and_dicom_write_s": round(prepare, 3),
    }


def format_table(report: Dict[str, Any]) -> str:
    """The report's stages as a plain-text table (median, min-max of the runs, floor, ratio)."""
    lines = [
        f"{report['runs']} runs, {'x'.join(map(str, report['shape_kji']))} on {report['device']}, "
        f"load average {report['load_average_before'][0]} -> {report['load_average_after'][0]}",
        f"{'stage':14s} {'median s':>9s} {'min-max s':>13s} {'floor s':>8s} {'x floor':>8s}",
    ]
    for stage, s in report["stages"].items():
        lines.append(
            f"{stage:14s} {s['median_s']:9.3f} {s['min_s']:6.2f}-{s['max_s']:<6.2f} {s['floor_s']:8.3f} "
            f"{s['x_floor'] if s['x_floor'] is not None else '-':>8}"
        )
    t = report["total_s"]
    lines.append(
        f"{'total':14s} {t['median']:9.3f} {t['min']:6.2f}-{t['max']:<6.2f}  (imports apart: "
        f"{', '.join(map(str, report['imports_s']))} s); peak RSS {max(report['peak_rss_mb'])} MB; "
        f"CPU {', '.join(f'{c:.1f}' for c in report['cpu_s'])} s"
    )
    return "\n".join(lines)
