"""End to end: CT -> lung mask -> model preprocessing -> CAM -> :class:`Explanation` -> outputs.

``explain`` is what the CLI, the Slicer module and researchers call; ``write_outputs`` writes the
files a run produces; ``run_batch`` explains a cohort, resumably, sharded under ``torchrun``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import __version__
from .atomic import atomic_path, write_text
from .errors import InvalidInputError, LungGradCAMError, ResourceError, VolumeError
from .results import Explanation, Segmentation
from .volume import Volume, crop, resample, resample_to

log = logging.getLogger(__name__)

MODES = ("auto", "sliding", "whole", "roi")
ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# device and model
# --------------------------------------------------------------------------------------------
def resolve_device(device: Any = None) -> "torch.device":  # noqa: F821
    """``None``/"auto": CUDA if available, else MPS, else CPU; otherwise ``torch.device(device)``.

    Asking for CUDA/MPS where it is not available raises :class:`InvalidInputError`.
    """
    import torch

    if device is None or str(device).lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidInputError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return dev


_MODEL_CACHE: Dict[Tuple[str, str], Any] = {}


def get_model(model: Any, device: "torch.device") -> Any:  # noqa: F821
    """A ``LoadedModel`` on ``device``: pass one through, or load a name/path once per device."""
    from .models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        if next(model.module.parameters()).device != device:
            model.module.to(device)
        return model
    key = (str(model), str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(model, device=device)
    return _MODEL_CACHE[key]


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------
@contextmanager
def _stage(timings: Dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _check_volume(volume: Any) -> Volume:
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"explain() needs a LungGradCAMLib.Volume, got {type(volume).__name__}")
    if volume.array.dtype.kind not in "iuf":
        raise VolumeError(f"the CT must hold numbers (HU); got dtype {volume.array.dtype}")
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise VolumeError("the CT has NaN or infinite voxels; fix or mask them before explaining")
    return volume


def _roi_box(roi: Any, space: Volume, patch: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
    """A (k, j, i) half-open box in ``space`` voxels from ``roi``: a bool mask on the CT grid
    (resampled already to ``space``) or ``(centre_ras_mm, size_mm)``."""
    if isinstance(roi, np.ndarray):
        if roi.shape != space.shape or not roi.any():
            raise InvalidInputError("roi mask must be a non-empty boolean array with the CT's shape")
        idx = np.nonzero(roi)
        return tuple((int(a.min()), int(a.max()) + 1) for a in idx)
    try:
        centre, size = roi
        centre = np.asarray(centre, dtype=float).reshape(3)
        size = np.broadcast_to(np.asarray(size, dtype=float), (3,))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            "roi must be a boolean mask or (centre_ras_mm (x, y, z), size_mm (one or three numbers))"
        ) from exc
    if np.any(size <= 0):
        raise InvalidInputError(f"roi size must be positive mm; got {size.tolist()}")
    c_ijk = space.ras_to_ijk_points(centre)[0]
    half = np.maximum(size / space.spacing, np.asarray(patch)[::-1]) / 2.0  # at least one patch
    lo = np.floor(c_ijk - half).astype(int)
    hi = np.ceil(c_ijk + half).astype(int)
    box = tuple((max(0, int(lo[a])), min(space.shape[2 - a], int(hi[a]))) for a in (2, 1, 0))
    if any(b <= a for a, b in box):
        raise InvalidInputError(f"roi centre {centre.tolist()} mm (RAS) lies outside the CT")
    return box


def explain(volume: Volume, model: Any = "default", method: str = "gradcam", target: Any = None,
            mode: str = "auto", roi: Any = None, lung_mask: Optional[np.ndarray] = None,
            device: Any = None, batch_size: Optional[int] = None, progress: Optional[ProgressFn] = None,
            stride: Optional[Sequence[int]] = None, amp: bool = False,
            cancel: Optional[Callable[[], bool]] = None) -> Explanation:
    """Explain ``model``'s decision on a CT ``volume`` (HU, any geometry).

    Steps: lung mask (computed unless ``lung_mask``, bool K, J, I on the CT grid, is given) ->
    resampling to the model card's spacing -> CAM, by ``mode``:

    * ``sliding``: patches of the card's patch size over the lungs' bounding box, batched; each
      patch's CAM is weighted by its score, then CAMs and scores are blended with Gaussian
      weights (patch models on whole scans);
    * ``whole``: the whole (resampled) volume in one pass (whole-volume models);
    * ``roi``: the sliding window restricted to ``roi`` — a bool mask on the CT grid, or
      ``(centre_ras_mm, size_mm)``;
    * ``auto``: ``roi`` if a roi is given, else ``whole`` for whole-volume models, else ``sliding``.

    Returns an :class:`Explanation` whose ``cam`` (float32 in [0, 1], high = important) has the
    input CT's exact geometry. The scan-level probability of the explained class is the highest
    blended patch score; ``score_map`` holds the blended scores on the CT grid.
    ``target``: class name or index to explain (default: the card's ``cam_class``).
    ``progress(done, total)`` is called per batch; ``cancel()`` returning True stops the run.
    """
    import torch

    from .cam import METHODS
    from .lung import lung_bbox
    from .lung import lung_mask as compute_lung_mask
    from .sliding import sliding_cam

    volume = _check_volume(volume)
    if mode not in MODES:
        raise InvalidInputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if method not in METHODS:
        raise InvalidInputError(f"unknown CAM method {method!r}; use one of {', '.join(METHODS)}")
    timings: Dict[str, float] = {}
    dev = resolve_device(device)
    with _stage(timings, "load_model"):
        loaded = get_model(model, dev)
    card = loaded.card
    target_index = card.class_index(target)

    with _stage(timings, "lung_mask"):
        if lung_mask is None:
            lungs = compute_lung_mask(volume)
        else:
            lungs = np.asarray(lung_mask.array if isinstance(lung_mask, Volume) else lung_mask).astype(bool)
            if lungs.shape != volume.shape:
                raise InvalidInputError(f"lung_mask shape {lungs.shape} differs from the CT's {volume.shape}")

    if card.input == "roi" and (roi is None or mode not in ("auto", "roi")):
        raise InvalidInputError(
            f"model {card.name!r} judges a region around ONE nodule, not a whole scan: give the region "
            "(roi=(centre_ras_mm, size_mm) or a mask; CLI --roi X,Y,Z,SIZE; Slicer: an ROI on the nodule)")
    if mode == "auto":
        mode = "roi" if roi is not None else ("whole" if card.patch_size is None else "sliding")
    if mode == "roi" and roi is None:
        raise InvalidInputError("mode 'roi' needs roi=(centre_ras_mm, size_mm) or a mask")

    with _stage(timings, "resample"):
        ct = volume if volume.array.dtype == np.float32 else volume.with_array(volume.array.astype(np.float32))
        space = resample(ct, card.spacing_mm, order=1, default_value=-1024.0)
        roi_space = None
        if isinstance(roi, np.ndarray):
            roi_space = resample_to(volume.with_array(roi.astype(np.uint8)), space, order=0).array > 0
        lungs_space = resample_to(volume.with_array(lungs.astype(np.uint8)), space, order=0).array > 0

    patch = tuple(card.patch_size) if card.patch_size is not None else space.shape
    if mode == "whole":
        box = tuple((0, n) for n in space.shape)
        patch = space.shape
    elif mode == "roi":
        box = _roi_box(roi_space if roi_space is not None else roi, space, patch)
        if card.input == "roi":  # one patch centred on the region: the model judges one lesion
            centre = [(a + b) // 2 for a, b in box]
            box = tuple((max(0, c - p // 2), min(n, c - p // 2 + p)) for c, p, n in zip(centre, patch, space.shape))
    else:
        if not lungs_space.any():
            raise VolumeError("no lung found in the CT: is it a chest CT in HU? Give a lung_mask or an roi")
        box = lung_bbox(lungs_space, margin_vox=[p // 4 for p in patch])

    with _stage(timings, "cam"):
        result = sliding_cam(
            loaded.module, torch.from_numpy(space.array), patch,
            stride=stride or [max(1, p // 2) for p in patch], method=method, target=target_index,
            layer=card.target_layer, roi=box, batch_size=batch_size or (8 if dev.type == "cuda" else 2),
            preprocess=loaded.prepare, progress=progress, cancel=cancel, device=dev, amp=amp,
            activation=card.activation, blend="score",
        )

    with _stage(timings, "resample_back"):
        cam_space = space.with_array(result.cam.astype(np.float32))
        cam = resample_to(cam_space, volume, order=1, default_value=0.0)
        cam.array = np.clip(cam.array, 0.0, 1.0).astype(np.float32)
        score_map = resample_to(space.with_array(result.score_map.astype(np.float32)), volume, order=1)

    p = float(result.max_score)
    probabilities = card.probabilities_from_score(target_index, p)
    predicted = max(probabilities, key=probabilities.get)
    timings["total"] = sum(timings.values())
    return Explanation(
        probabilities=probabilities, predicted_class=predicted, cam=cam, method=method,
        target_class=card.class_names[target_index], timings=timings, ct=volume, lung_mask=lungs,
        score_map=score_map,
        extra={"mode": mode, "device": str(dev), "box_model_space": [list(b) for b in box],
               "n_patches": len(result.patch_scores), "model": card.summary()},
    )


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def load_input(source: Union[str, os.PathLike], series_uid: Optional[str] = None) -> Volume:
    """A CT from a volume file (.nrrd/.nii.gz/.mha...), a DICOM folder, or a Slicer DICOM
    database (its folder holding ``ctkDICOM.sql``, or the ``.sql`` file; needs ``series_uid``
    when it holds several CT series)."""
    from .volume import SUPPORTED_SUFFIXES, read_volume

    path = Path(source)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() == ".sql" or (path / "ctkDICOM.sql").is_file():
        from .ctkdb import DicomDatabase

        db = DicomDatabase(path)
        return db.load(series_uid) if series_uid else db.load_single_ct()
    if path.is_dir():
        from .dicom import load_dicom_series

        return load_dicom_series(path, series_uid=series_uid)
    if any(path.name.lower().endswith(s) for s in SUPPORTED_SUFFIXES):
        return read_volume(path)
    from .dicom import load_dicom_series

    return load_dicom_series([path], series_uid=series_uid)


def safe_name(text: str, fallback: str = "series") -> str:
    """A file-system-safe folder name from a UID-like string (no separators, dots kept, <= 64).

    A text that is already such a name (every valid UID) is kept; any other (a part key
    ``<uid>#2``, a hostile UID holding ``../``, more than 64 characters) gets a hash of the whole
    text appended, so that two different UIDs never share a folder."""
    text = str(text)
    name = re.sub(r"[^0-9A-Za-z._-]", "_", text).strip("._")
    if name == text and len(name) <= 64:
        return name
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{name[:51] or fallback}-{digest}"


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def _versions() -> Dict[str, str]:
    import torch

    return {"lunggradcam": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


def build_report(explanation: Explanation, segmentation: Segmentation, input_desc: str = "") -> dict:
    """The JSON-able report of a run (no patient name or ID: UIDs only)."""
    ct_meta = explanation.ct.meta if explanation.ct is not None else {}
    return {
        "input": input_desc,
        "study_instance_uid": ct_meta.get("study_uid"),
        "series_instance_uid": ct_meta.get("series_uid"),
        "frame_of_reference_uid": ct_meta.get("frame_of_reference_uid"),
        "ct_shape_kji": list(explanation.cam.shape),
        "ct_spacing_ijk_mm": [float(s) for s in explanation.cam.spacing],
        "model": explanation.extra.get("model"),
        "method": explanation.method,
        "target_class": explanation.target_class,
        "predicted_class": explanation.predicted_class,
        "probabilities": explanation.probabilities,
        "mode": explanation.extra.get("mode"),
        "device": explanation.extra.get("device"),
        "threshold": segmentation.threshold,
        "regions": [r.to_dict() for r in segmentation.regions],
        "timings_s": explanation.timings,
        "versions": _versions(),
    }


def write_outputs(explanation: Explanation, segmentation: Segmentation, out_dir: Union[str, os.PathLike],
                  *, lungs: bool = True, overlay: bool = True, dicom_seg: bool = False,
                  input_desc: str = "") -> Dict[str, Path]:
    """Write a run's files into ``out_dir``: ``cam.nrrd``, ``segmentation.seg.nrrd``,
    ``lungs.seg.nrrd`` (``lungs``), ``overlay.png`` (``overlay``), ``segmentation.dcm``
    (``dicom_seg``: a DICOM Segmentation referencing the source series) and ``report.json``.

    Every file is written atomically; ``report.json`` is written last, so its presence means the
    folder is complete. Returns name -> path.
    """
    from .results import Region, Segmentation as Seg
    from .segment import write_segmentation

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    from .volume import write_volume

    written["cam"] = write_volume(explanation.cam, out / "cam.nrrd")
    written["segmentation"] = write_segmentation(segmentation, out / "segmentation.seg.nrrd")
    if lungs and explanation.lung_mask is not None:
        lung_seg = Seg(explanation.cam.with_array(explanation.lung_mask.astype(np.uint8)), [])
        written["lungs"] = write_segmentation(lung_seg, out / "lungs.seg.nrrd", names={1: "lungs"},
                                              colors={1: (0.5, 0.68, 0.5)})
    if overlay and explanation.ct is not None:
        written["overlay"] = write_overlay(explanation, segmentation, out / "overlay.png")
    report = build_report(explanation, segmentation, input_desc)
    if dicom_seg and not segmentation.regions:
        report["dicom_seg"] = "not written: no hot region above the threshold"
    elif dicom_seg:
        from .dicomseg import write_dicom_seg

        written["dicom_seg"] = write_dicom_seg(segmentation, explanation.ct, out / "segmentation.dcm")
    report["files"] = sorted(p.name for p in written.values())
    written["report"] = write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default))
    return written


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_overlay(explanation: Explanation, segmentation: Segmentation, path: Path) -> Path:
    """Axial/coronal/sagittal views through the hottest region (or the CAM peak): lung window,
    CAM colour map, region and lung contours, colour bar."""
    from .render import save_montage

    if segmentation.regions:
        centre = explanation.cam.ras_to_ijk_points(segmentation.regions[0].peak_ras)[0]
        center_ijk = tuple(int(round(c)) for c in centre)
    else:
        k, j, i = np.unravel_index(int(np.argmax(explanation.cam.array)), explanation.cam.shape)
        center_ijk = (int(i), int(j), int(k))
    contours = {"hot regions": segmentation.labelmap.array > 0}
    if explanation.lung_mask is not None:
        contours["lungs"] = explanation.lung_mask
    p = explanation.probabilities.get(explanation.target_class, 0.0)
    title = f"{explanation.method}: P({explanation.target_class}) = {p:.3f}"
    return save_montage(explanation.ct, path, center_ijk=center_ijk, contours=contours,
                        cam=explanation.cam, title=title)


# --------------------------------------------------------------------------------------------
# one scan
# --------------------------------------------------------------------------------------------
def run_one(volume: Volume, out_dir: Union[str, os.PathLike], *, model: Any = "default",
            method: str = "gradcam", threshold: Any = 0.5, roi: Any = None, device: Any = None,
            dicom_seg: bool = False, input_desc: str = "", progress: Optional[ProgressFn] = None,
            batch_size: Optional[int] = None) -> Tuple[Explanation, Segmentation, Dict[str, Path]]:
    """``explain`` + ``segment_cam`` + ``write_outputs`` for one CT."""
    from .segment import segment_cam

    explanation = explain(volume, model=model, method=method, roi=roi, device=device,
                          progress=progress, batch_size=batch_size)
    t0 = time.perf_counter()
    segmentation = segment_cam(explanation, threshold=threshold)
    explanation.timings["segment"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    files = write_outputs(explanation, segmentation, out_dir, dicom_seg=dicom_seg, input_desc=input_desc)
    explanation.timings["write"] = time.perf_counter() - t0
    return explanation, segmentation, files


def _parse_threshold(text: str) -> Any:
    """"0.5" -> 0.5, "otsu" -> "otsu", "p99" -> "p99" (percentile)."""
    try:
        return float(text)
    except ValueError:
        return text


def _parse_roi(text: Optional[str]) -> Any:
    if not text:
        return None
    try:
        nums = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        nums = []
    if len(nums) not in (4, 6):
        raise InvalidInputError(f"--roi {text!r}: give 'X,Y,Z,SIZE' or 'X,Y,Z,SX,SY,SZ' in RAS mm")
    return nums[:3], nums[3:] if len(nums) == 6 else nums[3]


def _tqdm_progress(desc: str) -> Tuple[ProgressFn, Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="batch", leave=False, disable=None)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def _add_common_options(p: "argparse.ArgumentParser") -> None:  # noqa: F821
    p.add_argument("--model", default="default", help="bundled model name or a .safetensors path (default: default)")
    p.add_argument("--method", default="gradcam",
                   help="gradcam, gradcam++, xgradcam, hirescam, layercam, scorecam, guided-gradcam")
    p.add_argument("--threshold", default="0.5", type=_parse_threshold,
                   help="CAM level in [0, 1], 'otsu', or a percentile such as p99 (default 0.5)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--batch-size", type=int, default=None, help="patches per batch (default: 8 on CUDA, 2 on CPU)")
    p.add_argument("--dicom-seg", action="store_true", help="also write a DICOM Segmentation (needs highdicom)")


def _cmd_run(args: Any) -> int:
    volume = load_input(args.input, series_uid=args.series)
    update, close = _tqdm_progress("Grad-CAM")
    try:
        explanation, segmentation, files = run_one(
            volume, args.out, model=args.model, method=args.method, threshold=args.threshold,
            roi=_parse_roi(args.roi), device=args.device, dicom_seg=args.dicom_seg,
            input_desc=str(args.input), progress=update, batch_size=args.batch_size)
    finally:
        close()
    probs = ", ".join(f"{k} {v:.3f}" for k, v in explanation.probabilities.items())
    print(f"prediction: {explanation.predicted_class} ({probs}); {len(segmentation.regions)} hot region(s); "
          f"{explanation.timings['total']:.1f} s")
    print(f"outputs in {Path(args.out).resolve()}: {', '.join(sorted(p.name for p in files.values()))}")
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("run", help="explain one CT: DICOM folder, Slicer DICOM database or volume file",
                       description="Explain one CT and write cam.nrrd, segmentation.seg.nrrd, lungs.seg.nrrd, "
                                   "overlay.png, report.json (and segmentation.dcm with --dicom-seg).")
    p.add_argument("input", help="DICOM folder, Slicer DICOM database (folder or ctkDICOM.sql), or .nrrd/.nii.gz/.mha")
    p.add_argument("--out", required=True, help="output folder (created; existing files are replaced)")
    p.add_argument("--series", default=None, help="SeriesInstanceUID when the input holds several CT series")
    p.add_argument("--roi", default=None, help="explain only a region: 'X,Y,Z,SIZE' (RAS mm), or X,Y,Z,SX,SY,SZ")
    _add_common_options(p)
    p.set_defaults(func=_cmd_run)

    b = sub.add_parser("batch", help="explain every CT series of a DICOM tree or Slicer DICOM database",
                       description="One output folder per series (named by SeriesInstanceUID) and a "
                                   "summary.csv. Resumable: finished series are skipped. Under "
                                   "'torchrun --nproc_per_node N' the series are shared among the ranks.")
    b.add_argument("source", help="DICOM folder tree, or Slicer DICOM database (folder or ctkDICOM.sql)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--redo-failed", action="store_true", help="retry series that failed in an earlier run")
    _add_common_options(b)
    b.set_defaults(func=_cmd_batch)


# --------------------------------------------------------------------------------------------
# cohort
# --------------------------------------------------------------------------------------------
SUMMARY_FIELDS = ("series_uid", "status", "predicted_class", "target_probability", "n_regions",
                  "largest_region_ml", "peak_cam", "seconds", "output", "error")


@dataclass
class _SeriesJob:
    uid: str
    load: Callable[[], Volume]


def _list_ct_series(source: Union[str, os.PathLike]) -> List[_SeriesJob]:
    """Every CT series of a DICOM tree or a Slicer DICOM database, sorted by SeriesInstanceUID."""
    path = Path(source)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".sql" or (path / "ctkDICOM.sql").is_file():
        from .ctkdb import DicomDatabase

        db = DicomDatabase(path)
        jobs = [_SeriesJob(s.series_uid, (lambda uid=s.series_uid: db.load(uid))) for s in db.ct_series()]
    else:
        from .dicom import list_dicom_series, load_dicom_series

        jobs = [_SeriesJob(s.key, (lambda files=list(s.files), key=s.key: load_dicom_series(files, key)))
                for s in list_dicom_series(path) if s.modality.upper() == "CT"]
    if not jobs:
        raise InvalidInputError(f"{path}: no CT series found")
    return sorted(jobs, key=lambda j: j.uid)


def _summary_row(uid: str, folder: Path) -> Dict[str, Any]:
    row: Dict[str, Any] = {k: "" for k in SUMMARY_FIELDS}
    row.update(series_uid=uid, output=folder.name, status="pending")
    report, error = folder / "report.json", folder / "error.json"
    if report.is_file():
        r = json.loads(report.read_text())
        regions = r.get("regions") or []
        row.update(status="done", predicted_class=r["predicted_class"],
                   target_probability=f"{r['probabilities'].get(r['target_class'], float('nan')):.4f}",
                   n_regions=len(regions),
                   largest_region_ml=f"{max((g['volume_ml'] for g in regions), default=0.0):.3f}",
                   peak_cam=f"{max((g['peak_cam'] for g in regions), default=0.0):.3f}",
                   seconds=f"{r['timings_s'].get('total', 0.0):.2f}")
    elif error.is_file():
        row.update(status="failed", error=json.loads(error.read_text()).get("error", ""))
    return row


def write_summary(jobs: Sequence[Any], out_dir: Path) -> Path:
    """``summary.csv`` from what is on disk (so it is whole after any interruption)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for job in jobs:
        writer.writerow(_summary_row(job.uid, out_dir / safe_name(job.uid)))
    return write_text(out_dir / "summary.csv", buf.getvalue())


def _dist_env() -> Tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def run_batch(source: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], *,
              model: Any = "default", method: str = "gradcam", threshold: Any = 0.5,
              device: Any = "auto", dicom_seg: bool = False, redo_failed: bool = False,
              batch_size: Optional[int] = None, show_progress: bool = True) -> Path:
    """Explain every CT series of ``source`` into ``out_dir/<SeriesInstanceUID>/``.

    Resumable: a series whose folder holds ``report.json`` is skipped; one that failed (its
    ``error.json``) is skipped unless ``redo_failed``. A failure is recorded and the rest go on.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r takes series r, r+N, ...; rank 0 writes
    ``summary.csv`` after all ranks finish. Returns the summary path.
    """
    from tqdm import tqdm

    rank, world, local_rank = _dist_env()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = _list_ct_series(source)
    if world > 1:
        import datetime

        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        if (device in (None, "auto")) and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
    mine = jobs[rank::world]
    for job in tqdm(mine, desc=f"series (rank {rank})" if world > 1 else "series", unit="series",
                    disable=not show_progress or None):
        folder = out / safe_name(job.uid)
        if (folder / "report.json").is_file() or ((folder / "error.json").is_file() and not redo_failed):
            continue
        for stale in folder.glob(".tmp-*"):  # left by a run that was killed mid-write
            stale.unlink()
        try:
            run_one(job.load(), folder, model=model, method=method, threshold=threshold, device=device,
                    dicom_seg=dicom_seg, input_desc=f"series {job.uid}", batch_size=batch_size)
            (folder / "error.json").unlink(missing_ok=True)
        except Exception as exc:  # noqa: BLE001 - one bad series must not stop the cohort
            log.warning("series %r failed: %r", job.uid, str(exc))  # repr: no raw control characters
            info = {"series_uid": job.uid, "error": str(exc), "type": type(exc).__name__,
                    "user_error": isinstance(exc, LungGradCAMError)}
            write_text(folder / "error.json", json.dumps(info, indent=2))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    summary = out / "summary.csv"
    if rank == 0:
        summary = write_summary(jobs, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _cmd_batch(args: Any) -> int:
    summary = run_batch(args.source, args.out, model=args.model, method=args.method,
                        threshold=args.threshold, device=args.device, dicom_seg=args.dicom_seg,
                        redo_failed=args.redo_failed, batch_size=args.batch_size)
    if _dist_env()[0] == 0:
        with open(summary, newline="") as fh:
            rows = list(csv.DictReader(fh))
        done = sum(r["status"] == "done" for r in rows)
        failed = [r for r in rows if r["status"] == "failed"]
        print(f"{done} of {len(rows)} series done, {len(failed)} failed; summary: {summary}")
        return 1 if failed else 0
    return 0
