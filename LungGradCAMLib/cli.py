"""The ``lunggradcam`` command line: demo | run | batch | train | evaluate | bench | info.

Errors a user can cause (:class:`LungGradCAMError`) are printed without a traceback, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

from . import __version__
from .errors import LungGradCAMError

# Library modules that contribute subcommands through ``add_cli(subparsers)``.
_COMMAND_MODULES = ("pipeline", "train", "evaluate", "bench")


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


def _demo(args: argparse.Namespace) -> int:
    """Phantom chest CT -> DICOM series -> volume -> Grad-CAM -> segmentation -> outputs."""
    from pathlib import Path

    import numpy as np

    from . import metrics, phantom
    from .dicom import load_dicom_series
    from .lung import lung_mask
    from .pipeline import run_one
    from .render import save_montage
    from .results import Segmentation
    from .segment import write_segmentation
    from .volume import write_volume

    out = Path(args.out)
    ph = phantom.chest_ct(seed=args.seed)
    vol = ph.volume
    dicom_dir = out / "dicom"
    if dicom_dir.exists():  # files from an earlier demo: replace them, never mix two series
        import shutil

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
    print(f"phantom CT {vol.shape[::-1]} voxels (i, j, k) at {np.round(vol.spacing, 2).tolist()} mm "
          f"with {len(ph.nodules)} nodules -> {len(files)} DICOM files in {dicom_dir}")

    ct = load_dicom_series(dicom_dir)
    explanation, segmentation, written = run_one(ct, out / "result", model=args.model, device=args.device,
                                                 input_desc="demo phantom DICOM series")
    distance = metrics.peak_distance_mm(explanation.cam, truth)  # 0 when the CAM's maximum is in a nodule
    probs = ", ".join(f"{k} {v:.3f}" for k, v in explanation.probabilities.items())
    print(f"model '{args.model}': {explanation.predicted_class} ({probs}), "
          f"{len(segmentation.regions)} hot region(s), {explanation.timings['total']:.1f} s")
    print("pointing game: the CAM maximum is " + ("inside a true nodule" if distance == 0 else
          f"OUTSIDE the true nodules, {distance:.1f} mm from the nearest"))
    print(f"outputs: {out / 'montage.png'}, {out / 'phantom.nrrd'}, {out / 'nodules_truth.seg.nrrd'}, "
          f"{dicom_dir}/, {out / 'result'}/ ({', '.join(sorted(p.name for p in written.values()))})")
    return 0


def _add_demo(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a synthetic chest CT (phantom)",
                       description="Make a phantom chest CT with nodules, write it as a DICOM series and "
                                   "NRRD, save a montage, then load the DICOM back and explain it with "
                                   "the bundled model (cam.nrrd, segmentation.seg.nrrd, overlay.png, ...).")
    p.add_argument("--out", default="lunggradcam-demo", help="output folder (default ./lunggradcam-demo)")
    p.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    p.add_argument("--model", default="default", help="model name or path (default: default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(func=_demo)


def _add_info(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("info", help="versions, torch devices (CUDA/MPS/CPU), bundled models",
                       description="Print versions, torch device availability and bundled models.")
    p.set_defaults(func=_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lunggradcam",
        description="Grad-CAM explanations of 3D CNNs on lung CT (LungGradCAM).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    for name in _COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).add_cli(sub)
    _add_info(sub)
    return parser


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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
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
