"""``lunggradcam run``: explain one CT."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.atomic import check_output_folder
from ..core.errors import InvalidInputError
from ..io.inputs import check_input, input_tree, is_volume_file
from ..pipeline.cost import CostEstimate
from ..pipeline.explainer import check_options
from ..pipeline.outputs import OUTPUT_FILES, intended_use, outcome, run_one
from .common import (
    add_explain_options,
    cli_progress,
    emit_json,
    json_progress,
    options_from_args,
    print_estimate,
    print_regions,
)


def _cmd_run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    path = check_input(args.input, args.series)
    check_output_folder(args.out, [input_tree(path)], OUTPUT_FILES)  # before any work: an unusable --out fails now
    if args.dicom_seg and is_volume_file(path):
        raise InvalidInputError(
            f"--dicom-seg needs a DICOM input (its segments reference the CT's slices); "
            f"{path} is a volume file: leave out --dicom-seg"
        )
    check_options(options)  # model, target class, layer and device, before the CT is read
    if args.progress == "json":
        update, close, on_estimate = json_progress, (lambda: None), _json_estimate(args.max_estimate)
    else:
        (update, close), on_estimate = cli_progress(options.method), _limited(print_estimate, args.max_estimate)
    try:
        explanation, segmentation, files = run_one(
            args.input,
            args.out,
            options,
            series_uid=args.series,
            dicom_seg=args.dicom_seg,
            volume_format=args.volume_format,
            input_desc=str(args.input),
            progress=update,
            started=getattr(args, "started", None),
            on_estimate=on_estimate,
            overlay=args.overlay,
            lungs=args.lungs,
        )
    finally:
        close()
    if args.progress == "json":
        emit_json(
            "done",
            out=str(Path(args.out).resolve()),
            files=sorted(p.name for p in files.values()),
            outcome=outcome(segmentation),
            seconds=explanation.timings["total"],
        )
        return 0
    probs = ", ".join(f"{k} {v:.3f}" for k, v in explanation.probabilities.items())
    print(
        f"prediction: {explanation.predicted_class} ({probs}); {outcome(segmentation)}; "
        f"{explanation.timings['total']:.1f} s"
    )
    print_regions(segmentation)
    print(f"outputs in {Path(args.out).resolve()}: {', '.join(sorted(p.name for p in files.values()))}")
    print(intended_use(explanation))
    return 0


def _limited(announce: Callable[[CostEstimate], None], limit: Optional[float]) -> Callable[[CostEstimate], bool]:
    """``on_estimate``: announce the cost, and stop before the heat map when it is over ``limit`` s."""

    def on_estimate(estimate: CostEstimate) -> bool:
        announce(estimate)
        return limit is None or estimate.seconds <= limit

    return on_estimate


def _json_estimate(limit: Optional[float]) -> Callable[[CostEstimate], bool]:
    """``--progress json``'s ``on_estimate``: the estimate as a line (``stopped`` when over ``limit``)."""

    def announce(estimate: CostEstimate) -> None:
        emit_json(
            "estimate",
            method=estimate.method,
            patches=estimate.patches,
            passes=estimate.passes,
            seconds=estimate.seconds,
            text=str(estimate),
            stopped=limit is not None and estimate.seconds > limit,
        )

    return _limited(announce, limit)


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="explain one CT: DICOM folder, Slicer DICOM database or volume file",
        description="Explain one CT and write cam.nrrd, segmentation.seg.nrrd, lungs.seg.nrrd, "
        "overlay.png, report.json (and segmentation.dcm with --dicom-seg). Every "
        "option of the Slicer panel is here.",
    )
    p.add_argument("input", help="DICOM folder, Slicer DICOM database (folder or ctkDICOM.sql), or .nrrd/.nii.gz/.mha")
    p.add_argument(
        "--out",
        required=True,
        help="output folder, outside the input (created; a previous run's "
        "outputs there are replaced; one holding other files is refused)",
    )
    p.add_argument("--series", default=None, help="SeriesInstanceUID when the input holds several CT series")
    add_explain_options(p, roi=True)
    p.add_argument(
        "--progress",
        choices=("bar", "json"),
        default="bar",
        help="bar: a progress line on stderr (default); json: one JSON object a line on stdout "
        '({"event": "progress"|"estimate"|"done", ...}), for a program running this '
        "command (the Slicer module does)",
    )
    p.add_argument(
        "--max-estimate",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop before the heat map when its estimated cost is over SECONDS (exit status 2, nothing written)",
    )
    p.set_defaults(func=_cmd_run)
