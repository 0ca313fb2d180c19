"""A run's outputs: the report, the heat map, regions and lungs as files, the overlay; and
:func:`run_one`, all ``lunggradcam run`` does."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from ..core.atomic import output_folder, read_record, signals_held, write_json
from ..core.errors import InvalidInputError, OutputError
from ..core.results import Explanation, Segmentation
from ..core.volume import Volume
from ..io.inputs import input_tree, load_input
from ..options import ExplainOptions
from .cost import CostEstimate
from .regions import explain_and_segment
from .stages import Progress, Stages

#: Volume file formats a run can write (``cam``, ``lungs`` and the region labelmap).
VOLUME_FORMATS = ("nrrd", "nii.gz")
#: Every file a run (and a batch, for a series) may leave in its output folder: the marker that
#: proves which files there are LungGradCAM's may name no other (``core.atomic``).
OUTPUT_FILES = frozenset(
    {
        "cam.nrrd",
        "segmentation.seg.nrrd",
        "lungs.seg.nrrd",
        "cam.nii.gz",
        "segmentation.nii.gz",
        "lungs.nii.gz",
        "overlay.png",
        "segmentation.dcm",
        "report.json",
        "error.json",
    }
)
#: What the report and every output say when the heat map has no region above the threshold.
NO_REGION = "no region above threshold"


def _versions() -> Dict[str, str]:
    import torch

    return {
        "lunggradcam": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def intended_use(explanation: Explanation) -> str:
    """The model card's intended use (e.g. "... not for clinical use"), as every output shows it."""
    from ..engine.models.card import NOT_CLINICAL

    return explanation.model.get("intended_use") or NOT_CLINICAL


def outcome(segmentation: Segmentation) -> str:
    """ "N hot region(s)" or :data:`NO_REGION` with the level and the heat map's highest value
    (e.g. "no region above threshold 0.50 (highest heat 0.23)"), as the outputs state it."""
    n = len(segmentation.regions)
    if n:
        return f"{n} hot region{'s' if n != 1 else ''}"
    level = "" if segmentation.threshold is None else f" {segmentation.threshold:.2f}"
    # rounded down, so a heat map just below the threshold never reads as reaching it
    peak = "" if segmentation.peak is None else f" (highest heat {np.floor(segmentation.peak * 100) / 100:.2f})"
    return NO_REGION + level + peak


def build_report(explanation: Explanation, segmentation: Segmentation, input_desc: str = "") -> dict:
    """The JSON-able report of a run (no patient name or ID: UIDs only)."""
    ct_meta = explanation.ct.meta if explanation.ct is not None else {}
    return {
        "intended_use": intended_use(explanation),
        "input": input_desc,
        "study_instance_uid": ct_meta.get("study_uid"),
        "series_instance_uid": ct_meta.get("series_uid"),
        "frame_of_reference_uid": ct_meta.get("frame_of_reference_uid"),
        "ct_shape_kji": list(explanation.cam.shape),
        "ct_spacing_ijk_mm": [float(s) for s in explanation.cam.spacing],
        "model": explanation.model,
        "options": explanation.options,
        "method": explanation.method,
        "layer": explanation.layer,
        "target_class": explanation.target_class,
        "predicted_class": explanation.predicted_class,
        "probabilities": explanation.probabilities,
        "mode": explanation.mode,
        "n_patches": explanation.n_patches,
        "device": explanation.device_used or explanation.device,
        "device_requested": explanation.device,
        "chest_check": explanation.chest_check,
        "region_model": explanation.options.get("region_model"),
        "threshold": segmentation.threshold,
        "peak_heat": segmentation.peak,
        "outcome": outcome(segmentation),
        "regions": [r.to_dict() for r in segmentation.regions],
        "timings_s": explanation.timings,
        "versions": _versions(),
    }


