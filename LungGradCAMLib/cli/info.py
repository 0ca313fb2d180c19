"""``lunggradcam info``: versions, torch devices and bundled models."""

from __future__ import annotations

import argparse

from .. import __version__


def _info(args: argparse.Namespace) -> int:
    """Print versions, torch devices and bundled models."""
    import platform

    import numpy
    import pydicom
    import SimpleITK
    import torch

    from ..engine.models import available_models

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


def add_cli(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "info",
        help="versions, torch devices (CUDA/MPS/CPU), bundled models",
        description="Print versions, torch device availability and bundled models.",
    )
    p.set_defaults(func=_info)
