"""The ``lunggradcam`` command line: demo | run | batch | train | evaluate | bench | info.

Errors a user can cause (:class:`LungGradCAMError`) are printed without a traceback, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional

from . import __version__, pipeline
from .errors import LungGradCAMError
from .options import ExplainOptions

# Library modules that contribute subcommands through ``add_cli(subparsers)``.
_COMMAND_MODULES = ("pipeline", "train", "evaluate", "bench")
_VERBOSE_HELP = "log each stage and its time"


def _info(args: argparse.Namespace) -> int:
    """Print versions, torch devices and bundled models."""
    import platform

    import numpy
    import pydicom
    import SimpleITK
    import torch

    from .models import available_models

    print(f"LungGradCAM {__version__} (Python {platform.python_version()}, {platform.system()})")
    for name, mod in (("torch", torch), ("numpy", numpy), ("pydicom", pydicom), ("SimpleITK", SimpleITK)):
        print(f"  {name:10s} {getattr(mod, '__version__', '?')}")
    cuda = torch.cuda.is_available()
    print(f"  CUDA: {'yes, ' + torch.cuda.get_device_name(0) if cuda else 'no'}")
    mps = getattr(torch.backends, "mps", None)
    print(f"  MPS:  {'yes' if mps is not None and mps.is_available() else 'no'}")
    print("  CPU:  yes")
    models = available_models()
    print("Bundled models: " + (", ".join(models) if models else "none"))
    return 0


def _heat_map_statement(card: Any) -> str:
    """One honest line about the model's heat maps: its intended use and, where its card has
    them, how often its heat map's maximum lands on a lesion (``metrics.heat_map``)."""
    quality = card.metrics.get("heat_map") if isinstance(card.metrics, dict) else None
    text = (f"About the heat map: it shows which voxels drove the score of model '{card.name}' {card.version}; "
            f"it is not a finding. {card.intended_use}")
    if isinstance(quality, dict) and {"scans", "peak_in_lesion"} <= set(quality):
        text += (f" On {quality['scans']} held-out test scans its heat map's maximum fell inside a lesion in "
                 f"{quality['peak_in_lesion']}" + (f" and within 10 mm of one in {quality['peak_within_10mm']}"
                                                    if "peak_within_10mm" in quality else "")
                 + (f" (mean-Dice {quality['mean_dice']:.2f})" if "mean_dice" in quality else "") + ".")
        slabs = quality.get("lidc_slabs")
        if isinstance(slabs, dict) and slabs:
            text += " On real LIDC-IDRI slabs: " + "; ".join(
                f"{name}: {'inside the nodule' if r.get('peak_in_nodule') else 'missed, %.0f mm away' % r.get('peak_mm', 0)}"
                for name, r in slabs.items() if isinstance(r, dict)) + "."
    else:
        text += " How well its heat maps localise lesions has not been measured (no metrics.heat_map in its card)."
    return text


def _print_result(name: str, explanation: Any, segmentation: Any, files: Dict[str, Path]) -> None:
    from .pipeline import outcome

    probs = ", ".join(f"{k} {v:.3f}" for k, v in explanation.probabilities.items())
    print(f"{name}: {explanation.predicted_class} ({probs}); {outcome(segmentation)}; "
          f"{explanation.timings['total']:.1f} s")


def _demo(args: argparse.Namespace) -> int:
    """Phantom chest CT -> DICOM series -> volume -> Grad-CAM -> segmentation -> outputs; then,
    with ``--ct``, the same pipeline on a real CT."""
    import shutil

    import numpy as np

    from . import metrics, phantom
    from .lung import lung_mask
    from .pipeline import check_options, cli_progress, run_one
    from .render import save_montage
    from .results import Segmentation
    from .segment import write_segmentation
    from .volume import write_volume

    out = Path(args.out)
    options = ExplainOptions(model=args.model, device=args.device, region_model=args.region_model)
    if args.ct is not None:
        pipeline.check_input(args.ct, args.series)
    loaded = check_options(options)
    print(_heat_map_statement(loaded.card))
    print()

    ph = phantom.chest_ct(seed=args.seed)
    vol = ph.volume
    dicom_dir = out / "dicom"
    if dicom_dir.exists():  # files from an earlier demo: replace them, never mix two series
        shutil.rmtree(dicom_dir)
    files = phantom.write_dicom_series(vol, dicom_dir, shuffle_names=True)
    write_volume(vol, out / "phantom.nrrd")
    truth = ph.nodule_labelmap > 0
    write_segmentation(Segmentation(vol.with_array(ph.nodule_labelmap.astype(np.int16)), []),
                       out / "nodules_truth.seg.nrrd", names={n.label: f"nodule {n.label} ({n.kind})" for n in ph.nodules})
    first = ph.nodules[0]
    centre = tuple(int(round(c)) for c in vol.ras_to_ijk_points(first.center_ras)[0])
    save_montage(vol, out / "montage.png", center_ijk=centre,
                 contours={"lungs": lung_mask(vol), "nodules": truth},
                 title=f"phantom seed {args.seed}: {first.kind} nodule, {first.diameter_mm:.0f} mm")
    print(f"1. A synthetic chest CT (phantom seed {args.seed}): {vol.shape[::-1]} voxels (i, j, k) at "
          f"{np.round(vol.spacing, 2).tolist()} mm with {len(ph.nodules)} nodules, written as {len(files)} DICOM "
          f"files and read back through the pipeline:")
    update, close = cli_progress(options.method)
    try:
        explanation, segmentation, written = run_one(dicom_dir, out / "result", options, progress=update,
                                                     input_desc="demo phantom DICOM series")
    finally:
        close()
    _print_result("   prediction", explanation, segmentation, written)
    pipeline.print_second_opinions(segmentation, indent="     ")
    distance = metrics.peak_distance_mm(explanation.cam, truth)  # 0 when the CAM's maximum is in a nodule
    print("   the heat map's maximum is " + ("inside a true nodule" if distance == 0 else
          f"{distance:.1f} mm from the nearest true nodule (outside it)"))

    slicer_files = {"the phantom": [out / "phantom.nrrd", out / "result" / "cam.nrrd",
                                    out / "result" / "segmentation.seg.nrrd", out / "nodules_truth.seg.nrrd"]}
    if args.ct is not None:
        print(f"2. Your CT, {args.ct}, through the same pipeline:")
        update, close = cli_progress(options.method)
        try:
            real, real_seg, real_files = run_one(args.ct, out / "ct", options, series_uid=args.series,
                                                 progress=update, input_desc=str(args.ct))
        finally:
            close()
        _print_result("   prediction", real, real_seg, real_files)
        pipeline.print_second_opinions(real_seg, indent="     ")
        chest = real.extra["chest_check"]
        print(f"   chest-CT check: lungs {chest['lung_ml']:.0f} ml, largest cross-section "
              f"{chest['max_lung_area_cm2']:.0f} cm², {100 * chest['lung_share']:.0f} % of the body, "
              f"{100 * chest['aerated_share']:.0f} % aerated")
        slicer_files["your CT"] = [Path(args.ct), out / "ct" / "cam.nrrd", out / "ct" / "segmentation.seg.nrrd"]

    print()
    print(f"Outputs in {out.resolve()}:")
    print(f"  montage.png, result/overlay.png{', ct/overlay.png' if args.ct else ''}   pictures: open them in any viewer")
    print(f"  result/report.json{', ct/report.json' if args.ct else ''}   prediction, hot regions (ml, RAS mm), "
          "timings, the model and its intended use")
    print("To see them in 3D Slicer (5.6 or newer), drag and drop onto its window, for")
    for what, paths in slicer_files.items():
        print(f"  {what}: " + "  ".join(str(p.resolve()) for p in paths))
    if args.ct is not None and Path(args.ct).is_dir():
        print("  (Slicer offers to import a DICOM folder into its DICOM database: do so, then load the series)")
    print("  then set cam as the foreground of the slice views (opacity 0.4); the LungGradCAM module does all "
          "this itself: load the CT and press Apply.")
    return 0


