"""End to end: CT -> lung mask -> model preprocessing -> CAM -> :class:`Explanation` -> outputs.

``explain`` is what the CLI, the Slicer module and researchers call; ``write_outputs`` writes the
files a run produces; ``run_batch`` explains a cohort, resumably, sharded under ``torchrun``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import __version__
from .atomic import check_output_folder, folder_lock, output_folder, write_json, write_text
from .errors import (CancelledError, DatabaseError, DicomDecodeError, DicomError, FolderBusyError,
                     InvalidInputError, LungGradCAMError, NotChestCTError, OutputError, ResourceError, VolumeError)
from .options import METHODS, MODES, ExplainOptions, parse_roi, parse_stride, parse_threshold
from .results import Explanation, Segmentation
from .volume import Volume, crop, resample, resample_to, resampled_shape

log = logging.getLogger(__name__)

#: ``progress(stage, done, total)``: a stage of :data:`STAGES`, and how far it is.
Progress = Callable[[str, int, int], None]
#: Bytes ``explain`` holds per voxel of the CT's grid (the float32 CT, masks, the heat and score
#: maps and their resampling) and per voxel of the model's grid (the resampled CT, its padded
#: copy, three blending accumulators, the results): with the model's activations, the memory
#: checked before the work starts.
CT_BYTES_PER_VOXEL, GRID_BYTES_PER_VOXEL = 24, 32


# --------------------------------------------------------------------------------------------
# device and model
# --------------------------------------------------------------------------------------------
def resolve_device(device: Any = None) -> "torch.device":  # noqa: F821
    """``None``/"auto": CUDA if available, else MPS, else CPU; otherwise ``torch.device(device)``.

    Asking for CUDA/MPS where it is not available raises :class:`InvalidInputError`.
    """
    import torch

    if device is None or str(device).lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
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
        raise InvalidInputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                "use cuda:0 ... or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidInputError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return dev


_MODEL_CACHE: Dict[Tuple[str, str], Any] = {}


def get_model(model: Any, device: "torch.device") -> Any:  # noqa: F821
    """A ``LoadedModel`` on ``device``: pass one through, or load a name/path once per device."""
    from .models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        if next(model.module.parameters()).device != device:
            model.module.to(device)
        return model
    key = (str(model), str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(model, device=device)
    return _MODEL_CACHE[key]


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
        return (f"{self.method}: {self.patches} patches of {'x'.join(map(str, self.patch))} voxels, "
                f"{self.passes:,} forward passes; about {took} on {self.device}")


#: Forward-pass equivalents per patch besides Score-CAM's masked passes: the Grad-CAM family
#: differentiates from the layer only (the graph is cut there) plus blending; guided methods run a
#: second forward and a full backward to the input.
_COST_PER_PATCH = {"guided-backprop": 4.0, "guided-gradcam": 4.0}
_GRADIENT_COST = 1.5


def estimate_cost(loaded: Any, method: str, patches: int, patch: Sequence[int], device: "torch.device",  # noqa: F821
                  batch_size: int) -> CostEstimate:
    """A :class:`CostEstimate` for ``patches`` patches of ``patch`` voxels with ``loaded``
    (a ``LoadedModel``) on ``device``: times one forward pass of a batch of zero patches (the
    second of two, after the set-up of the first), as many as the method puts in one call, run
    as the sliding window runs it (on the CPU: on one thread, by as many workers as threads)."""
    import torch

    from .cam import ScoreCAM
    from .sliding import cpu_workers

    scorecam = method == ScoreCAM.name
    # Score-CAM's masked passes go 32 a call; a batch never holds more patches than there are
    batch = max(batch_size, 32) if scorecam else max(1, min(batch_size, patches))
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
    if scorecam:
        passes = patches * (1 + channels)
        total = passes * per_pass
    else:
        passes = patches * (2 if method.startswith("guided") else 1)
        total = patches * per_pass * _COST_PER_PATCH.get(method, _GRADIENT_COST)
    return CostEstimate(method, int(patches), int(passes), channels, tuple(int(p) for p in patch), str(device), total)


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------
#: Stages of a run in order (the keys of ``Explanation.timings`` and of progress reports) and
#: what a user is shown for each.
STAGES = {
    "load": "loading the CT", "load_model": "loading the model", "lung_mask": "finding the lungs",
    "resample": "resampling to the model's grid", "cam": "computing the heat map",
    "resample_back": "resampling the heat map to the CT", "segment": "finding hot regions",
    "second_opinion": "asking the region model about each hot region", "write": "writing the outputs",
}


class _Stages:
    """Times each stage of a run into ``timings`` (seconds), logs its time, checks ``cancel()``
    before it starts (raising :class:`CancelledError`) and reports it to ``progress(stage, done,
    total)``: 0 of 1 as it starts, the counts the stage itself reports (:meth:`report`: files
    read, patches explained) meanwhile, and all done as it ends."""

    def __init__(self, timings: Dict[str, float], progress: Optional[Progress] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> None:
        self.timings, self.progress, self.cancel = timings, progress, cancel
        self.total = 1

    def report(self, name: str, done: int, total: int) -> None:
        self.total = total
        if self.progress is not None:
            self.progress(name, done, total)

    def counter(self, name: str) -> Optional[Callable[[int, int], None]]:
        """A ``progress(done, total)`` for the engine's functions, reporting as stage ``name``."""
        return None if self.progress is None else (lambda done, total: self.report(name, done, total))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cancel is not None and self.cancel():
            raise CancelledError(f"cancelled before {STAGES[name]}")
        self.report(name, 0, 1)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        log.info("%s: %.2f s", STAGES[name], seconds)
        self.report(name, self.total, self.total)


def _check_volume(volume: Any) -> Volume:
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"explain() needs a LungGradCAMLib.Volume, got {type(volume).__name__}")
    if volume.array.dtype.kind not in "iuf":
        raise VolumeError(f"the CT must hold numbers (HU); got dtype {volume.array.dtype}")
    # min and max are NaN if any voxel is (and inf if any is): two passes, no CT-sized temporary
    if volume.array.dtype.kind == "f" and not np.isfinite([volume.array.min(), volume.array.max()]).all():
        raise VolumeError("the CT has NaN or infinite voxels; fix or mask them before explaining")
    return volume


