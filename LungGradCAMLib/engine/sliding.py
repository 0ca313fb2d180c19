"""Whole-scan CAMs with a sliding window: patches over a region, batched, blended with Gaussian
weights into full-size maps, with progress, cancellation and out-of-memory recovery.

Arrays are (D, H, W) = (K, J, I) voxels; boxes are ((k0, k1), (j0, j1), (i0, i1)) half-open
voxel ranges, as in :class:`LungGradCAMLib.core.results.Region`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..core.errors import CancelledError, InvalidInputError, LungGradCAMWarning, ResourceError
from ..core.limits import is_out_of_memory
from ..core.volume import AIR_HU
from .cam import CAM, CamResult, Target, minmax_per_sample, resolve_layers
from .methods import DEFAULT_METHOD

__all__ = ["SCALES", "PatchScore", "SlidingResult", "cpu_workers", "patch_counts", "sliding_cam"]

log = logging.getLogger(__name__)

#: The heat map's scales: ``absolute`` (the same on every scan) or ``relative`` (min-max over the scan).
SCALES = ("absolute", "relative")
Box = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


class CpuFallbackWarning(LungGradCAMWarning, RuntimeWarning):
    """The device ran out of memory with one patch per batch: the run goes on on the CPU."""


@dataclass
class PatchScore:
    """One patch: its box in volume voxels (past the volume's edges, padded with air, only when the
    volume is smaller than a patch), the score of the explained class (its probability; the callable's value
    for a callable target) and the probabilities of all classes."""

    box: Box
    score: float
    probabilities: Tuple[float, ...]


@dataclass
class SlidingResult:
    """What :func:`sliding_cam` returns.

    ``cam``: (D, H, W) float32 in [0, 1] over the whole volume (0 outside the region), on the
    scale :func:`sliding_cam` was asked for.
    ``score_map``: (D, H, W) float32, the Gaussian-blended patch scores (0 outside the region).
    ``patch_scores``: one :class:`PatchScore` per patch; ``max_score``: the highest of them.
    ``device`` and ``batch_size``: where and with how many patches per batch the run finished
    (they differ from the request after out-of-memory recovery).
    """

    cam: np.ndarray
    score_map: np.ndarray
    patch_scores: List[PatchScore]
    max_score: float
    device: str
    batch_size: int


def _triple(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 3 or any(int(v) != v or int(v) < 1 for v in values):
        raise InvalidInputError(f"{name} must be a positive int or 3 positive ints (K, J, I) in voxels; got {value!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _box(roi: Optional[Sequence[Sequence[int]]], shape: Tuple[int, ...]) -> Box:
    if roi is None:
        return tuple((0, n) for n in shape)  # type: ignore[return-value]
    try:
        box = tuple((int(a), int(b)) for a, b in roi)
    except (TypeError, ValueError):
        raise InvalidInputError(f"roi must be ((k0, k1), (j0, j1), (i0, i1)) voxel ranges; got {roi!r}") from None
    if len(box) != 3 or any(not 0 <= a < b <= n for (a, b), n in zip(box, shape)):
        raise InvalidInputError(
            f"roi {roi!r} is not a non-empty box inside the volume of shape "
            f"{tuple(shape)} (half-open voxel ranges k, j, i)"
        )
    return box  # type: ignore[return-value]


def _gaussian(patch: Tuple[int, int, int], sigma_scale: float, device: torch.device) -> torch.Tensor:
    """Blending weights: a separable Gaussian (sigma = sigma_scale * patch) with peak 1, kept
    above 1e-3 so that voxels near a patch's edge still count where no other patch covers them."""
    axes = [
        torch.exp(-0.5 * ((torch.arange(p, dtype=torch.float32) - (p - 1) / 2) / (sigma_scale * p)) ** 2) for p in patch
    ]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp_min(1e-3).to(device)


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def _model_device(model: nn.Module) -> torch.device:
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    return param.device if param is not None else torch.device("cpu")


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    """``cuda`` (no index) matches the current CUDA device, as ``model.to("cuda")`` does."""
    if asked.type != actual.type:
        return False
    index = asked.index
    if index is None and asked.type == "cuda":
        index = torch.cuda.current_device()
    return index is None or index == actual.index


