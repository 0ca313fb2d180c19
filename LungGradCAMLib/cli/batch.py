"""``lunggradcam batch``: explain every CT series of a DICOM tree or Slicer DICOM database."""

from __future__ import annotations

import argparse
import csv
from typing import Any

from ..pipeline.batch import run_batch
from .common import add_explain_options, options_from_args, print_estimate


def _cmd_batch(args: argparse.Namespace) -> int:
    skipped: dict = {}
    summary = run_batch(
        args.source,
        args.out,
        options_from_args(args),
        dicom_seg=args.dicom_seg,
        volume_format=args.volume_format,
        redo_failed=args.redo_failed,
        on_estimate=print_estimate,
        skipped=skipped,
        overlay=args.overlay,
        lungs=args.lungs,
    )
    from ..engine.distributed import torchrun_env

    if torchrun_env()[0] == 0:  # rank 0 wrote the summary
        with open(summary, newline="") as fh:
            rows = list(csv.DictReader(fh))
        done = sum(r["status"] == "done" for r in rows)
        failed = [r for r in rows if r["status"] == "failed"]
        print(f"{done} of {len(rows)} series done, {len(failed)} failed; summary: {summary}")
        for reason, n in skipped.items():
            print(f"  {n} series skipped: {reason}")
        return 1 if failed else 0
    return 0


def add_cli(sub: Any) -> None:
    b = sub.add_parser(
        "batch",
        help="explain every CT series of a DICOM tree or Slicer DICOM database",
        description="One output folder per series (named by SeriesInstanceUID) and a "
        "summary.csv. Resumable: finished series are skipped unless their options "
        "differ. Under 'torchrun --nproc_per_node N' the series are shared among "
        "the ranks.",
    )
    b.add_argument("source", help="DICOM folder tree, or Slicer DICOM database (folder or ctkDICOM.sql)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--redo-failed", action="store_true", help="retry series that failed in an earlier run")
    add_explain_options(b, roi=False)
    b.set_defaults(func=_cmd_batch)