def write_outputs(
    explanation: Explanation, segmentation: Segmentation, out_dir: Union[str, os.PathLike], **options: Any
) -> Dict[str, Path]:
    """Write a run's files into ``out_dir``: ``cam.nrrd``, ``segmentation.seg.nrrd``,
    ``lungs.seg.nrrd`` (``lungs``), ``overlay.png`` (``overlay``), ``segmentation.dcm``
    (``dicom_seg``: a DICOM Segmentation referencing the source series) and ``report.json``
    (strict JSON, its ``files`` listing the others); ``options`` are those of :func:`_write_files`
    (with ``volume_format="nii.gz"`` the heat map, the regions and the lungs are NIfTI files).

    The run owns ``out_dir`` (:func:`~LungGradCAMLib.core.atomic.output_folder`): a second run into it
    at the same time is refused, and a folder holding anything its marker does not prove a run
    wrote is refused. The files are written into a staging folder inside it and, once all are
    written, replace the previous run's outputs, report last, so ``report.json`` always describes
    the files beside it; on an error nothing changes.
    Returns name -> path.
    """
    final = Path(out_dir)
    try:
        with output_folder(final, names=OUTPUT_FILES) as staging:
            written = _write_files(explanation, segmentation, staging, **options)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: the run's files are gone
        raise OutputError(
            f"{final}: cannot write the outputs ({exc.strerror or exc}); free space or choose another output folder"
        ) from None
    return {name: final / path.name for name, path in written.items()}


def _write_files(
    explanation: Explanation,
    segmentation: Segmentation,
    out: Path,
    *,
    lungs: bool = True,
    overlay: bool = True,
    dicom_seg: bool = False,
    input_desc: str = "",
    volume_format: str = "nrrd",
    started: Optional[float] = None,
    progress: Optional[Progress] = None,
    report_extra: Optional[dict] = None,
) -> Dict[str, Path]:
    """The files of :func:`write_outputs`, written into the folder ``out``, ``report.json`` last.
    The other files are written at the same time, one thread each: their compression (zlib) runs
    outside the GIL, beside the overlay's rendering. ``volume_format="nii.gz"``: the heat map, the
    regions (labelled as the report's regions), the nodule outlines (``outlines``, labelled as
    ``Outline.label``) and the lungs as NIfTI files. The report's
    ``timings_s`` gets ``write`` and, when ``started`` (a ``time.perf_counter()`` value) is given,
    ``total`` = the wall time since then; ``report_extra`` adds fields to it."""
    from concurrent.futures import ThreadPoolExecutor

    from ..core.results import Segmentation as Seg
    from ..io.segnrrd import write_segmentation
    from ..io.volume_files import write_volume

    if volume_format not in VOLUME_FORMATS:
        raise InvalidInputError(f"volume format {volume_format!r}: use one of {', '.join(VOLUME_FORMATS)}")
    timings = explanation.timings
    t0 = time.perf_counter()
    lung_labels = (
        None
        if not lungs or explanation.lung_mask is None
        else explanation.cam.with_array(np.asarray(explanation.lung_mask, dtype=bool).view(np.uint8))
    )
    jobs: Dict[str, Callable[[], Path]] = {"cam": lambda: write_volume(explanation.cam, out / f"cam.{volume_format}")}
    if volume_format == "nrrd":
        jobs["segmentation"] = lambda: write_segmentation(segmentation, out / "segmentation.seg.nrrd")
        if lung_labels is not None:
            jobs["lungs"] = lambda: write_segmentation(
                Seg(lung_labels, []), out / "lungs.seg.nrrd", names={1: "lungs"}, colors={1: (0.5, 0.68, 0.5)}
            )
    else:
        jobs["segmentation"] = lambda: write_volume(segmentation.labelmap, out / f"segmentation.{volume_format}")
        if segmentation.outlines:  # they overlap the regions: a labelmap of their own
            jobs["outlines"] = lambda: write_volume(
                segmentation.labelmap.with_array(segmentation.outline_labels()), out / f"outlines.{volume_format}"
            )
        if lung_labels is not None:
            jobs["lungs"] = lambda: write_volume(lung_labels, out / f"lungs.{volume_format}")
    if overlay and explanation.ct is not None:
        jobs["overlay"] = lambda: write_overlay(explanation, segmentation, out / "overlay.png")
    with Stages(timings, progress)("write"):
        report = {**build_report(explanation, segmentation, input_desc), **(report_extra or {})}
        if dicom_seg and not segmentation.regions:
            report["dicom_seg"] = f"not written: {NO_REGION}"
        elif dicom_seg:
            from ..io.dicomseg import write_dicom_seg

            jobs["dicom_seg"] = lambda: write_dicom_seg(
                segmentation,
                explanation.ct,
                out / "segmentation.dcm",
                method=explanation.method,
                intended_use=intended_use(explanation),
            )
        with ThreadPoolExecutor(len(jobs), thread_name_prefix="lgc-write") as pool:
            with signals_held():  # every writer is started, and so joined, before a SIGTERM is raised
                futures = {name: pool.submit(job) for name, job in jobs.items()}
            written = {name: future.result() for name, future in futures.items()}
        report["files"] = sorted(p.name for p in written.values()) + ["report.json"]
        assert set(report["files"]) <= OUTPUT_FILES, f"name the new output in OUTPUT_FILES: {report['files']}"
        now = time.perf_counter()
        report["timings_s"] = {**timings, "write": timings.get("write", 0.0) + now - t0}
        if started is not None:
            report["timings_s"]["total"] = now - started
        written["report"] = write_json(out / "report.json", report, default=_json_default)
    if started is not None:
        timings["total"] = time.perf_counter() - started
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


