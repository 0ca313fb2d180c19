"""``lunggradcam bench``: ``lunggradcam run`` timed end to end on a phantom DICOM series
(:mod:`LungGradCAMLib.pipeline.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List

from ..pipeline.bench import end_to_end, format_table
from .common import argument_type, device


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
    report = end_to_end(args.shape, args.spacing, device=args.device or "auto", model=args.model, runs=args.runs)
    print(format_table(report), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time 'lunggradcam run' end to end on a phantom DICOM series",
        description="Write a phantom CT as DICOM, then load + explain + segment + write it in "
        "--runs fresh processes: a table of the stages (median, spread, floor) on "
        "stderr, the full report as JSON on stdout.",
    )
    p.add_argument(
        "--shape",
        default=[300, 512, 512],
        metavar="KxJxI",
        type=lambda t: _numbers(t, "x", int, "three positive voxel counts K x J x I, e.g. 300x512x512"),
        help="K x J x I voxels (default 300x512x512)",
    )
    p.add_argument(
        "--spacing",
        default=[0.7, 0.7, 1.0],
        metavar="I,J,K",
        type=lambda t: _numbers(t, ",", float, "three positive voxel sizes in mm i,j,k, e.g. 0.7,0.7,1.0"),
        help="i,j,k voxel size in mm (default 0.7,0.7,1.0)",
    )
    p.add_argument("--device", default=None, type=argument_type(device), help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--model", default="default", help="model name or path")
    p.add_argument("--runs", type=int, default=3, help="runs, each in a fresh process (default 3)")
    p.set_defaults(func=_cmd_bench)
