"""``lunggradcam run``: explain one CT."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.atomic import check_output_folder
from ..core.errors import InvalidInputError
from ..io.inputs import check_input, is_volume_file
from ..pipeline.explainer import check_options
from ..pipeline.outputs import intended_use, outcome, run_one
from .common import (add_explain_options, cli_progress, options_from_args, print_estimate, print_outlines,
                     print_second_opinions)


def _cmd_run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    path = check_input(args.input, args.series)
    check_output_folder(args.out, [args.input])  # before any work: an unusable --out fails now, not at the end
    if args.dicom_seg and is_volume_file(path):
        raise InvalidInputError(f"--dicom-seg needs a DICOM input (its segments reference the CT's slices); "
                                f"{path} is a volume file: leave out --dicom-seg")
    check_options(options)  # model, target class, layer and device, before the CT is read
    update, close = cli_progress(options.method)
    try:
        explanation, segmentation, files = run_one(
            args.input, args.out, options, series_uid=args.series, dicom_seg=args.dicom_seg,
            volume_format=args.volume_format, input_desc=str(args.input), progress=update,
            started=getattr(args, "started", None), on_estimate=print_estimate)
    finally:
        close()
    probs = ", ".join(f"{k} {v:.3f}" for k, v in explanation.probabilities.items())
    print(f"prediction: {explanation.predicted_class} ({probs}); {outcome(segmentation)}; "
          f"{explanation.timings['total']:.1f} s")
    print_second_opinions(segmentation)
    print_outlines(segmentation)
    print(f"outputs in {Path(args.out).resolve()}: {', '.join(sorted(p.name for p in files.values()))}")
    print(intended_use(explanation))
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("run", help="explain one CT: DICOM folder, Slicer DICOM database or volume file",
                       description="Explain one CT and write cam.nrrd, segmentation.seg.nrrd, lungs.seg.nrrd, "
                                   "overlay.png, report.json (and segmentation.dcm with --dicom-seg). Every "
                                   "option of the Slicer panel is here.")
    p.add_argument("input", help="DICOM folder, Slicer DICOM database (folder or ctkDICOM.sql), or .nrrd/.nii.gz/.mha")
    p.add_argument("--out", required=True, help="output folder (created; a previous run's outputs there are "
                                                "replaced; one holding other files is refused)")
    p.add_argument("--series", default=None, help="SeriesInstanceUID when the input holds several CT series")
    add_explain_options(p, roi=True)
    p.set_defaults(func=_cmd_run)
