"""Explain a CT: the model -> lung mask -> the chest-CT check -> model preprocessing -> CAM ->
:class:`Explanation` on the CT's grid; and :func:`explain_and_segment`, which adds the hot regions
(and a region model's second opinion on each).

``explain`` is what the CLI, the Slicer module and researchers call."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import CancelledError, InvalidInputError, NotChestCTError, VolumeError
from ..core.limits import is_out_of_memory, out_of_memory
from ..core.results import Explanation, Segmentation
from ..core.volume import AIR_HU, LabelMap, Volume, crop, resample, resample_to, resampled_shape
from ..options import ExplainOptions, options_from

log = logging.getLogger(__name__)

#: ``progress(stage, done, total)``: a stage of :data:`STAGES`, and how far it is.
Progress = Callable[[str, int, int], None]
#: Bytes ``explain`` holds per voxel of the CT's grid (the float32 CT, masks, the heat and score
#: maps and their resampling) and per voxel of the model's grid (the resampled CT, its padded
#: copy, three blending accumulators, the results): with the model's activations, the memory
#: checked before the work starts.
CT_BYTES_PER_VOXEL, GRID_BYTES_PER_VOXEL = 24, 32
#: The values a CT in HU can hold (16-bit storage, signed or not, rescaled): anything else is not HU.
HU_LIMITS = (-32768.0, 65535.0)
#: On the CPU, what each worker thread of the sliding window beyond the first holds (its copy of
#: the model, its allocator arena); what a patch and a heat map need, by CAM method, is in
#: :data:`~LungGradCAMLib.engine.methods.TABLE` (``patch_memory``, ``cam_bytes``). Measured with
#: benchmarks/memory_estimate.py: the real peak was at most 0.88 of the estimate in every case
#: measured (README, "Reliability and security").
WORKER_BYTES = 192 << 20


# --------------------------------------------------------------------------------------------
# the model and the cost of its heat map
# --------------------------------------------------------------------------------------------
def get_model(model: Any, device: "torch.device") -> Any:  # noqa: F821
    """A ``LoadedModel`` on ``device``: pass one through, or load a name/path
    (:func:`~LungGradCAMLib.engine.models.cached_model`: once per weights file and device)."""
    from ..engine.models import LoadedModel, cached_model

    if isinstance(model, LoadedModel):
        if next(model.module.parameters()).device != device:
            model.module.to(device)
        return model
    return cached_model(model, device)


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


def estimate_cost(loaded: Any, method: str, patches: int, patch: Sequence[int], device: "torch.device",  # noqa: F821
                  batch_size: int) -> CostEstimate:
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


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------
#: Stages of a run in order (the keys of ``Explanation.timings`` and of progress reports) and
#: what a user is shown for each.
STAGES = {
    "load": "loading the CT", "load_model": "loading the model", "lung_mask": "finding the lungs",
    "resample": "resampling to the model's grid", "cam": "computing the heat map",
    "resample_back": "resampling the heat map to the CT", "segment": "finding hot regions",
    "second_opinion": "asking the region model about each hot region",
    "outline": "outlining the nodule at each explained region", "write": "writing the outputs",
}


class Stages:
    """Times each stage of a run into ``timings`` (seconds), logs its time, checks ``cancel()``
    before it starts (raising :class:`CancelledError`) and reports it to ``progress(stage, done,
    total)``: 0 of 1 as it starts, the counts the stage itself reports (:meth:`report`: files
    read, patches explained) meanwhile, and all done as it ends. An allocator's failure in a
    stage (``ulimit -v``, a full GPU) raises :class:`ResourceError` naming the stage."""

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
        try:
            yield
        except (RuntimeError, MemoryError) as exc:  # an allocator's failure: say so, as one message
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory(STAGES[name], exc) from None
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
    low, high = float(volume.array.min()), float(volume.array.max())
    if not np.isfinite([low, high]).all():
        raise VolumeError("the CT has NaN or infinite voxels; fix or mask them before explaining")
    if low < HU_LIMITS[0] or high > HU_LIMITS[1]:  # float32 arithmetic on 1e38 overflows to NaN
        raise VolumeError(f"the CT's values run from {low:.4g} to {high:.4g}: not HU, which a CT stores within "
                          f"{HU_LIMITS[0]:g} to {HU_LIMITS[1]:g}; give the CT in HU (rescaled as its DICOM says)")
    return volume


def _roi_box(roi: Any, space: Volume, patch: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
    """A (k, j, i) half-open box in ``space`` voxels from ``roi``: a bool mask on the CT grid
    (resampled already to ``space``) or ``(centre_ras_mm, size_mm)`` (as
    :func:`~LungGradCAMLib.options.parse_roi` checked it: three finite numbers each, sizes positive)."""
    if isinstance(roi, np.ndarray):
        if roi.shape != space.shape or not roi.any():
            raise InvalidInputError("roi mask must be a non-empty boolean array with the CT's shape")
        idx = np.nonzero(roi)
        return tuple((int(a.min()), int(a.max()) + 1) for a in idx)
    centre, size = np.asarray(roi[0], dtype=float), np.asarray(roi[1], dtype=float)
    c_ijk = space.ras_to_ijk_points(centre)[0]
    half = np.maximum(size / space.spacing, np.asarray(patch)[::-1]) / 2.0  # at least one patch
    lo = np.floor(c_ijk - half).astype(int)
    hi = np.ceil(c_ijk + half).astype(int)
    box = tuple((max(0, int(lo[a])), min(space.shape[2 - a], int(hi[a]))) for a in (2, 1, 0))
    if any(b <= a for a, b in box):
        raise InvalidInputError(f"roi centre {centre.tolist()} mm (RAS) lies outside the CT")
    return box


def _target_index(card: Any, target: Any) -> int:
    """The card's output index for ``target`` (a class name, an index, or an index as text)."""
    if isinstance(target, str) and target not in card.class_names and target.strip().isdigit():
        target = int(target)
    return card.class_index(target)


