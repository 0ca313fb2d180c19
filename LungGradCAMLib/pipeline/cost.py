"""What explaining a CT will cost, known before the work starts: the time of its heat map
(:func:`estimate_cost`, a :class:`CostEstimate`), the memory it needs (:func:`memory_needed`,
refused by :func:`check_memory` when there is not that much) and the batch size
(:func:`default_batch_size`). What each CAM method costs is in
:data:`LungGradCAMLib.engine.methods.TABLE`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..core.volume import Volume

#: Bytes ``explain`` holds per voxel of the CT's grid (the float32 CT, masks, the heat and score
#: maps and their resampling) and per voxel of the model's grid (the resampled CT, its padded
#: copy, three blending accumulators, the results): with the model's activations, the memory
#: checked before the work starts.
CT_BYTES_PER_VOXEL, GRID_BYTES_PER_VOXEL = 24, 32
#: On the CPU, what each worker thread of the sliding window beyond the first holds (its copy of
#: the model, its allocator arena); what a patch and a heat map need, by CAM method, is in
#: :data:`~LungGradCAMLib.engine.methods.TABLE` (``patch_memory``, ``cam_bytes``). Measured with
#: benchmarks/memory_estimate.py: the real peak was at most 0.88 of the estimate in every case
#: measured (README, "Reliability and security").
WORKER_BYTES = 192 << 20


def default_batch_size(device: "torch.device", patch: Sequence[int]) -> int:  # noqa: F821
    """Patches per batch: 8 on a GPU; on the CPU as many as fit in about 1 M voxels (at most 32),
    since a CPU batch is shared among worker threads and small batches pay per-call overhead."""
    if device.type != "cpu":
        return 8
    return int(max(1, min(32, (1 << 20) // int(np.prod(patch)))))


@dataclass
class CostEstimate:
    """The cost of a CAM stage, estimated before it starts: ``patches`` model inputs of ``patch``
    voxels (K, J, I) and ``passes`` forward passes of one patch in all (Score-CAM: the patch's
    own and one per channel of the CAM layer, masked: ``channels``); ``seconds`` scales a timed
    forward pass on ``device`` (rough: within about a factor of 2)."""

    method: str
    patches: int
    passes: int
    channels: int
    patch: Tuple[int, ...]
    device: str
    seconds: float

    def __str__(self) -> str:
        minutes = self.seconds / 60.0
        took = f"{minutes:.1f} min" if minutes >= 1 else f"{self.seconds:.0f} s"
        return (
            f"{self.method}: {self.patches} patches of {'x'.join(map(str, self.patch))} voxels, "
            f"{self.passes:,} forward passes; about {took} on {self.device}"
        )


def estimate_cost(
    loaded: Any,
    method: str,
    patches: int,
    patch: Sequence[int],
    device: "torch.device",  # noqa: F821
    batch_size: int,
) -> CostEstimate:
    """A :class:`CostEstimate` for ``patches`` patches of ``patch`` voxels with ``loaded``
    (a ``LoadedModel``) on ``device``: times one forward pass of a batch of zero patches (the
    second of two, after the set-up of the first), as many as the method puts in one call, run
    as the sliding window runs it (on the CPU: on one thread, by as many workers as threads)."""
    import torch

    from ..engine.cam import CAM
    from ..engine.methods import TABLE
    from ..engine.sliding import cpu_workers

    spec = TABLE[method]
    # Score-CAM's masked passes go 32 a call; a batch never holds more patches than there are
    batch = max(batch_size, CAM.SCORE_BATCH_SIZE) if spec.masked else max(1, min(batch_size, patches))
    threads = torch.get_num_threads()
    workers = cpu_workers(device, batch_size, patches)
    shapes: List[Tuple[int, ...]] = []
    hook = loaded.target_layer.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    x = torch.zeros(batch, int(loaded.card.kwargs.get("in_channels", 1)), *patch, device=device)
    torch.set_num_threads(1 if workers > 1 else threads)
    try:
        with torch.inference_mode():
            for _ in range(2):
                t0 = time.perf_counter()
                loaded.module(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    per_pass = seconds / batch / workers
    channels = int(shapes[0][1])
    if spec.masked:
        passes = patches * (1 + channels)
        total = passes * per_pass
    else:
        passes = patches * spec.forwards
        total = patches * per_pass * spec.cost
    return CostEstimate(method, int(patches), int(passes), channels, tuple(int(p) for p in patch), str(device), total)


def memory_needed(
    volume: Volume,
    space_shape: Sequence[int],
    loaded: Any,
    patch: Sequence[int],
    batch: int,
    dev: "torch.device",  # noqa: F821
    method: str,
) -> Dict[str, float]:
    """What explaining ``volume`` needs, in bytes, before it starts: ``ct`` and ``grid`` (the CT's
    and the model grid's voxels, ``space_shape``), and on the CPU ``patches``, what a batch of
    ``batch`` patches needs with ``method`` (its ``patch_memory`` and ``cam_bytes`` in
    :data:`~LungGradCAMLib.engine.methods.TABLE`; with Score-CAM each worker's batch of masked
    copies of a patch too) and ``workers``
    (:data:`WORKER_BYTES` for each beyond the first). On a GPU, running out of its memory halves
    the batch instead."""
    import torch

    from ..engine.cam import CAM
    from ..engine.methods import TABLE

    spec = TABLE[method]
    need = {"ct": volume.array.size * CT_BYTES_PER_VOXEL, "grid": float(np.prod(space_shape)) * GRID_BYTES_PER_VOXEL}
    if dev.type != "cuda":
        workers = max(1, min(torch.get_num_threads(), batch))  # as sliding_cam's cpu_workers, at most
        per_patch = loaded.activation_bytes(patch)
        need["patches"] = batch * per_patch * spec.patch_memory + spec.cam_bytes
        if spec.masked:
            need["patches"] += workers * CAM.SCORE_BATCH_SIZE * per_patch
        need["workers"] = (workers - 1) * WORKER_BYTES
    return need


def check_memory(
    volume: Volume,
    space_shape: Sequence[int],
    loaded: Any,
    patch: Sequence[int],
    batch: int,
    dev: "torch.device",  # noqa: F821
    method: str,
) -> None:
    """Refuse (:class:`ResourceError`) before resampling when :func:`memory_needed` is more
    than there is."""
    from ..core.limits import check_bytes

    check_bytes(
        sum(memory_needed(volume, space_shape, loaded, patch, batch, dev, method).values()),
        f"explaining this CT ({volume.shape} voxels; {tuple(space_shape)} on the model's "
        f"{loaded.card.spacing_mm} mm grid; batches of {batch} x {list(patch)} voxels, {method})",
        "give a smaller --batch-size, or use a model of coarser spacing or smaller patches, or crop the CT; ",
    )
