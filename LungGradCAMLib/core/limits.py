"""Limits on the work a file, a model card or a model can ask for, checked before allocating.

A small file can declare a huge volume (a gzip NRRD of a billion zero voxels, DICOM headers of
20000 x 20000 pixels), a model card can ask for a grid or a patch that needs more memory than the
machine has, and a compressed model file can hold a tensor many times its size. Every reader and
``explain`` compute what they are about to allocate from the declared sizes and refuse, with a
message that names the limit and how to raise it, when it is over:

* ``LUNGGRADCAM_MAX_VOXELS``: voxels of one volume read, resampled or made (default 1.5e9);
* ``LUNGGRADCAM_MAX_BYTES``: bytes of memory one step may allocate (default: what this process can
  still get when the step starts: the free memory of the machine, the room under its cgroup's
  memory limit and under ``ulimit -v``, whichever is least);
* ``LUNGGRADCAM_MAX_MODEL_BYTES``: bytes of a model's weights (default 4 GiB, one billion float32
  parameters; never more than the memory the process can get).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import InvalidInputError, ResourceError, VolumeError

DEFAULT_MAX_VOXELS = 1_500_000_000
DEFAULT_MAX_MODEL_BYTES = 4 << 30
#: cgroup v2, then v1: (limit, usage) files as a container sees its own cgroup.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _env_int(name: str) -> Optional[int]:
    """The positive integer in environment variable ``name`` (``1e9`` and ``4_000_000`` are fine), or None."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = float("nan")
    if not (value >= 1 and np.isfinite(value)):
        raise InvalidInputError(f"environment variable {name}={text!r}: give a positive number (e.g. 8e9)")
    return int(value)


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate (None when the system does not say): the least of
    the machine's available memory (Linux ``MemAvailable``, else free pages), the room under the
    cgroup's memory limit, and the room under ``RLIMIT_AS`` (``ulimit -v``)."""
    import resource

    room = []
    try:
        with open("/proc/meminfo") as f:
            room += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        try:
            room.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 "no limit" is ~2**63
            room.append(max(0, limit - usage))
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        used = _read_int("/proc/self/statm")  # pages of address space in use
        room.append(max(0, soft - (used or 0) * resource.getpagesize()))
    return min(room) if room else None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_bytes(n_bytes: float, what: str, advice: str = "") -> None:
    """Raise :class:`ResourceError` before ``what`` allocates ``n_bytes`` when that is more than
    ``LUNGGRADCAM_MAX_BYTES`` or, without it, than the memory this process can still get."""
    limit = _env_int("LUNGGRADCAM_MAX_BYTES")
    source = "the limit LUNGGRADCAM_MAX_BYTES"
    if limit is None:
        limit = available_memory()
        source = "the memory this process can get now (free memory, cgroup limit and ulimit -v)"
    if limit is not None and n_bytes > limit:
        raise ResourceError(
            f"{what} needs {_gb(n_bytes)} of memory, more than {source}, {_gb(limit)}; {advice}"
            "free memory, or set LUNGGRADCAM_MAX_BYTES (bytes) to change the limit"
        )


def max_voxels() -> int:
    """The voxel limit (env ``LUNGGRADCAM_MAX_VOXELS``, default 1.5e9)."""
    return _env_int("LUNGGRADCAM_MAX_VOXELS") or DEFAULT_MAX_VOXELS


def check_voxel_limit(shape: Sequence[float], source: str = "volume", bytes_per_voxel: float = 0) -> None:
    """Raise :class:`VolumeError` before allocating a volume of ``shape`` over the voxel limit, or
    :class:`ResourceError` when (with ``bytes_per_voxel``, all the memory the step allocates per
    voxel) it needs more memory than :func:`check_bytes` allows."""
    shape = [float(s) for s in shape]  # float: a hostile size must not overflow before it is checked
    n = float(np.prod(shape))
    limit = max_voxels()
    if not np.isfinite(n) or n > limit:
        dims = tuple(int(s) if s < 1e18 else s for s in shape)
        raise VolumeError(
            f"{source}: {dims} = {n:.0f} voxels exceeds the limit of {limit}. "
            "Crop or downsample the volume, or raise LUNGGRADCAM_MAX_VOXELS if you have the memory."
        )
    if bytes_per_voxel:
        check_bytes(n * bytes_per_voxel, f"{source} ({int(n)} voxels)", advice="crop or downsample it, or ")


def max_model_bytes() -> int:
    """The model size limit in bytes (env ``LUNGGRADCAM_MAX_MODEL_BYTES``, default 4 GiB)."""
    return _env_int("LUNGGRADCAM_MAX_MODEL_BYTES") or DEFAULT_MAX_MODEL_BYTES


#: What allocators say when they cannot give memory: torch's CPU allocator ("can't allocate
#: memory", under ``ulimit -v``), CUDA's ("out of memory"), the C library ("Cannot allocate memory").
_ALLOCATOR_WORDS = ("can't allocate memory", "not enough memory", "out of memory", "Cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's failure: a :class:`MemoryError` (numpy, Python) or a
    RuntimeError of torch's allocators (``torch.OutOfMemoryError`` is one)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc) for word in _ALLOCATOR_WORDS)


def out_of_memory(what: str, exc: BaseException) -> ResourceError:
    """The :class:`ResourceError` for an allocator's failure ``exc`` while doing ``what``."""
    size = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]i?B)", str(exc))
    tried = "" if size is None else f" (it asked for {_gb(float(size[1])) if size[1] else size[2]})"
    return ResourceError(
        f"out of memory while {what}{tried}: the process may not have more (free memory, its "
        "cgroup limit and ulimit -v); free memory, give a smaller --batch-size, use a model of "
        "smaller patches or coarser spacing, or crop the CT"
    )