#: overlay.png shows zoomed views of at most this many hot regions (the hottest).
OVERLAY_REGIONS = 6


def write_overlay(explanation: Explanation, segmentation: Segmentation, path: Path) -> Path:
    """Axial/coronal/sagittal views through the hottest region (or the CAM peak), then a row of
    zoomed views through each hot region (the :data:`OVERLAY_REGIONS` hottest): lung window, CAM
    colour map (only inside the lungs when the run kept regions there), region, nodule outline and lung contours,
    a colour bar that states the scale and marks the threshold; the title states the prediction and
    the outcome, the caption the model's intended use. A thin slab's coronal and sagittal views are
    stretched to stay readable."""
    from ..io.render import ZoomView, save_montage

    if segmentation.regions:
        centre = explanation.cam.ras_to_ijk_points(segmentation.regions[0].peak_ras)[0]
        center_ijk = tuple(int(round(c)) for c in centre)
    else:
        k, j, i = np.unravel_index(int(np.argmax(explanation.cam.array)), explanation.cam.shape)
        center_ijk = (int(i), int(j), int(k))
    contours = {"hot regions": segmentation.labelmap.array}  # non-zero = inside; cast per drawn slice
    if segmentation.outlines:
        contours["nodule outline"] = segmentation.outline_labels()
    if explanation.lung_mask is not None:
        contours["lungs"] = explanation.lung_mask
    p = explanation.probabilities.get(explanation.target_class, 0.0)
    shown = segmentation.regions[:OVERLAY_REGIONS]
    title = f"{explanation.method}: P({explanation.target_class}) = {p:.3f}; {outcome(segmentation)}" + (
        f" ({len(shown)} hottest shown)" if len(segmentation.regions) > len(shown) else ""
    )
    zooms = [
        ZoomView(
            f"{r.name} ({r.volume_ml:.2f} ml, peak {r.peak_cam:.2f})",
            tuple(int(round(c)) for c in explanation.cam.ras_to_ijk_points(r.peak_ras)[0]),
            r.bbox_ijk,
        )
        for r in shown
    ]
    in_lungs = explanation.lung_mask if explanation.options.get("restrict_to_lungs", True) else None
    return save_montage(
        explanation.ct,
        path,
        center_ijk=center_ijk,
        contours=contours,
        cam=explanation.cam,
        cam_label=scale_text(explanation),
        cam_threshold=segmentation.threshold,
        cam_mask=in_lungs,
        zooms=zooms,
        title=title,
        caption="Research model. " + intended_use(explanation),
    )


def scale_text(explanation: Explanation) -> str:
    """What a heat-map value means, in a few words (the overlay's colour bar, the Slicer panel)."""
    if explanation.options.get("scale", "absolute") == "relative":
        return "heat, relative: this CT's maximum = 1"
    return f"heat = P({explanation.target_class}) x map, absolute: same on every CT"


