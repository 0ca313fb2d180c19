"""What the commands share: argparse ``type=`` checks of the explanation options (every option is
checked as it is parsed), the options themselves, the progress line and the cost announcement."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, List, Optional, Tuple

from ..core.errors import InvalidInputError
from ..core.results import Region, Segmentation
from ..engine.methods import TABLE
from ..options import (
    DEFAULTS,
    METHODS,
    MODES,
    SCALES,
    ExplainOptions,
    parse_count,
    parse_device,
    parse_roi,
    parse_stride,
    parse_threshold,
)
from ..pipeline.cost import CostEstimate
from ..pipeline.outlines import outline_text
from ..pipeline.outputs import VOLUME_FORMATS
from ..pipeline.stages import STAGES, Progress


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a parser of :mod:`LungGradCAMLib.options`: its message, at parse time."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.replace("parse_", "")
    return convert


def batch_size(text: str) -> int:
    """``--batch-size``: :func:`~LungGradCAMLib.options.parse_count`, but 0 (automatic) is no value to type."""
    value = parse_count(text, "batch size")
    if value is None:
        raise InvalidInputError(f"batch size {text!r}: give a positive whole number of patches")
    return value


#: ``--device``'s check (every command's), the options' own.
device = parse_device

#: ``--roi``'s value may start with "-" (a negative RAS coordinate): cli.main joins it to the option.
NEGATIVE_VALUE_OPTIONS = ("--roi",)


def add_explain_options(p: argparse.ArgumentParser, *, roi: bool) -> None:
    """The options of an explanation (:class:`ExplainOptions`) and of its outputs, checked as parsed."""
    g = p.add_argument_group("explanation (as the Slicer panel)")
    g.add_argument(
        "--model",
        default=DEFAULTS["model"],
        help=f"bundled model name or a .safetensors path (default: {DEFAULTS['model']})",
    )
    g.add_argument(
        "--method",
        default=DEFAULTS["method"],
        choices=METHODS,
        metavar="METHOD",
        help="CAM method: " + ", ".join(METHODS) + " (default: the model card's; gradcam for the default model)",
    )
    g.add_argument(
        "--target", default=DEFAULTS["target"], help="class to explain, a name or an index (default: the model card's)"
    )
    g.add_argument(
        "--layer", default=DEFAULTS["layer"], help="CAM layer, a dotted module name (default: the model card's)"
    )
    g.add_argument(
        "--mode",
        default=DEFAULTS["mode"],
        choices=MODES,
        help=f"sliding (patches over the lungs), whole (whole-volume models), roi, or auto "
        f"(default: {DEFAULTS['mode']})",
    )
    if roi:
        g.add_argument(
            "--roi",
            default=DEFAULTS["roi"],
            type=argument_type(parse_roi),
            metavar="X,Y,Z,SIZE",
            help="explain only a region: 'X,Y,Z,SIZE' or 'X,Y,Z,SX,SY,SZ' (RAS mm; negative values are fine)",
        )
    g.add_argument(
        "--region-model",
        default=DEFAULTS["region_model"],
        metavar="MODEL",
        help="also ask a region model (e.g. lidc-malignancy) about each hot region; its answer is "
        "in the report's regions (second_opinion) and summary",
    )
    g.add_argument(
        "--threshold",
        default=DEFAULTS["threshold"],
        type=argument_type(parse_threshold),
        help=f"heat-map level in [0, 1], 'otsu', or a percentile such as p99 (default {DEFAULTS['threshold']})",
    )
    g.add_argument(
        "--scale",
        default=DEFAULTS["scale"],
        choices=SCALES,
        help="absolute (default): a heat-map level means the same on every CT (patch probability x "
        "the patch's scaled map, never rescaled), so a CT the model finds nothing in has no hot "
        "region; relative: the same map scaled to a maximum of 1 on each CT",
    )
    g.add_argument(
        "--restrict-to-lungs",
        default=DEFAULTS["restrict_to_lungs"],
        action=argparse.BooleanOptionalAction,
        help="keep only hot regions inside the lungs (default: yes)",
    )
    g.add_argument(
        "--chest-check",
        default=DEFAULTS["chest_check"],
        action=argparse.BooleanOptionalAction,
        help="refuse a CT that holds no lungs before computing (default: yes)",
    )
    g.add_argument(
        "--device",
        default=DEFAULTS["device"],
        type=argument_type(device),
        help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps",
    )
    g.add_argument(
        "--batch-size",
        type=argument_type(batch_size),
        default=DEFAULTS["batch_size"],
        help="patches per model call (default: 8 on a GPU; on the CPU as many as fit in about "
        "1 M voxels, at most 32: 32 for the bundled models)",
    )
    g.add_argument(
        "--stride",
        default=DEFAULTS["stride"],
        type=argument_type(parse_stride),
        metavar="K[,J,I]",
        help="sliding-window step in model voxels (default: half a patch)",
    )
    g.add_argument("--amp", action="store_true", help="16-bit mixed precision on CUDA")
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--format",
        dest="volume_format",
        default="nrrd",
        choices=VOLUME_FORMATS,
        help="heat map, regions and lungs as .nrrd + Slicer .seg.nrrd (default) or as NIfTI .nii.gz",
    )
    o.add_argument(
        "--dicom-seg",
        action="store_true",
        help="also write segmentation.dcm, a DICOM Segmentation of the regions (DICOM input only)",
    )
    o.add_argument(
        "--overlay", default=True, action=argparse.BooleanOptionalAction, help="write overlay.png (default: yes)"
    )
    o.add_argument(
        "--lungs",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="write the lung mask, lungs.seg.nrrd (default: yes)",
    )


def options_from_args(args: argparse.Namespace) -> ExplainOptions:
    """The :class:`ExplainOptions` of parsed command-line arguments."""
    return ExplainOptions(
        model=args.model,
        method=args.method,
        target=args.target,
        layer=args.layer,
        mode=args.mode,
        roi=getattr(args, "roi", None),
        threshold=args.threshold,
        scale=args.scale,
        restrict_to_lungs=args.restrict_to_lungs,
        chest_check=args.chest_check,
        device=args.device,
        batch_size=args.batch_size,
        stride=args.stride,
        amp=args.amp,
        region_model=args.region_model,
    )


def args_from_options(options: ExplainOptions) -> List[str]:
    """The command-line arguments of ``run`` that give ``options`` (the inverse of
    :func:`options_from_args`): how the Slicer module hands its settings to ``lunggradcam run`` in
    a background process. The model and region model must be names or paths, the roi a box."""
    import numpy as np

    o = options
    for name, value in (("model", o.model), ("region_model", o.region_model)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise InvalidInputError(f"{name}: a loaded model cannot be passed to a command; give its name or path")
    if isinstance(o.roi, np.ndarray):
        raise InvalidInputError("a roi mask cannot be passed to a command; give (centre_ras_mm, size_mm)")
    args = ["--model", str(o.model), "--mode", o.mode, "--threshold", str(o.threshold), "--scale", o.scale]
    for flag, value in (
        ("--method", o.method),
        ("--target", o.target),
        ("--layer", o.layer),
        ("--device", o.device),
        ("--batch-size", o.batch_size),
        ("--region-model", o.region_model),
    ):
        if value is not None:
            args += [flag, str(value)]
    if o.stride is not None:
        args += ["--stride", ",".join(str(s) for s in o.stride)]
    if o.roi is not None:
        args.append("--roi=" + ",".join(f"{v:.6g}" for v in (*o.roi[0], *o.roi[1])))
    args += [] if o.restrict_to_lungs else ["--no-restrict-to-lungs"]
    args += [] if o.chest_check else ["--no-chest-check"]
    return args + (["--amp"] if o.amp else [])


def emit_json(event: str, **fields: Any) -> None:
    """One machine-readable line on stdout (``--progress json``): ``{"event": ..., ...}``."""
    print(json.dumps({"event": event, **fields}), flush=True)


def json_progress(stage: str, done: int, total: int) -> None:
    """``--progress json``: each progress report as a line ``{"event": "progress", "stage": ...,
    "done": ..., "total": ...}`` (stages as :data:`STAGES` names them)."""
    emit_json("progress", stage=stage, done=done, total=total)


def cli_progress(method: Optional[str]) -> Tuple[Progress, Callable[[], None]]:
    """A tqdm line on stderr naming the current stage (the heat map counted in patches)."""
    from tqdm import tqdm

    bar = tqdm(total=1, leave=False, disable=None, bar_format="{desc}: {n}/{total} {unit} [{elapsed}]")
    current = [""]

    def update(stage: str, done: int, total: int) -> None:
        if stage != current[0]:
            current[0] = stage
            bar.set_description_str(
                STAGES[stage] + (f" ({method})" if stage == "cam" and method else ""), refresh=False
            )
            bar.unit = "patches" if stage == "cam" else "steps"
            bar.reset(total=total)
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def print_estimate(estimate: CostEstimate) -> None:
    """The CLI's announcement of a long CAM stage (a masked method, Score-CAM, always; others from
    30 s), on stderr."""
    if TABLE[estimate.method].masked or estimate.seconds >= 30:
        print(f"estimated cost: {estimate}", file=sys.stderr, flush=True)


def region_fields(region: Region) -> List[str]:
    """What a command prints of one hot region, in order: volume (ml), centroid (RAS mm), peak heat
    (0..1), mean HU, when a region model was asked its answer, and the nodule outline's measurements
    where the region has one. Add a field here and every
    command that lists regions prints it."""
    fields = [
        f"{region.volume_ml:.2f} ml",
        "centre RAS (" + ", ".join(f"{c:.1f}" for c in region.centroid_ras) + ") mm",
        f"peak {region.peak_cam:.2f}",
    ]
    if region.mean_hu is not None:
        fields.append(f"mean {region.mean_hu:.0f} HU")
    if region.second_opinion:
        o = region.second_opinion
        fields.append(f"{o['model']} P({o['target_class']}) = {o['probability']:.3f}")
    if region.outline:
        fields.append(outline_text(region.outline))
    return fields


def print_regions(segmentation: Segmentation, indent: str = "  ") -> None:
    """One line per hot region (hottest first): its name and :func:`region_fields`."""
    for region in segmentation.regions:
        print(f"{indent}{region.name}: " + ", ".join(region_fields(region)))