def _add_demo(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a synthetic chest CT (and on your CT with --ct)",
                       description="Make a phantom chest CT with nodules, write it as a DICOM series and "
                                   "NRRD, save a montage, then load the DICOM back and explain it with "
                                   "the bundled model (cam.nrrd, segmentation.seg.nrrd, overlay.png, ...). "
                                   "With --ct, then explain a real chest CT the same way.")
    p.add_argument("--out", default="lunggradcam-demo", help="output folder (default ./lunggradcam-demo)")
    p.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    p.add_argument("--ct", default=None, metavar="PATH",
                   help="also explain this real chest CT: DICOM folder, Slicer DICOM database or volume file")
    p.add_argument("--series", default=None, help="SeriesInstanceUID of --ct, when it holds several CT series")
    p.add_argument("--model", default="default", help="model name or path (default: default)")
    p.add_argument("--region-model", default=None, metavar="MODEL",
                   help="also ask a region model (e.g. lidc-malignancy) about each hot region")
    p.add_argument("--device", default=None, type=pipeline._argument_type(pipeline._device),
                   help="auto, cpu, cuda, cuda:N, mps")
    p.set_defaults(func=_demo)


def _add_info(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("info", help="versions, torch devices (CUDA/MPS/CPU), bundled models",
                       description="Print versions, torch device availability and bundled models.")
    p.set_defaults(func=_info)


class _Parser(argparse.ArgumentParser):
    """Parse errors as one message naming the option and what to give, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lunggradcam",
        description="Grad-CAM explanations of 3D CNNs on lung CT (LungGradCAM).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    for name in _COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).add_cli(sub)
    _add_info(sub)
    for command in sub.choices.values():  # -v also after the command; SUPPRESS keeps one given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return parser


def _join_negative_values(argv: List[str]) -> List[str]:
    """``--roi -55.5,-85.6,-116,40`` as ``--roi=-55.5,...``: argparse takes a value starting with
    "-" that is not a plain number for an option, and negative RAS coordinates are normal."""
    joined: List[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in pipeline.NEGATIVE_VALUE_OPTIONS and i + 1 < len(argv) and re.match(r"^-[\d.]", argv[i + 1]):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def _printable(text: str) -> str:
    """``text`` with control characters other than newline and tab escaped (``\\x1b``): messages
    quote DICOM fields such as SeriesDescription, which a hostile file can fill with terminal
    escape sequences."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


class Terminated(BaseException):
    """SIGTERM arrived: raised where the process is, so that every ``finally`` removes the
    temporaries it made (a killed batch under torchrun gets SIGTERM first)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    # numpy asks the kernel for transparent huge pages for every large array; where the kernel
    # then compacts memory on the spot (defrag "madvise", the common default) and other processes
    # have fragmented it, the first touch of each CT-sized array stalls: 3 s of CPU in a 512x512x300
    # run on a shared machine (README, "Speed"). Off in this process, before numpy is imported,
    # unless the user chose.
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    started = time.perf_counter()
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as exc:  # --help, --version, or a wrong option (message printed, status 2)
        return int(exc.code or 0)
    args.started = started  # a run's report counts its total time from here
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger(__package__).setLevel(logging.INFO)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except LungGradCAMError as exc:
        print(f"lunggradcam {args.command}: error: {_printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lunggradcam {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"lunggradcam {args.command}: terminated (SIGTERM); no partial output was left", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