def _check_classifier(card: Any) -> None:
    if card.output != "classes":
        raise InvalidInputError(f"model {card.name!r} outlines nodules (its output is a {card.output}), it has no "
                                "decision to explain: give a classifier (default, lidc-malignancy); the outline is "
                                "made for the explained regions by itself")


def check_options(options: ExplainOptions, device: Any = None) -> Any:
    """Load ``options.model`` on the device (cached) and check the options that need it: the
    target class and the CAM layer. Returns the ``LoadedModel``. Called before any CT is read by
    the command line and the batch, and by :func:`explain` before the lung mask."""
    from ..engine.cam import _resolve_layer

    from ..engine.device import resolve_device

    device = resolve_device(options.device) if device is None else device
    loaded = get_model(options.model, device)
    _check_classifier(loaded.card)
    _target_index(loaded.card, options.target)
    for part in (options.layer or loaded.card.target_layer).split("+"):
        _resolve_layer(loaded.module, part)
    if options.region_model is not None:
        card = get_model(options.region_model, device).card
        _check_classifier(card)
        if card.input != "roi":
            raise InvalidInputError(f"region model {card.name!r} takes a whole scan, not one region (its card's "
                                    "input is 'scan'): give a region model, e.g. lidc-malignancy")
    return loaded


def memory_needed(volume: Volume, space_shape: Sequence[int], loaded: Any, patch: Sequence[int], batch: int,
                  dev: "torch.device", method: str) -> Dict[str, float]:  # noqa: F821
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


def _check_memory(volume: Volume, space_shape: Sequence[int], loaded: Any, patch: Sequence[int],
                  batch: int, dev: "torch.device", method: str) -> None:  # noqa: F821
    """Refuse (:class:`ResourceError`) before resampling when :func:`memory_needed` is more
    than there is."""
    from ..core.limits import check_bytes

    check_bytes(sum(memory_needed(volume, space_shape, loaded, patch, batch, dev, method).values()),
                f"explaining this CT ({volume.shape} voxels; {tuple(space_shape)} on the model's "
                f"{loaded.card.spacing_mm} mm grid; batches of {batch} x {list(patch)} voxels, {method})",
                "give a smaller --batch-size, or use a model of coarser spacing or smaller patches, or crop the CT; ")