def _roi_box(roi: Any, space: Volume, patch: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
    """A (k, j, i) half-open box in ``space`` voxels from ``roi``: a bool mask on the CT grid
    (resampled already to ``space``) or ``(centre_ras_mm, size_mm)`` (checked by ExplainOptions)."""
    if isinstance(roi, np.ndarray):
        if roi.shape != space.shape or not roi.any():
            raise InvalidInputError("roi mask must be a non-empty boolean array with the CT's shape")
        idx = np.nonzero(roi)
        return tuple((int(a.min()), int(a.max()) + 1) for a in idx)
    try:
        centre, size = roi
        centre = np.asarray(centre, dtype=float).reshape(3)
        size = np.broadcast_to(np.asarray(size, dtype=float), (3,))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            "roi must be a boolean mask or (centre_ras_mm (x, y, z), size_mm (one or three numbers))"
        ) from exc
    if not (np.all(np.isfinite(centre)) and np.all(np.isfinite(size))) or np.any(size <= 0):
        raise InvalidInputError(f"roi centre {centre.tolist()} mm and size {size.tolist()} mm must be finite "
                                "numbers, the size positive")
    c_ijk = space.ras_to_ijk_points(centre)[0]
    half = np.maximum(size / space.spacing, np.asarray(patch)[::-1]) / 2.0  # at least one patch
    lo = np.floor(c_ijk - half).astype(int)
    hi = np.ceil(c_ijk + half).astype(int)
    box = tuple((max(0, int(lo[a])), min(space.shape[2 - a], int(hi[a]))) for a in (2, 1, 0))
    if any(b <= a for a, b in box):
        raise InvalidInputError(f"roi centre {centre.tolist()} mm (RAS) lies outside the CT")
    return box


#: ``explain``'s option keywords and their defaults (those of :class:`ExplainOptions`).
_OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ExplainOptions)}


def _options(options: Optional[ExplainOptions], keywords: Dict[str, Any]) -> ExplainOptions:
    """``options``, or one made of the option keywords; both at once is refused."""
    if options is None:
        return ExplainOptions(**keywords)
    if not isinstance(options, ExplainOptions):
        raise InvalidInputError(f"options must be an ExplainOptions, got {type(options).__name__}")

    def differs(value: Any, default: Any) -> bool:
        return value is not None if default is None else (isinstance(value, np.ndarray) or value != default)

    given = sorted(k for k, v in keywords.items() if differs(v, _OPTION_DEFAULTS[k]))
    if given:
        raise InvalidInputError(f"give the settings either as options=ExplainOptions(...) or as keywords, "
                                f"not both (also given: {', '.join(given)})")
    return options


def _target_index(card: Any, target: Any) -> int:
    """The card's output index for ``target`` (a class name, an index, or an index as text)."""
    if isinstance(target, str) and target not in card.class_names and target.strip().isdigit():
        target = int(target)
    return card.class_index(target)


def check_options(options: ExplainOptions, device: Any = None) -> Any:
    """Load ``options.model`` on the device (cached) and check the options that need it: the
    target class and the CAM layer. Returns the ``LoadedModel``. Called before any CT is read by
    the command line and the batch, and by :func:`explain` before the lung mask."""
    from .cam import _resolve_layer

    device = resolve_device(options.device) if device is None else device
    loaded = get_model(options.model, device)
    _target_index(loaded.card, options.target)
    for part in (options.layer or loaded.card.target_layer).split("+"):
        _resolve_layer(loaded.module, part)
    if options.region_model is not None:
        card = get_model(options.region_model, device).card
        if card.input != "roi":
            raise InvalidInputError(f"region model {card.name!r} takes a whole scan, not one region (its card's "
                                    "input is 'scan'): give a region model, e.g. lidc-malignancy")
    return loaded
def _check_memory(volume: Volume, space_shape: Sequence[int], loaded: Any, patch: Sequence[int],
                  batch: int, dev: "torch.device") -> None:  # noqa: F821
    """Refuse (:class:`ResourceError`) before resampling when the grids the model card implies,
    and on the CPU the model's activations for one batch, need more memory than there is."""
    from .limits import check_bytes

    need = volume.array.size * CT_BYTES_PER_VOXEL + float(np.prod(space_shape)) * GRID_BYTES_PER_VOXEL
    if dev.type != "cuda":  # on a GPU, running out of its memory halves the batch (sliding_cam)
        need += batch * loaded.activation_bytes(patch)
    check_bytes(need, f"explaining this CT ({volume.shape} voxels; {tuple(space_shape)} on the model's "
                f"{loaded.card.spacing_mm} mm grid; batches of {batch} x {list(patch)} voxels)",
                "give a smaller --batch-size, or use a model of coarser spacing or smaller patches, or crop the CT; ")