def patch_counts(box: Sequence[Sequence[int]], patch: Sequence[int], stride: Sequence[int]) -> List[int]:
    """Patches along K, J, I that cover ``box`` ((k0, k1), (j0, j1), (i0, i1)) from its corner,
    every ``stride`` voxels (the last one may reach past the box; :func:`sliding_cam` moves it back
    to the volume's edge)."""
    return [math.ceil(max(b - a - p, 0) / s) + 1 for (a, b), p, s in zip(box, patch, stride)]


def cpu_workers(device: torch.device, batch: int, patches: int) -> int:
    """Worker threads for the CPU: one per torch thread, no more than a batch or the run holds
    patches (a single patch, e.g. a whole volume, keeps torch's own threads); 1 elsewhere."""
    return min(torch.get_num_threads(), batch, patches) if device.type == "cpu" else 1


class _Explainer:
    """A :class:`CAM` of the model, or, with ``workers`` > 1 (CPU), one CAM per worker thread on
    copies of the model, each explaining its share of every batch with one intra-op thread. A
    context manager: the CAMs' hooks are removed and torch's thread count restored on exit.

    Why workers: torch's intra-op threads meet at a barrier after every operation, and a sliding
    window runs tens of thousands of small operations. When anything else runs on the machine, a
    thread that is descheduled holds the others at each barrier for a scheduler time slice: the
    same 2288 patches took 5.5 s with one thread and 150 s with two on a shared 2-core machine
    (README, "Speed"). Workers that each run whole sub-batches only meet once per batch.
    """

    def __init__(self, model: nn.Module, layer: str, method: str, workers: int, **options: Any) -> None:
        self.model, self.layer, self.method, self.workers, self.options = model, layer, method, workers, options
        self.threads = torch.get_num_threads()
        self.pool: Optional[ThreadPoolExecutor] = None
        self.cams: List[CAM] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Explainer":
        # copies before any hook is installed: a deep copy carries the hooks of the model
        models = [self.model] + [copy.deepcopy(self.model) for _ in range(self.workers - 1)]
        self.cams = [self._stack.enter_context(CAM(m, self.layer, self.method, **self.options)) for m in models]
        if self.workers > 1:
            torch.set_num_threads(1)  # process-wide, restored on exit
            self._stack.callback(torch.set_num_threads, self.threads)
            self.pool = self._stack.enter_context(ThreadPoolExecutor(self.workers, thread_name_prefix="lgc-cam"))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def __call__(self, x: torch.Tensor, target: Target) -> CamResult:
        if self.pool is None or x.shape[0] == 1:
            return self.cams[0](x, target)
        parts = x.tensor_split(min(len(self.cams), x.shape[0]))
        results = list(self.pool.map(lambda cam, part: cam(part, target), self.cams, parts))
        first = results[0]
        classes = None if first.classes is None else torch.cat([r.classes for r in results])
        return CamResult(
            torch.cat([r.cam for r in results]),
            torch.cat([r.logits for r in results]),
            classes,
            torch.cat([r.scores for r in results]),
            first.activation,
        )