def explain(volume: Volume, options: Optional[ExplainOptions] = None, *, lung_mask: Optional[np.ndarray] = None,
            progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
            on_estimate: Optional[Callable[["CostEstimate"], Optional[bool]]] = None, **settings: Any) -> Explanation:
    """Explain ``model``'s decision on a CT ``volume`` (HU, any geometry).

    The settings are one :class:`~LungGradCAMLib.options.ExplainOptions` (``options``), or its
    fields as keywords (``model``, ``method``, ``target``, ``layer``, ``mode``, ``roi``, ``device``,
    ``batch_size``, ``stride``, ``amp``, ``chest_check``...), which make one, once, here.

    Steps: the model (checked: target class, layer) -> lung mask (computed unless ``lung_mask``,
    bool K, J, I on the CT grid, is given) -> the chest-CT check (:func:`~LungGradCAMLib.engine.lung.
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

    from ..engine.device import resolve_device
    from ..engine.lung import check_chest_ct, lung_bbox
    from ..engine.lung import lung_mask as compute_lung_mask
    from ..engine.sliding import patch_counts, sliding_cam

    started = time.perf_counter()
    opts = options_from(options, settings)
    volume = _check_volume(volume)
    timings: Dict[str, float] = {}
    stage = Stages(timings, progress, cancel)
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
    if opts.chest_check and mode != "roi" and not chest.ok:
        raise NotChestCTError(
            "this CT does not look like a chest CT that holds lungs: " + "; ".join(chest.problems)
            + ". LungGradCAM explains chest CTs. If it is one, check that its values are HU; to explain a region "
            "anyway give a roi (--roi X,Y,Z,SIZE), or switch the check off (--no-chest-check, chest_check=False).")
    space_shape = resampled_shape(volume, card.spacing_mm)
    patch = space_shape if mode == "whole" or card.patch_size is None else tuple(card.patch_size)
    # a batch never holds more patches than cover the whole grid (a whole-volume model: one)
    grid_patches = np.prod(patch_counts([(0, n) for n in space_shape], patch,
                                        opts.stride or [max(1, p // 2) for p in patch]))
    _check_memory(volume, space_shape, loaded, patch, min(opts.batch_size or default_batch_size(dev, patch),
                                                          int(grid_patches)), dev, method)

    with stage("resample"):
        ct = volume if volume.array.dtype == np.float32 else volume.with_array(volume.array.astype(np.float32))
        space = resample(ct, card.spacing_mm, order=1, default_value=AIR_HU)
        roi_space = None
        if isinstance(roi, np.ndarray):
            if roi.shape != volume.shape:
                raise InvalidInputError(f"roi mask shape {roi.shape} differs from the CT's {volume.shape}")
            roi_space = resample_to(LabelMap.like(volume, roi.astype(bool)), space).array > 0
        lungs_space = resample_to(LabelMap.like(volume, lungs), space).array > 0

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
        try:
            estimate = estimate_cost(loaded, method, n_patches, patch, dev, batch_size)
        except (RuntimeError, MemoryError) as exc:  # its trial passes: one batch of the CAM stage's size
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory("timing the heat map's first passes", exc) from None
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
        mode=mode, layer=opts.layer or card.target_layer, n_patches=len(result.patch_scores), device=str(dev),
        device_used=result.device, batch_size_used=result.batch_size, box_model_space=[list(b) for b in box],
        model=card.summary(), chest_check=chest.to_dict(), options=opts.to_dict(),
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
    """A float32 map on the model's grid (the grid :func:`~LungGradCAMLib.core.volume.resample`
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
    """:func:`explain`, then :func:`~LungGradCAMLib.pipeline.segment.segment_cam` at ``options.threshold``
    (inside the lungs when ``options.restrict_to_lungs``): what the command line, the batch and the
    Slicer module do. The segmentation stage is timed and reported as ``segment``. The explained
    regions (every region of an ROI run; with a region model, those it is asked about) get the
    nodule outline at their peak (:func:`~LungGradCAMLib.pipeline.outlines.outline_regions`, stage
    ``outline``)."""
    from .outlines import outline_regions
    from .segment import segment_cam

    explanation = explain(volume, lung_mask=lung_mask, progress=progress, cancel=cancel, options=options,
                          on_estimate=on_estimate)
    stage = Stages(explanation.timings, progress, cancel)
    with stage("segment"):
        segmentation = segment_cam(explanation, threshold=options.threshold,
                                   within=None if options.restrict_to_lungs else False)
    if options.region_model is not None and segmentation.regions:
        with stage("second_opinion"):
            second_opinions(volume, explanation, segmentation, options, cancel=cancel)
    explained = (segmentation.regions if explanation.mode == "roi" else
                 segmentation.regions[:MAX_SECOND_OPINIONS] if options.region_model is not None else [])
    if explained:
        with stage("outline"):
            outline_regions(explanation, segmentation, explained, device=options.device, cancel=cancel)
    return explanation, segmentation


#: The most hot regions (hottest first) a region model is asked about in one run.
MAX_SECOND_OPINIONS = 20


def second_opinions(volume: Volume, explanation: Explanation, segmentation: Segmentation,
                    options: ExplainOptions, cancel: Optional[Callable[[], bool]] = None) -> None:
    """Ask ``options.region_model`` about each hot region of ``segmentation`` (the
    :data:`MAX_SECOND_OPINIONS` hottest): the CT is cut to a block of two of the region model's
    patches around the region's centroid, and one patch centred there goes through the model
    (``mode="roi"``, its card's method and class). Sets each region's ``second_opinion``."""
    from ..engine.device import resolve_device

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