def explain(volume: Volume, model: Any = "default", method: Optional[str] = None, target: Any = None,
            mode: str = "auto", roi: Any = None, lung_mask: Optional[np.ndarray] = None,
            device: Any = None, batch_size: Optional[int] = None, progress: Optional[Progress] = None,
            stride: Optional[Sequence[int]] = None, amp: bool = False,
            cancel: Optional[Callable[[], bool]] = None, *, layer: Optional[str] = None,
            chest_check: bool = True, options: Optional[ExplainOptions] = None,
            on_estimate: Optional[Callable[["CostEstimate"], Optional[bool]]] = None) -> Explanation:
    """Explain ``model``'s decision on a CT ``volume`` (HU, any geometry).

    The settings (``model`` ... ``amp``, ``layer``, ``chest_check``) are those of
    :class:`~LungGradCAMLib.options.ExplainOptions`; give them as keywords or as one ``options``.

    Steps: the model (checked: target class, layer) -> lung mask (computed unless ``lung_mask``,
    bool K, J, I on the CT grid, is given) -> the chest-CT check (:func:`~LungGradCAMLib.lung.
    check_chest_ct`; a CT without lungs raises :class:`NotChestCTError` unless ``chest_check`` is
    False or a roi is explained) -> resampling to the model card's spacing -> CAM, by ``mode``:

    * ``sliding``: patches of the card's patch size over the lungs' bounding box, batched; each
      patch's CAM is weighted by its score, then CAMs and scores are blended with Gaussian
      weights (patch models on whole scans);
    * ``whole``: the whole (resampled) volume in one pass (whole-volume models);
    * ``roi``: the sliding window restricted to ``roi`` — a bool mask on the CT grid, or
      ``(centre_ras_mm, size_mm)``;
    * ``auto``: ``roi`` if a roi is given, else ``whole`` for whole-volume models, else ``sliding``.

    Returns an :class:`Explanation` whose ``cam`` (float32 in [0, 1] in steps of
    :data:`CAM_STEP`, high = important) has the input CT's exact geometry. The scan-level
    probability of the explained class is the highest blended patch score; ``score_map`` holds
    the blended scores on the CT grid. ``timings`` holds seconds per stage (:data:`STAGES`) and
    ``total``, the wall time of the call.
    ``progress(stage, done, total)`` is called as each stage starts and ends and, in the ``cam``
    stage, after each batch (counts of patches); ``cancel()`` returning True stops the run before
    the next stage or batch (:class:`CancelledError`). ``on_estimate(estimate)``, when given, is
    called with the :class:`CostEstimate` of the CAM stage before it starts; returning False stops
    the run there (:class:`CancelledError`).
    """
    import torch

    from .lung import check_chest_ct, lung_bbox
    from .lung import lung_mask as compute_lung_mask
    from .sliding import patch_counts, sliding_cam

    started = time.perf_counter()
    opts = _options(options, dict(model=model, method=method, target=target, mode=mode, roi=roi,
                                  device=device, batch_size=batch_size, stride=stride, amp=amp,
                                  layer=layer, chest_check=chest_check))
    volume = _check_volume(volume)
    timings: Dict[str, float] = {}
    stage = _Stages(timings, progress, cancel)
    dev = resolve_device(opts.device)
    with stage("load_model"):
        loaded = check_options(opts, dev)
    card = loaded.card
    target_index = _target_index(card, opts.target)
    method = opts.method or card.cam_method
    roi = opts.roi
    if card.input == "roi" and (roi is None or opts.mode not in ("auto", "roi")):
        raise InvalidInputError(
            f"model {card.name!r} judges a region around ONE nodule, not a whole scan: give the region "
            "(roi=(centre_ras_mm, size_mm) or a mask; CLI --roi X,Y,Z,SIZE; Slicer: an ROI on the nodule)")

    with stage("lung_mask"):
        if lung_mask is None:
            lungs = compute_lung_mask(volume)
        else:
            lungs = np.asarray(lung_mask.array if isinstance(lung_mask, Volume) else lung_mask).astype(bool)
            if lungs.shape != volume.shape:
                raise InvalidInputError(f"lung_mask shape {lungs.shape} differs from the CT's {volume.shape}")
        chest = check_chest_ct(volume, lungs)

    mode = opts.mode
    if mode == "auto":
        mode = "roi" if roi is not None else ("whole" if card.patch_size is None else "sliding")
    if mode == "roi" and roi is None:
        raise InvalidInputError("mode 'roi' needs roi=(centre_ras_mm, size_mm) or a mask")
    if opts.chest_check and mode != "roi" and not chest.ok:
        raise NotChestCTError(
            "this CT does not look like a chest CT that holds lungs: " + "; ".join(chest.problems)
            + ". LungGradCAM explains chest CTs. If it is one, check that its values are HU; to explain a region "
            "anyway give a roi (--roi X,Y,Z,SIZE), or switch the check off (--no-chest-check, chest_check=False).")
    space_shape = resampled_shape(volume, card.spacing_mm)
    patch = space_shape if mode == "whole" or card.patch_size is None else tuple(card.patch_size)
    _check_memory(volume, space_shape, loaded, patch, opts.batch_size or default_batch_size(dev, patch), dev)

    with stage("resample"):
        ct = volume if volume.array.dtype == np.float32 else volume.with_array(volume.array.astype(np.float32))
        space = resample(ct, card.spacing_mm, order=1, default_value=-1024.0)
        roi_space = None
        if isinstance(roi, np.ndarray):
            if roi.shape != volume.shape:
                raise InvalidInputError(f"roi mask shape {roi.shape} differs from the CT's {volume.shape}")
            roi_space = resample_to(volume.with_array(roi.astype(np.uint8)), space, order=0).array > 0
        lungs_space = resample_to(volume.with_array(lungs.view(np.uint8)), space, order=0).array > 0

    patch = tuple(card.patch_size) if card.patch_size is not None else space.shape
    if mode == "whole":
        box = tuple((0, n) for n in space.shape)
        patch = space.shape
    elif mode == "roi":
        box = _roi_box(roi_space if roi_space is not None else roi, space, patch)
        if card.input == "roi":  # one patch centred on the region: the model judges one lesion
            centre = [(a + b) // 2 for a, b in box]
            box = tuple((max(0, c - p // 2), min(n, c - p // 2 + p)) for c, p, n in zip(centre, patch, space.shape))
    else:
        if not lungs_space.any():
            raise VolumeError("no lung found in the CT: is it a chest CT in HU? Give a lung_mask or an roi")
        box = lung_bbox(lungs_space, margin_vox=[p // 4 for p in patch])

    stride = opts.stride or [max(1, p // 2) for p in patch]
    batch_size = opts.batch_size or default_batch_size(dev, patch)
    if on_estimate is not None:
        n_patches = int(np.prod(patch_counts(box, patch, stride)))
        estimate = estimate_cost(loaded, method, n_patches, patch, dev, batch_size)
        if on_estimate(estimate) is False:
            raise CancelledError(f"not started: {estimate}")
    with stage("cam"):
        result = sliding_cam(
            loaded.module, torch.from_numpy(space.array), patch, stride=stride, method=method,
            target=target_index, layer=opts.layer or card.target_layer, roi=box, batch_size=batch_size,
            preprocess=loaded.prepare, progress=stage.counter("cam"), cancel=cancel, device=dev, amp=opts.amp,
            activation=card.activation, blend="score",
        )

    with stage("resample_back"):
        # both maps are 0 outside the sliding window's box: only the CT voxels within its reach are computed
        cam = cam_on_ct_grid(space.with_array(result.cam.astype(np.float32, copy=False)), volume, box)
        score_map = on_ct_grid(space.with_array(result.score_map.astype(np.float32, copy=False)), volume, box)

    p = float(result.max_score)
    probabilities = card.probabilities_from_score(target_index, p)
    predicted = max(probabilities, key=probabilities.get)
    timings["total"] = time.perf_counter() - started
    return Explanation(
        probabilities=probabilities, predicted_class=predicted, cam=cam, method=method,
        target_class=card.class_names[target_index], timings=timings, ct=volume, lung_mask=lungs,
        score_map=score_map,
        extra={"mode": mode, "device": str(dev), "device_used": result.device, "batch_size_used": result.batch_size,
               "layer": opts.layer or card.target_layer, "box_model_space": [list(b) for b in box],
               "n_patches": len(result.patch_scores), "model": card.summary(), "chest_check": chest.to_dict(),
               "options": opts.to_dict()},
    )


#: The CAM's resolution: values are multiples of 1/1024 (float16's precision near 1). The heat
#: map is coarse (one model feature per ~12 mm) and shown through a 256-colour map, so nothing
#: visible changes, and gzip makes cam.nrrd 7x smaller and twice as fast to write.
CAM_STEP = 2.0 ** -10


def cam_on_ct_grid(cam: Volume, ct: Volume, box: Optional[Sequence[Sequence[int]]] = None) -> Volume:
    """A CAM on the model's grid (float32, [0, 1]) brought onto the CT's grid by
    :func:`on_ct_grid`, clipped to [0, 1] and rounded to multiples of :data:`CAM_STEP`. Within
    ``CAM_STEP / 2`` (+ float32 rounding) of SimpleITK's trilinear resampling of the same map,
    which this replaces (Testing/Python/test_pipeline.py checks it)."""
    def quantise(a: np.ndarray) -> None:  # a slab at a time, while it is in the cache
        np.clip(a, 0.0, 1.0, out=a)
        a *= 1.0 / CAM_STEP
        np.rint(a, out=a)
        a *= CAM_STEP

    return on_ct_grid(cam, ct, box, finish=quantise)


def on_ct_grid(values: Volume, ct: Volume, box: Optional[Sequence[Sequence[int]]] = None,
               finish: Optional[Callable[[np.ndarray], None]] = None) -> Volume:
    """A float32 map on the model's grid (the grid :func:`~LungGradCAMLib.volume.resample`
    made from ``ct``) onto the CT's grid: trilinear, by ``resample_to``'s separable path (slab by
    slab), 0 outside. ``box`` ((k0, k1), (j0, j1), (i0, i1), model voxels): the map is 0 outside
    it (the sliding window's box), so only the CT voxels within reach of the box are interpolated
    and the others stay 0 (untouched memory); the values are the same as without it."""
    if box is None:
        return resample_to(values, ct, order=1, default_value=0.0, finish=finish)
    # the box and one voxel around it (zeros, which the interpolation at its edge reads)
    sub = crop(values, [(max(0, a - 1), min(n, b + 1)) for (a, b), n in zip(box, values.shape)])
    corners = [[i, j, k] for i in (-0.5, sub.shape[2] - 0.5) for j in (-0.5, sub.shape[1] - 0.5)
               for k in (-0.5, sub.shape[0] - 0.5)]
    ijk = ct.ras_to_ijk_points(sub.ijk_to_ras_points(corners))
    lo = np.clip(np.floor(ijk.min(axis=0)), 0, None).astype(int)[::-1]  # k, j, i
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int)[::-1] + 1, ct.shape)
    m = ct.ijk_to_ras.copy()
    m[:3, 3] = ct.ijk_to_ras_points(lo[::-1])[0]
    reach = Volume(np.broadcast_to(np.uint8(0), tuple(hi - lo)), m)  # geometry only
    out = np.zeros(ct.shape, dtype=np.float32)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = resample_to(sub, reach, order=1, default_value=0.0,
                                                                  finish=finish).array
    return ct.with_array(out)
def explain_and_segment(volume: Volume, options: ExplainOptions, *, lung_mask: Optional[np.ndarray] = None,
                        progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
                        on_estimate: Optional[Callable[["CostEstimate"], Optional[bool]]] = None,
                        ) -> Tuple[Explanation, Segmentation]:
    """:func:`explain`, then :func:`~LungGradCAMLib.segment.segment_cam` at ``options.threshold``
    (inside the lungs when ``options.restrict_to_lungs``): what the command line, the batch and the
    Slicer module do. The segmentation stage is timed and reported as ``segment``."""
    from .segment import segment_cam

    explanation = explain(volume, lung_mask=lung_mask, progress=progress, cancel=cancel, options=options,
                          on_estimate=on_estimate)
    stage = _Stages(explanation.timings, progress, cancel)
    with stage("segment"):
        segmentation = segment_cam(explanation, threshold=options.threshold,
                                   within=None if options.restrict_to_lungs else False)
    if options.region_model is not None and segmentation.regions:
        with stage("second_opinion"):
            second_opinions(volume, explanation, segmentation, options, cancel=cancel)
    return explanation, segmentation


#: The most hot regions (hottest first) a region model is asked about in one run.
MAX_SECOND_OPINIONS = 20


def second_opinions(volume: Volume, explanation: Explanation, segmentation: Segmentation,
                    options: ExplainOptions, cancel: Optional[Callable[[], bool]] = None) -> None:
    """Ask ``options.region_model`` about each hot region of ``segmentation`` (the
    :data:`MAX_SECOND_OPINIONS` hottest): the CT is cut to a block of two of the region model's
    patches around the region's centroid, and one patch centred there goes through the model
    (``mode="roi"``, its card's method and class). Sets each region's ``second_opinion``."""
    loaded = get_model(options.region_model, resolve_device(options.device))
    card = loaded.card
    extent_mm = np.asarray(card.patch_size[::-1], dtype=float) * np.asarray(card.spacing_mm)  # i, j, k
    for region in segmentation.regions[:MAX_SECOND_OPINIONS]:
        centre = np.asarray(region.centroid_ras, dtype=float)
        c = volume.ras_to_ijk_points(centre)[0]
        half = extent_mm / volume.spacing  # a patch on each side
        box = tuple((int(np.floor(c[a] - half[a])), int(np.ceil(c[a] + half[a])) + 1) for a in (2, 1, 0))
        block = crop(volume, box)
        lungs = None
        if explanation.lung_mask is not None:
            lo = [max(0, a) for a, _ in box]
            lungs = np.asarray(explanation.lung_mask)[tuple(slice(l, l + n) for l, n in zip(lo, block.shape))]
        answer = explain(block, lung_mask=lungs, cancel=cancel, options=ExplainOptions(
            model=loaded, mode="roi", roi=(tuple(centre), 1.0), chest_check=False, device=options.device,
            batch_size=options.batch_size, amp=options.amp))
        region.second_opinion = {
            "model": card.name, "version": card.version, "target_class": answer.target_class,
            "probability": answer.probabilities.get(answer.target_class), "predicted_class": answer.predicted_class,
            "probabilities": answer.probabilities}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _is_database(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".sql" or (path / "ctkDICOM.sql").is_file()


def _is_volume_file(path: Path) -> bool:
    from .volume import SUPPORTED_SUFFIXES

    return path.is_file() and any(path.name.lower().endswith(s) for s in SUPPORTED_SUFFIXES)


def check_input(source: Union[str, os.PathLike], series_uid: Optional[str] = None) -> Path:
    """``source`` as a path after the checks that need no reading: a path ITK can take (UTF-8,
    short names), it exists, it is no FIFO, socket or device (reading one would block or never
    end), and ``series_uid`` is only given for a DICOM folder or database (a volume file holds one
    series)."""
    from .paths import check_path, is_special, kind

    path = check_path(source, "input")
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    if is_special(path):
        raise InvalidInputError(f"{path} is a {kind(path.stat().st_mode)}: give a DICOM folder, a Slicer DICOM "
                                "database or a volume file")
    if series_uid is not None and _is_volume_file(path):
        raise InvalidInputError(f"{path} is a volume file, which holds one series: leave out --series "
                                "(series_uid), which picks a series of a DICOM folder or database")
    return path


def load_input(source: Union[str, os.PathLike], series_uid: Optional[str] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> Volume:
    """A CT from a volume file (.nrrd/.nii.gz/.mha...), a DICOM folder, or a Slicer DICOM
    database (its folder holding ``ctkDICOM.sql``, or the ``.sql`` file; needs ``series_uid``
    when it holds several CT series). ``progress(done, total)`` counts DICOM files read."""
    from .volume import read_volume

    path = check_input(source, series_uid)
    if _is_database(path):
        from .ctkdb import DicomDatabase

        db = DicomDatabase(path)
        return db.load(series_uid, progress=progress) if series_uid else db.load_single_ct(progress=progress)
    if _is_volume_file(path):
        return read_volume(path)
    from .dicom import load_dicom_series

    return load_dicom_series(path if path.is_dir() else [path], series_uid=series_uid, progress=progress)


#: A DICOM UID (PS3.5 9.1): up to 64 characters, components of digits without leading zeros.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def safe_name(text: str, fallback: str = "series") -> str:
    """A file-system-safe folder name from a SeriesInstanceUID (no separators, dots kept, <= 64).

    A valid UID is kept as it is: digits and dots, so it is never the name of a batch's own files
    (``summary.csv``, ``.tmp-*``). Any other text (a part key ``<uid>#2``, a hostile "UID" such as
    ``../x`` or ``summary.csv``, more than 64 characters) gets a hash of the whole text appended,
    so that two different UIDs never share a folder and none is a file of the batch."""
    text = str(text)
    name = re.sub(r"[^0-9A-Za-z._-]", "_", text).strip("._")
    if UID_PATTERN.match(text) and len(text) <= 64:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{name[:51] or fallback}-{digest}"


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
#: Volume file formats a run can write (``cam``, ``lungs`` and the region labelmap).
VOLUME_FORMATS = ("nrrd", "nii.gz")
#: What the report and every output say when the heat map has no region above the threshold.
NO_REGION = "no region above threshold"


def _versions() -> Dict[str, str]:
    import torch

    return {"lunggradcam": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


def intended_use(explanation: Explanation) -> str:
    """The model card's intended use (e.g. "... not for clinical use"), as every output shows it."""
    from .models.card import NOT_CLINICAL

    return (explanation.extra.get("model") or {}).get("intended_use") or NOT_CLINICAL


def outcome(segmentation: Segmentation) -> str:
    """"N hot region(s)" or :data:`NO_REGION` (with the level), as the outputs state it."""
    level = "" if segmentation.threshold is None else f" {segmentation.threshold:.2f}"
    n = len(segmentation.regions)
    return f"{n} hot region{'s' if n != 1 else ''}" if n else NO_REGION + level


def build_report(explanation: Explanation, segmentation: Segmentation, input_desc: str = "") -> dict:
    """The JSON-able report of a run (no patient name or ID: UIDs only)."""
    ct_meta = explanation.ct.meta if explanation.ct is not None else {}
    return {
        "intended_use": intended_use(explanation),
        "input": input_desc,
        "study_instance_uid": ct_meta.get("study_uid"),
        "series_instance_uid": ct_meta.get("series_uid"),
        "frame_of_reference_uid": ct_meta.get("frame_of_reference_uid"),
        "ct_shape_kji": list(explanation.cam.shape),
        "ct_spacing_ijk_mm": [float(s) for s in explanation.cam.spacing],
        "model": explanation.extra.get("model"),
        "options": explanation.extra.get("options"),
        "method": explanation.method,
        "layer": explanation.extra.get("layer"),
        "target_class": explanation.target_class,
        "predicted_class": explanation.predicted_class,
        "probabilities": explanation.probabilities,
        "mode": explanation.extra.get("mode"),
        "n_patches": explanation.extra.get("n_patches"),
        "device": explanation.extra.get("device_used", explanation.extra.get("device")),
        "chest_check": explanation.extra.get("chest_check"),
        "region_model": (explanation.extra.get("options") or {}).get("region_model"),
        "threshold": segmentation.threshold,
        "outcome": outcome(segmentation),
        "regions": [r.to_dict() for r in segmentation.regions],
        "timings_s": explanation.timings,
        "versions": _versions(),
    }


def write_outputs(explanation: Explanation, segmentation: Segmentation, out_dir: Union[str, os.PathLike],
                  **options: Any) -> Dict[str, Path]:
    """Write a run's files into ``out_dir``: ``cam.nrrd``, ``segmentation.seg.nrrd``,
    ``lungs.seg.nrrd`` (``lungs``), ``overlay.png`` (``overlay``), ``segmentation.dcm``
    (``dicom_seg``: a DICOM Segmentation referencing the source series) and ``report.json``
    (strict JSON, its ``files`` listing the others); ``options`` are those of :func:`_write_files`
    (with ``volume_format="nii.gz"`` the heat map, the regions and the lungs are NIfTI files).

    The run owns ``out_dir`` (:func:`~LungGradCAMLib.atomic.output_folder`): a second run into it
    at the same time is refused, and a folder holding files no run wrote is refused. The files are
    written into a staging folder inside it and then replace the previous run's outputs, report
    last, so ``report.json`` always describes the files beside it; on an error nothing changes.
    Returns name -> path.
    """
    final = Path(out_dir)
    try:
        with output_folder(final) as staging:
            written = _write_files(explanation, segmentation, staging, **options)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: the run's files are gone
        raise OutputError(f"{final}: cannot write the outputs ({exc.strerror or exc}); free space or choose "
                          "another output folder") from None
    return {name: final / path.name for name, path in written.items()}


def _write_files(explanation: Explanation, segmentation: Segmentation, out: Path, *, lungs: bool = True,
                 overlay: bool = True, dicom_seg: bool = False, input_desc: str = "", volume_format: str = "nrrd",
                 started: Optional[float] = None, progress: Optional[Progress] = None,
                 report_extra: Optional[dict] = None) -> Dict[str, Path]:
    """The files of :func:`write_outputs`, written into the folder ``out``, ``report.json`` last.
    The other files are written at the same time, one thread each: their compression (zlib) runs
    outside the GIL, beside the overlay's rendering. ``volume_format="nii.gz"``: the heat map, the
    regions (labelled as the report's regions) and the lungs as NIfTI files. The report's
    ``timings_s`` gets ``write`` and, when ``started`` (a ``time.perf_counter()`` value) is given,
    ``total`` = the wall time since then; ``report_extra`` adds fields to it."""
    from concurrent.futures import ThreadPoolExecutor

    from .results import Segmentation as Seg
    from .segment import write_segmentation
    from .volume import write_volume

    if volume_format not in VOLUME_FORMATS:
        raise InvalidInputError(f"volume format {volume_format!r}: use one of {', '.join(VOLUME_FORMATS)}")
    timings = explanation.timings
    t0 = time.perf_counter()
    lung_labels = None if not lungs or explanation.lung_mask is None else \
        explanation.cam.with_array(np.asarray(explanation.lung_mask, dtype=bool).view(np.uint8))
    jobs: Dict[str, Callable[[], Path]] = {"cam": lambda: write_volume(explanation.cam, out / f"cam.{volume_format}")}
    if volume_format == "nrrd":
        jobs["segmentation"] = lambda: write_segmentation(segmentation, out / "segmentation.seg.nrrd")
        if lung_labels is not None:
            jobs["lungs"] = lambda: write_segmentation(Seg(lung_labels, []), out / "lungs.seg.nrrd",
                                                       names={1: "lungs"}, colors={1: (0.5, 0.68, 0.5)})
    else:
        jobs["segmentation"] = lambda: write_volume(segmentation.labelmap, out / f"segmentation.{volume_format}")
        if lung_labels is not None:
            jobs["lungs"] = lambda: write_volume(lung_labels, out / f"lungs.{volume_format}")
    if overlay and explanation.ct is not None:
        jobs["overlay"] = lambda: write_overlay(explanation, segmentation, out / "overlay.png")
    with _Stages(timings, progress)("write"):
        report = {**build_report(explanation, segmentation, input_desc), **(report_extra or {})}
        if dicom_seg and not segmentation.regions:
            report["dicom_seg"] = f"not written: {NO_REGION}"
        elif dicom_seg:
            from .dicomseg import write_dicom_seg

            jobs["dicom_seg"] = lambda: write_dicom_seg(segmentation, explanation.ct, out / "segmentation.dcm",
                                                        method=explanation.method,
                                                        intended_use=intended_use(explanation))
        with ThreadPoolExecutor(len(jobs), thread_name_prefix="lgc-write") as pool:
            futures = {name: pool.submit(job) for name, job in jobs.items()}
            written = {name: future.result() for name, future in futures.items()}
        report["files"] = sorted(p.name for p in written.values()) + ["report.json"]
        now = time.perf_counter()
        report["timings_s"] = {**timings, "write": timings.get("write", 0.0) + now - t0}
        if started is not None:
            report["timings_s"]["total"] = now - started
        written["report"] = write_json(out / "report.json", report, default=_json_default)
    if started is not None:
        timings["total"] = time.perf_counter() - started
    return written


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_overlay(explanation: Explanation, segmentation: Segmentation, path: Path) -> Path:
    """Axial/coronal/sagittal views through the hottest region (or the CAM peak): lung window,
    CAM colour map, region and lung contours, colour bar; the title states the prediction and the
    outcome, the caption the model's intended use."""
    from .render import save_montage

    if segmentation.regions:
        centre = explanation.cam.ras_to_ijk_points(segmentation.regions[0].peak_ras)[0]
        center_ijk = tuple(int(round(c)) for c in centre)
    else:
        k, j, i = np.unravel_index(int(np.argmax(explanation.cam.array)), explanation.cam.shape)
        center_ijk = (int(i), int(j), int(k))
    contours = {"hot regions": segmentation.labelmap.array}  # non-zero = inside; cast per drawn slice
    if explanation.lung_mask is not None:
        contours["lungs"] = explanation.lung_mask
    p = explanation.probabilities.get(explanation.target_class, 0.0)
    title = f"{explanation.method}: P({explanation.target_class}) = {p:.3f}; {outcome(segmentation)}"
    return save_montage(explanation.ct, path, center_ijk=center_ijk, contours=contours,
                        cam=explanation.cam, title=title, caption="Research model. " + intended_use(explanation))


# --------------------------------------------------------------------------------------------
# one scan
# --------------------------------------------------------------------------------------------
Source = Union[Volume, str, os.PathLike, Callable[[], Volume]]


def run_one(source: Source, out_dir: Union[str, os.PathLike], options: Optional[ExplainOptions] = None, *,
            series_uid: Optional[str] = None, dicom_seg: bool = False, volume_format: str = "nrrd",
            input_desc: str = "", progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
            report_extra: Optional[dict] = None, started: Optional[float] = None,
            on_estimate: Optional[Callable[["CostEstimate"], Optional[bool]]] = None,
            inputs: Sequence[Union[str, os.PathLike]] = ()) -> Tuple[Explanation, Segmentation, Dict[str, Path]]:
    """Load (a path, with ``series_uid``; a callable returning a Volume; or a Volume as is),
    explain, segment and write one CT with ``options`` (default: ``ExplainOptions()``).

    ``out_dir`` is checked and owned before the work (it may not be nor hold the source path or
    one of ``inputs``, the paths the CT came from). ``explanation.timings`` (and the report's
    ``timings_s``) hold every stage, loading and writing included, and ``total``: the wall time
    since ``started`` (a ``time.perf_counter()`` value; default: the start of this call).
    ``on_estimate``: see :func:`explain`."""
    started = time.perf_counter() if started is None else started
    options = ExplainOptions() if options is None else options
    timings: Dict[str, float] = {}
    stage = _Stages(timings, progress, cancel)
    if isinstance(source, (str, os.PathLike)):
        inputs = [source, *inputs]
    with output_folder(out_dir, inputs):
        with stage("load"):
            if isinstance(source, Volume):
                volume = source
            elif callable(source):
                volume = source()
            else:
                volume = load_input(source, series_uid=series_uid, progress=stage.counter("load"))
        explanation, segmentation = explain_and_segment(volume, options, progress=progress, cancel=cancel,
                                                        on_estimate=on_estimate)
        explanation.timings = {**timings, **{k: v for k, v in explanation.timings.items() if k != "total"}}
        files = write_outputs(explanation, segmentation, out_dir, dicom_seg=dicom_seg, volume_format=volume_format,
                              input_desc=input_desc, started=started, progress=progress, report_extra=report_extra)
    return explanation, segmentation, files


# --- the command line: every option is checked by its argparse type= as it is parsed --------
def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a parser of :mod:`LungGradCAMLib.options`: its message, at parse time."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__.replace("parse_", "")
    return convert


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidInputError(f"batch size {text!r}: give a positive whole number of patches")
    return value


def _device(text: str) -> Optional[str]:
    return ExplainOptions(device=text).device


#: ``--roi``'s value may start with "-" (a negative RAS coordinate): cli.main joins it to the option.
NEGATIVE_VALUE_OPTIONS = ("--roi",)


def add_explain_options(p: argparse.ArgumentParser, *, roi: bool) -> None:
    """The options of an explanation (:class:`ExplainOptions`) and of its outputs, checked as parsed."""
    g = p.add_argument_group("explanation (as the Slicer panel)")
    g.add_argument("--model", default="default", help="bundled model name or a .safetensors path (default: default)")
    g.add_argument("--method", default=None, choices=METHODS, metavar="METHOD",
                   help="CAM method: " + ", ".join(METHODS) + " (default: the model card's; gradcam for the "
                        "default model)")
    g.add_argument("--target", default=None, help="class to explain, a name or an index (default: the model card's)")
    g.add_argument("--layer", default=None, help="CAM layer, a dotted module name (default: the model card's)")
    g.add_argument("--mode", default="auto", choices=MODES,
                   help="sliding (patches over the lungs), whole (whole-volume models), roi, or auto (default)")
    if roi:
        g.add_argument("--roi", default=None, type=_argument_type(parse_roi), metavar="X,Y,Z,SIZE",
                       help="explain only a region: 'X,Y,Z,SIZE' or 'X,Y,Z,SX,SY,SZ' (RAS mm; negative values are fine)")
    g.add_argument("--region-model", default=None, metavar="MODEL",
                   help="also ask a region model (e.g. lidc-malignancy) about each hot region; its answer is "
                        "in the report's regions (second_opinion) and summary")
    g.add_argument("--threshold", default=0.5, type=_argument_type(parse_threshold),
                   help="heat-map level in [0, 1], 'otsu', or a percentile such as p99 (default 0.5)")
    g.add_argument("--restrict-to-lungs", default=True, action=argparse.BooleanOptionalAction,
                   help="keep only hot regions inside the lungs (default: yes)")
    g.add_argument("--chest-check", default=True, action=argparse.BooleanOptionalAction,
                   help="refuse a CT that holds no lungs before computing (default: yes)")
    g.add_argument("--device", default=None, type=_argument_type(_device),
                   help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    g.add_argument("--batch-size", type=_argument_type(_batch_size), default=None,
                   help="patches per batch (default: 8 on CUDA, 2 on CPU)")
    g.add_argument("--stride", default=None, type=_argument_type(parse_stride), metavar="K[,J,I]",
                   help="sliding-window step in model voxels (default: half a patch)")
    g.add_argument("--amp", action="store_true", help="16-bit mixed precision on CUDA")
    o = p.add_argument_group("outputs")
    o.add_argument("--format", dest="volume_format", default="nrrd", choices=VOLUME_FORMATS,
                   help="heat map, regions and lungs as .nrrd + Slicer .seg.nrrd (default) or as NIfTI .nii.gz")
    o.add_argument("--dicom-seg", action="store_true",
                   help="also write segmentation.dcm, a DICOM Segmentation of the regions (DICOM input only)")


def options_from_args(args: argparse.Namespace) -> ExplainOptions:
    """The :class:`ExplainOptions` of parsed command-line arguments."""
    return ExplainOptions(model=args.model, method=args.method, target=args.target, layer=args.layer,
                          mode=args.mode, roi=getattr(args, "roi", None), threshold=args.threshold,
                          restrict_to_lungs=args.restrict_to_lungs, chest_check=args.chest_check,
                          device=args.device, batch_size=args.batch_size, stride=args.stride, amp=args.amp,
                          region_model=args.region_model)


def cli_progress(method: Optional[str]) -> Tuple[Progress, Callable[[], None]]:
    """A tqdm line on stderr naming the current stage (the heat map counted in patches)."""
    from tqdm import tqdm

    bar = tqdm(total=1, leave=False, disable=None, bar_format="{desc}: {n}/{total} {unit} [{elapsed}]")
    current = [""]

    def update(stage: str, done: int, total: int) -> None:
        if stage != current[0]:
            current[0] = stage
            bar.set_description_str(STAGES[stage] + (f" ({method})" if stage == "cam" and method else ""),
                                    refresh=False)
            bar.unit = "patches" if stage == "cam" else "steps"
            bar.reset(total=total)
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def print_estimate(estimate: CostEstimate) -> None:
    """The CLI's announcement of a long CAM stage (Score-CAM always, others from 30 s), on stderr."""
    if estimate.method == "scorecam" or estimate.seconds >= 30:
        print(f"estimated cost: {estimate}", file=sys.stderr, flush=True)


def _cmd_run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    path = check_input(args.input, args.series)
    check_output_folder(args.out, [args.input])  # before any work: an unusable --out fails now, not at the end
    if args.dicom_seg and _is_volume_file(path):
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
    print(f"outputs in {Path(args.out).resolve()}: {', '.join(sorted(p.name for p in files.values()))}")
    print(intended_use(explanation))
    return 0


def print_second_opinions(segmentation: Segmentation, indent: str = "  ") -> None:
    """One line per hot region a region model was asked about: where, and its answer."""
    for region in segmentation.regions:
        if region.second_opinion:
            o = region.second_opinion
            where = ", ".join(f"{c:.1f}" for c in region.centroid_ras)
            print(f"{indent}{region.name} ({region.volume_ml:.2f} ml at RAS {where} mm): "
                  f"{o['model']} P({o['target_class']}) = {o['probability']:.3f}")


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

    b = sub.add_parser("batch", help="explain every CT series of a DICOM tree or Slicer DICOM database",
                       description="One output folder per series (named by SeriesInstanceUID) and a "
                                   "summary.csv. Resumable: finished series are skipped unless their options "
                                   "differ. Under 'torchrun --nproc_per_node N' the series are shared among "
                                   "the ranks.")
    b.add_argument("source", help="DICOM folder tree, or Slicer DICOM database (folder or ctkDICOM.sql)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--redo-failed", action="store_true", help="retry series that failed in an earlier run")
    add_explain_options(b, roi=False)
    b.set_defaults(func=_cmd_batch)


# --------------------------------------------------------------------------------------------
# cohort
# --------------------------------------------------------------------------------------------
#: summary.csv's columns: ``output`` is the series' folder inside --out, ``input`` where it was read.
SUMMARY_FIELDS = ("series_uid", "status", "predicted_class", "target_probability", "outcome", "n_regions",
                  "largest_region_ml", "peak_cam", "seconds", "output", "input", "error")


@dataclass
class _SeriesJob:
    uid: str
    load: Callable[[], Volume]
    input: str  #: where the series is read from: its folder, or the database and UID


def _unreadable_load(message: str) -> Callable[[], Volume]:
    def load() -> Volume:
        raise DicomDecodeError(f"{message}. It lies among this series' files and may be one of its slices: "
                               "repair or remove it, then run again with --redo-failed")
    return load


def _list_ct_series(source: Union[str, os.PathLike]) -> List[_SeriesJob]:
    """Every CT series of a DICOM tree or a Slicer DICOM database, sorted by SeriesInstanceUID.

    A file of the tree that cannot be read does not stop the listing: the series whose files share
    its folder fail with its message (it may be one of their slices); one in a folder of its own
    is logged."""
    path = check_input(source)
    if _is_database(path):
        from .ctkdb import DicomDatabase

        db = DicomDatabase(path)
        jobs = [_SeriesJob(s.series_uid, (lambda uid=s.series_uid: db.load(uid)), f"{db.path} series {s.series_uid}")
                for s in db.ct_series()]
    else:
        from .dicom import list_dicom_series, load_dicom_series

        unreadable: Dict[Path, str] = {}
        series = [s for s in list_dicom_series(path, unreadable=unreadable) if s.modality.upper() == "CT"]
        jobs = []
        for s in series:
            bad = [message for f, message in unreadable.items() if f.parent in {g.parent for g in s.files}]
            load = _unreadable_load(bad[0]) if bad else (lambda files=list(s.files), key=s.key: load_dicom_series(files, key))
            jobs.append(_SeriesJob(s.key, load, os.path.commonpath([str(Path(f).parent) for f in s.files])))
        placed = {g.parent for s in series for g in s.files}
        for f, message in unreadable.items():
            if f.parent not in placed:
                log.warning("skipped: %r", message)
    if not jobs:
        raise InvalidInputError(f"{path}: no CT series found")
    return sorted(jobs, key=lambda j: j.uid)


def _record(path: Path) -> Optional[dict]:
    """A run's record (``report.json``, ``error.json``), or None when missing or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _summary_row(job: _SeriesJob, out_dir: Path) -> Dict[str, Any]:
    folder = out_dir / safe_name(job.uid)
    row: Dict[str, Any] = {k: "" for k in SUMMARY_FIELDS}
    row.update(series_uid=job.uid, output=folder.name, input=job.input, status="pending")
    r, error = _record(folder / "report.json"), _record(folder / "error.json")
    if r is not None:
        regions = r.get("regions") or []
        row.update(status="done", predicted_class=r["predicted_class"],
                   target_probability=f"{r['probabilities'].get(r['target_class'], float('nan')):.4f}",
                   outcome=r.get("outcome", ""), n_regions=len(regions),
                   largest_region_ml=f"{max((g['volume_ml'] for g in regions), default=0.0):.3f}",
                   peak_cam=f"{max((g['peak_cam'] for g in regions), default=0.0):.3f}",
                   seconds=f"{r['timings_s'].get('total', 0.0):.2f}")
    elif error is not None:
        row.update(status="failed", error=error.get("error", ""))
    return row


def write_summary(jobs: Sequence[Any], out_dir: Path) -> Path:
    """``summary.csv`` from what is on disk (so it is whole after any interruption)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for job in jobs:
        writer.writerow(_summary_row(job, out_dir))
    with folder_lock(out_dir):  # one writer at a time; clears temporaries a killed run left
        return write_text(out_dir / "summary.csv", buf.getvalue())


def _dist_env() -> Tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def prefetched(loads: Sequence[Callable[[], Any]]) -> Iterator["Future"]:  # noqa: F821
    """The futures of ``loads``, in order, each run in one background thread: load n + 1 starts
    when future n is handed out, so reading the next series overlaps explaining this one. A
    load's error comes out of its future's ``result()``."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="lgc-read")
    try:
        upcoming = pool.submit(loads[0]) if loads else None
        for n in range(len(loads)):
            current, upcoming = upcoming, (pool.submit(loads[n + 1]) if n + 1 < len(loads) else None)
            yield current
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _pending(folder: Path, key: Dict[str, Any], redo_failed: bool) -> bool:
    """Whether the series in ``folder`` is to be done by a run with result options ``key``: not
    when its report has these options, nor when it failed with them for a reason of its own data
    (its error.json says no ``retry``) unless ``redo_failed``."""
    report, error = _record(folder / "report.json"), _record(folder / "error.json")
    if report is not None:
        return report.get("result_key") != key
    if error is not None and error.get("result_key") == key and not error.get("retry"):
        return redo_failed
    return True


def run_batch(source: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
              options: Optional[ExplainOptions] = None, *, dicom_seg: bool = False, volume_format: str = "nrrd",
              redo_failed: bool = False, show_progress: bool = True,
              on_estimate: Optional[Callable[[CostEstimate], Optional[bool]]] = None) -> Path:
    """Explain every CT series of ``source`` into ``out_dir/<SeriesInstanceUID>/`` with ``options``.

    Resumable: a series whose ``report.json`` was made with the same result options and model
    (``result_key`` in the report: :meth:`ExplainOptions.result_options` without the model's name,
    plus the weights' SHA-256) is skipped; a series done with other options is done again. A
    series whose data fails (DICOM, volume or database errors) is recorded in its ``error.json``
    and the rest go on; later runs with the same options skip it unless ``redo_failed``. A failure
    that is not the series' own is never recorded for good: the options and the model are checked
    before the first series, an error of the run's options or output folder stops the batch, and
    a series that ran out of memory or failed unexpectedly is recorded to be retried by the next
    run. A series whose folder another process is writing is left to it. The next series is read
    (a background thread) while the current one is explained. Under ``torchrun`` (``WORLD_SIZE``
    > 1) rank r takes series r, r+N, ...; rank 0 writes ``summary.csv`` after all ranks finish.
    Returns its path.
    """
    from tqdm import tqdm

    options = ExplainOptions() if options is None else options
    rank, world, local_rank = _dist_env()
    out = check_output_folder(out_dir, [source], exclusive=False)
    jobs = _list_ct_series(source)
    if world > 1:
        import datetime

        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        if options.device is None and torch.cuda.is_available():
            options = dataclasses.replace(options, device=f"cuda:{local_rank}")
    loaded = check_options(options)  # once, before any series: a wrong option stops the batch here
    key = {**{k: v for k, v in options.result_options().items() if k != "model"}, "model_sha256": loaded.card.sha256}
    out.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs[rank::world] if _pending(out / safe_name(job.uid), key, redo_failed)]
    progress_bar = tqdm(todo, desc=f"series (rank {rank})" if world > 1 else "series", unit="series",
                        disable=not show_progress or None)
    for job, volume in zip(progress_bar, prefetched([job.load for job in todo])):
        folder = out / safe_name(job.uid)
        try:
            run_one(volume.result, folder, options, dicom_seg=dicom_seg, volume_format=volume_format,
                    input_desc=job.input, report_extra={"result_key": key}, on_estimate=on_estimate)
        except FolderBusyError:
            log.warning("series %r: another process is writing its folder; left to it", job.uid)
        except Exception as exc:  # noqa: BLE001 - one bad series must not stop the cohort
            data = isinstance(exc, (DicomError, VolumeError, DatabaseError))
            if isinstance(exc, LungGradCAMError) and not data and not isinstance(exc, ResourceError):
                raise  # the run's options or output folder: every series would fail alike; record nothing
            log.warning("series %r failed: %r", job.uid, str(exc))  # repr: no raw control characters
            info = {"series_uid": job.uid, "error": str(exc), "type": type(exc).__name__,
                    "user_error": isinstance(exc, LungGradCAMError), "retry": not data, "result_key": key}
            write_json(folder / "error.json", info)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    summary = out / "summary.csv"
    if rank == 0:
        summary = write_summary(jobs, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _cmd_batch(args: argparse.Namespace) -> int:
    summary = run_batch(args.source, args.out, options_from_args(args), dicom_seg=args.dicom_seg,
                        volume_format=args.volume_format, redo_failed=args.redo_failed, on_estimate=print_estimate)
    if _dist_env()[0] == 0:
        with open(summary, newline="") as fh:
            rows = list(csv.DictReader(fh))
        done = sum(r["status"] == "done" for r in rows)
        failed = [r for r in rows if r["status"] == "failed"]
        print(f"{done} of {len(rows)} series done, {len(failed)} failed; summary: {summary}")
        return 1 if failed else 0
    return 0