@dataclass
class _Tiling:
    """The patches over ``box``, every ``stride`` from its start, the last along each axis moved
    back to end at the volume's edge rather than reach past it (as MONAI's sliding window does): a
    patch padded with air there shows the structures the scan's edge cuts (vessels above all)
    ending in air, as a nodule ends, which made false hot regions along the last slices and rows
    only. A volume smaller than a patch is still padded (``pad_value_hu``, air). ``src`` is the
    patches' span as one HU array on the device, starting at ``origin`` (volume voxels);
    ``corners`` are relative to it."""

    box: Box
    patch: Tuple[int, int, int]
    origin: Tuple[int, int, int]
    corners: List[Tuple[int, int, int]]
    src: torch.Tensor

    @classmethod
    def over(
        cls,
        volume: torch.Tensor,
        box: Box,
        patch: Tuple[int, int, int],
        stride: Tuple[int, int, int],
        pad_value_hu: float,
        dev: torch.device,
    ) -> "_Tiling":
        counts = patch_counts(box, patch, stride)
        # only the last start of an axis can move (the one before it ends inside the box), so the
        # starts stay distinct and as many as patch_counts says
        starts = [
            [max(0, min(a + m * s, n - p)) for m in range(c)]
            for (a, _), p, s, c, n in zip(box, patch, stride, counts, volume.shape)
        ]
        origin = tuple(axis[0] for axis in starts)
        extent = tuple(axis[-1] + p - o for axis, p, o in zip(starts, patch, origin))
        corners = list(itertools.product(*([x - o for x in axis] for axis, o in zip(starts, origin))))
        src = torch.full(extent, float(pad_value_hu), dtype=torch.float32, device=dev)
        real = tuple(slice(o, min(o + e, n)) for o, e, n in zip(origin, extent, volume.shape))
        src[tuple(slice(0, r.stop - r.start) for r in real)] = volume[real].to(dev, torch.float32)
        return cls(box, patch, origin, corners, src)

    def batch(self, corners: Sequence[Tuple[int, int, int]]) -> torch.Tensor:
        """The (B, 1, *patch) HU patches at ``corners``."""
        p = self.patch
        return torch.stack([self.src[k : k + p[0], j : j + p[1], i : i + p[2]] for k, j, i in corners])[:, None]

    def to(self, dev: torch.device) -> None:
        self.src = self.src.to(dev)