def read_run(out_dir: Union[str, os.PathLike]) -> Tuple[Explanation, Segmentation]:
    """A finished run's results read back from its folder (``report.json``, the heat map and the
    regions' labelmap, in either volume format): what the Slicer module shows after running
    ``lunggradcam run`` in a background process. The CT and the lung mask are not read back
    (``explanation.ct`` and ``lung_mask`` are None). Raises :class:`OutputError` when the folder
    holds no complete run."""
    from ..core.results import Region
    from ..io.volume_files import read_volume

    folder = Path(out_dir)
    try:
        report = read_record(folder, "report.json", OUTPUT_FILES)  # only a report this program wrote there
        if report is None:
            raise OSError("no report.json that a LungGradCAM run wrote")
        names = set(report["files"])
        cam_name = next(n for n in names if n.startswith("cam."))
        labels_name = next(n for n in names if n.startswith("segmentation.") and n != "segmentation.dcm")
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise OutputError(f"{folder}: no complete LungGradCAM run there ({exc}); run it again") from None
    options = report.get("options") or {}
    explanation = Explanation(
        probabilities=report["probabilities"],
        predicted_class=report["predicted_class"],
        cam=read_volume(folder / cam_name),
        method=report["method"],
        target_class=report["target_class"],
        timings=report.get("timings_s", {}),
        mode=report.get("mode", ""),
        layer=report.get("layer", ""),
        n_patches=report.get("n_patches", 0),
        device=report.get("device_requested", ""),
        device_used=report.get("device", ""),
        model=report.get("model", {}),
        chest_check=report.get("chest_check"),
        options=options,
    )
    labelmap = read_volume(folder / labels_name)
    regions = [Region.from_dict(r) for r in report.get("regions", [])]
    return explanation, Segmentation(labelmap, regions, report.get("threshold"), report.get("peak_heat"))


# --------------------------------------------------------------------------------------------
# one scan
# --------------------------------------------------------------------------------------------
Source = Union[Volume, str, os.PathLike, Callable[[], Volume]]


def run_one(
    source: Source,
    out_dir: Union[str, os.PathLike],
    options: Optional[ExplainOptions] = None,
    *,
    series_uid: Optional[str] = None,
    dicom_seg: bool = False,
    volume_format: str = "nrrd",
    input_desc: str = "",
    progress: Optional[Progress] = None,
    cancel: Optional[Callable[[], bool]] = None,
    report_extra: Optional[dict] = None,
    started: Optional[float] = None,
    on_estimate: Optional[Callable[["CostEstimate"], Optional[bool]]] = None,
    inputs: Sequence[Union[str, os.PathLike]] = (),
    overlay: bool = True,
    lungs: bool = True,
) -> Tuple[Explanation, Segmentation, Dict[str, Path]]:
    """Load (a path, with ``series_uid``; a callable returning a Volume; or a Volume as is),
    explain, segment and write one CT with ``options`` (default: ``ExplainOptions()``).

    ``out_dir`` is checked and owned before the work (it may not be, hold or lie inside the source
    path or one of ``inputs``, the paths the CT came from). ``explanation.timings`` (and the report's
    ``timings_s``) hold every stage, loading and writing included, and ``total``: the wall time
    since ``started`` (a ``time.perf_counter()`` value; default: the start of this call). With
    ``started`` given, ``startup`` is the time from it to this call (for ``lunggradcam run``: the
    imports and the option checks). ``on_estimate``: see :func:`explain`. ``overlay``, ``lungs``:
    write ``overlay.png`` and the lung mask."""
    timings: Dict[str, float] = {}
    if started is None:
        started = time.perf_counter()
    else:
        timings["startup"] = time.perf_counter() - started
    options = ExplainOptions() if options is None else options
    stage = Stages(timings, progress, cancel)
    if isinstance(source, (str, os.PathLike)):
        inputs = [input_tree(source), *inputs]
    with output_folder(out_dir, inputs, OUTPUT_FILES):
        with stage("load"):
            if isinstance(source, Volume):
                volume = source
            elif callable(source):
                volume = source()
            else:
                volume = load_input(source, series_uid=series_uid, progress=stage.counter("load"))
        explanation, segmentation = explain_and_segment(
            volume, options, progress=progress, cancel=cancel, on_estimate=on_estimate
        )
        explanation.timings = {**timings, **{k: v for k, v in explanation.timings.items() if k != "total"}}
        files = write_outputs(
            explanation,
            segmentation,
            out_dir,
            dicom_seg=dicom_seg,
            volume_format=volume_format,
            input_desc=input_desc,
            started=started,
            progress=progress,
            report_extra=report_extra,
            overlay=overlay,
            lungs=lungs,
        )
    return explanation, segmentation, files
