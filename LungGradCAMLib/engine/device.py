"""The one device policy of the package: what ``device=None``/"auto" means for explaining,
training, evaluating and loading a model, and the checks of a device asked for by name."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..core.errors import InvalidInputError


def resolve_device(device: Any = None) -> torch.device:
    """``None``/"auto": CUDA if available (``cuda:LOCAL_RANK`` under ``torchrun``), else MPS, else
    the CPU; otherwise ``torch.device(device)``.

    Asking for CUDA/MPS where it is not available raises :class:`InvalidInputError`.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or str(device).lower() == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: torch knows them, the engine does not run there
        raise InvalidInputError(f"device {device!r} is not one LungGradCAM runs on: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidInputError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 ... or auto"
        )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidInputError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return dev