class _Blend:
    """Gaussian-weighted sums of the patches' maps and scores over the tiling's extent (sigma =
    ``sigma_scale`` x patch). ``by_score``: each patch's map is first min-max scaled to [0, 1]
    within the patch and multiplied by the patch's score (the absolute scale: a voxel's heat is
    the Gaussian-weighted mean, over the patches covering it, of score x scaled map); otherwise
    the raw maps are summed as they are (a scale of their own: see :meth:`maps`)."""

    def __init__(self, tiling: _Tiling, sigma_scale: float, by_score: bool) -> None:
        self.patch, self.by_score = tiling.patch, by_score
        dev, extent = tiling.src.device, tuple(tiling.src.shape)
        self.weight = _gaussian(tiling.patch, sigma_scale, dev)
        self.cam, self.score, self.total = (torch.zeros(extent, device=dev) for _ in range(3))

    def add(self, corners: Sequence[Tuple[int, int, int]], maps: torch.Tensor, scores: torch.Tensor) -> None:
        if self.by_score:
            maps = minmax_per_sample(maps.float()) * scores.to(maps.device, torch.float32)[:, None, None, None]
        p = self.patch
        for n, (k, j, i) in enumerate(corners):
            region = (slice(k, k + p[0]), slice(j, j + p[1]), slice(i, i + p[2]))
            self.cam[region] += self.weight * maps[n]
            self.score[region] += self.weight * scores[n]
            self.total[region] += self.weight

    def to(self, dev: torch.device) -> None:
        self.weight, self.cam, self.score, self.total = (
            t.to(dev) for t in (self.weight, self.cam, self.score, self.total)
        )

    def maps(
        self, box: Box, origin: Tuple[int, ...], shape: Tuple[int, ...], relative: bool
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The blended CAM and scores on the volume's grid, 0 outside the box (the tiling's span
        starts at ``origin``). The CAM is on the absolute scale (clipped to [0, 1] against
        rounding), or with ``relative`` (always for raw maps) min-max scaled to [0, 1] over the box."""
        inside = tuple(slice(a - o, b - o) for (a, b), o in zip(box, origin))
        where = tuple(slice(a, b) for a, b in box)
        cam_map = np.zeros(shape, dtype=np.float32)
        score_map = np.zeros(shape, dtype=np.float32)
        blended = self.cam[inside] / self.total[inside]
        blended = minmax_per_sample(blended[None])[0] if relative else blended.clamp(0.0, 1.0)
        cam_map[where] = blended.cpu().numpy()
        score_map[where] = (self.score[inside] / self.total[inside]).cpu().numpy()
        return cam_map, score_map


class _OutOfMemory:
    """What a batch that ran out of memory changes: the batch is halved; at one patch per batch
    the run continues on a CPU copy of the model (with a warning); out of memory there too raises
    :class:`ResourceError`."""

    def __init__(self, batch: int, patch: Tuple[int, int, int]) -> None:
        self.batch, self.patch, self.on_cpu = batch, patch, False

    def recover(self, dev: torch.device) -> bool:
        """True when the batch was halved; False when the run must move to the CPU."""
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch > 1:
            self.batch //= 2
            log.info("out of memory on %s: retrying with %d patches per batch", dev, self.batch)
            return True
        if self.on_cpu:
            raise ResourceError(
                f"out of memory on the CPU with one {self.patch} patch per batch; use a "
                f"smaller patch or a machine with more memory"
            ) from None
        warnings.warn(
            f"out of memory on {dev} with one {self.patch} patch per batch: continuing on the CPU (slower)",
            CpuFallbackWarning,
            stacklevel=3,
        )
        self.on_cpu = True
        return False


def _check_arguments(
    volume_tensor: Any, patch: Any, stride: Any, batch_size: int, blend: str, scale: str
) -> Tuple[torch.Tensor, Tuple[int, int, int], Tuple[int, int, int]]:
    volume = volume_tensor
    if not isinstance(volume, torch.Tensor):  # numpy, possibly flipped (negative strides)
        volume = torch.from_numpy(np.ascontiguousarray(volume))
    if volume.dim() != 3 or volume.numel() == 0:
        raise InvalidInputError(
            f"volume_tensor must be a non-empty 3-D (K, J, I) HU array; got shape {tuple(volume.shape)}"
        )
    patch, stride = _triple(patch, "patch"), _triple(stride, "stride")
    if any(s > p for s, p in zip(stride, patch)):
        raise InvalidInputError(
            f"stride {stride} is larger than patch {patch}: voxels would be skipped; use stride <= patch"
        )
    if int(batch_size) < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if blend not in ("raw", "score"):
        raise InvalidInputError(f"blend must be 'raw' or 'score', got {blend!r}")
    if scale not in SCALES:
        raise InvalidInputError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if blend == "raw" and scale == "absolute":
        raise InvalidInputError("raw maps have no absolute scale: use blend='score', or scale='relative'")
    return volume, patch, stride


def sliding_cam(
    model: nn.Module,
    volume_tensor: Any,
    patch: Union[int, Sequence[int]],
    stride: Union[int, Sequence[int]],
    *,
    method: str = DEFAULT_METHOD,
    target: Target = None,
    layer: Union[None, str, nn.Module] = None,
    roi: Optional[Sequence[Sequence[int]]] = None,
    batch_size: int = 4,
    preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    pad_value_hu: float = AIR_HU,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Any = None,
    device: Union[None, str, torch.device] = None,
    amp: bool = False,
    activation: str = "softmax",
    sigma_scale: float = 0.125,
    blend: str = "score",
    scale: str = "absolute",
) -> SlidingResult:
    """CAM and patch scores of ``model`` over a (D, H, W) = (K, J, I) HU volume, patch by patch.

    Patches of ``patch`` voxels start at the ``roi`` box's corner every ``stride`` voxels
    (``stride <= patch``) until they cover the box, the last along each axis moved back to end at
    the volume's edge rather than reach past it; only a volume smaller than a patch is padded, with
    ``pad_value_hu`` (air), before ``preprocess`` (a callable applied on the device to
    each (B, 1, *patch) HU batch; default: none) turns HU into model input. Each batch gets one
    forward pass (:class:`~LungGradCAMLib.engine.cam.CAM`: maps upsampled to the patch, not normalised);
    the maps and the patches' scores are blended with Gaussian weights (sigma =
    ``sigma_scale`` x patch).
    ``blend="score"`` (the default, the product's) blends each patch's map, min-max scaled to
    [0, 1] within the patch, multiplied by the patch's score (its probability of the explained
    class): a patch the model calls background adds (almost) no heat, so a whole-scan map shows
    where the explained class is rather than every structure each patch attends to. With
    ``scale="absolute"`` (the default) the blend is never rescaled: a voxel's value is the
    Gaussian-weighted mean over the patches covering it of score x scaled map, so it means the
    same on every scan, and a scan whose patches all score below 0.5 has no voxel at 0.5 or
    above. ``scale="relative"`` min-max scales the blend to [0, 1] over the box (every scan then
    has a maximum of 1); ``blend="raw"`` blends the raw, unscaled maps and needs it.

    ``target``: as for :func:`~LungGradCAMLib.engine.cam.compute_cam`, except that None means the LAST
    class (-1: the positive class of a binary or single-logit model) for every patch, so that all
    patches explain the same class. ``activation``: ``"softmax"`` or ``"sigmoid"`` (the model
    card's), how logits become the patch probabilities. ``progress(done, total)`` is called before
    the first batch (0) and after each batch (counts of patches); ``cancel`` (a callable returning True, or a
    ``threading.Event``) is checked before each batch and raises :class:`CancelledError`.

    Memory: the device holds the box (plus padding) three times in float32 and one batch. A
    CUDA out-of-memory error halves the batch and retries; at one patch per batch the rest runs on
    a CPU copy of the model with a warning; running out there raises :class:`ResourceError`.
    """
    volume, patch, stride = _check_arguments(volume_tensor, patch, stride, batch_size, blend, scale)
    box = _box(roi, tuple(volume.shape))
    dev = _model_device(model)
    if device is not None and not _same_device(torch.device(device), dev):
        raise InvalidInputError(
            f"the model is on {dev} but device={device}; move the model there first (model.to(device))"
        )
    # names, not modules, so the CPU fallback can find the layers in its copy of the model
    layer_name = "+".join(name for name, _ in resolve_layers(model, layer))
    target = -1 if target is None else target
    tiling = _Tiling.over(volume, box, patch, stride, pad_value_hu, dev)
    blended = _Blend(tiling, sigma_scale, by_score=blend == "score")
    corners = tiling.corners
    oom = _OutOfMemory(int(batch_size), patch)
    scores: List[PatchScore] = []
    options = {"normalize": False, "amp": amp, "activation": activation}
    if progress is not None:
        progress(0, len(corners))
    done = 0
    while done < len(corners):  # one explainer per device: the CPU fallback starts another
        with _Explainer(model, layer_name, method, cpu_workers(dev, oom.batch, len(corners) - done), **options) as cam:
            while done < len(corners):
                if _is_cancelled(cancel):
                    raise CancelledError(f"sliding-window CAM cancelled after {done} of {len(corners)} patches")
                chunk = corners[done : done + oom.batch]
                try:
                    hu = tiling.batch(chunk)
                    result = cam(hu if preprocess is None else preprocess(hu), target)
                except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError, the CPU allocator's
                    if not is_out_of_memory(exc):
                        raise
                    result = None
                if result is None:  # outside the except block, so the failed batch's memory is free
                    if oom.recover(dev):
                        continue
                    break
                patch_score = result.target_probability
                patch_score = result.scores if patch_score is None else patch_score
                probs = result.probabilities.tolist() if result.logits.dim() == 2 else [[] for _ in chunk]
                blended.add(chunk, result.cam, patch_score)
                for (k, j, i), s, p in zip(chunk, patch_score.tolist(), probs):
                    origin = (k + tiling.origin[0], j + tiling.origin[1], i + tiling.origin[2])
                    scores.append(PatchScore(tuple((o, o + q) for o, q in zip(origin, patch)), float(s), tuple(p)))
                done += len(chunk)
                if progress is not None:
                    progress(done, len(corners))
        if done < len(corners):  # out of memory at one patch per batch: the rest on a CPU copy
            dev = torch.device("cpu")
            model = copy.deepcopy(model).to(dev)
            tiling.to(dev)
            blended.to(dev)
    cam_map, score_map = blended.maps(box, tiling.origin, tuple(volume.shape), relative=scale == "relative")
    return SlidingResult(cam_map, score_map, scores, max(s.score for s in scores), str(dev), oom.batch)
