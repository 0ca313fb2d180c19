"""Explain a CT, stage by stage: the model (checked) -> lung mask and the chest-CT check -> the
mode and the memory check -> resampling to the model's grid -> the window's box -> cost estimate
-> CAM -> back onto the CT's grid -> :class:`Explanation`.

``explain`` is what the CLI, the Slicer module and researchers call; the hot regions and what
they get are :mod:`.regions`'s, the costs :mod:`.cost`'s, the way home :mod:`.ct_grid`'s, the
stages' timing :mod:`.stages`'s."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import CancelledError, InvalidInputError, NotChestCTError, VolumeError
from ..core.limits import is_out_of_memory, out_of_memory
from ..core.results import Explanation
from ..core.volume import AIR_HU, LabelMap, Volume, resample, resample_to, resampled_shape
from ..options import ExplainOptions, options_from
from .cost import CostEstimate, check_memory, default_batch_size, estimate_cost
from .ct_grid import cam_on_ct_grid, on_ct_grid
from .stages import Progress, Stages

#: The values a CT in HU can hold (16-bit storage, signed or not, rescaled): anything else is not HU.
HU_LIMITS = (-32768.0, 65535.0)
#: A (k, j, i) box of half-open voxel index ranges.
Box = Tuple[Tuple[int, int], ...]


# --------------------------------------------------------------------------------------------
# the model
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


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------
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
        raise VolumeError(
            f"the CT's values run from {low:.4g} to {high:.4g}: not HU, which a CT stores within "
            f"{HU_LIMITS[0]:g} to {HU_LIMITS[1]:g}; give the CT in HU (rescaled as its DICOM says)"
        )
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
        raise InvalidInputError(
            f"model {card.name!r} outlines nodules (its output is a {card.output}), it has no "
            "decision to explain: give a classifier (default, lidc-malignancy); the outline is "
            "made for the explained regions by itself"
        )


def check_options(options: ExplainOptions, device: Any = None) -> Any:
    """Load ``options.model`` on the device (cached) and check the options that need it: the
    target class and the CAM layer. Returns the ``LoadedModel``. Called before any CT is read by
    the command line and the batch, and by :func:`explain` before the lung mask."""
    from ..engine.cam import resolve_layer
    from ..engine.device import resolve_device

    device = resolve_device(options.device) if device is None else device
    loaded = get_model(options.model, device)
    _check_classifier(loaded.card)
    _target_index(loaded.card, options.target)
    for part in (options.layer or loaded.card.target_layer).split("+"):
        resolve_layer(loaded.module, part)
    if options.region_model is not None:
        card = get_model(options.region_model, device).card
        _check_classifier(card)
        if card.input != "roi":
            raise InvalidInputError(
                f"region model {card.name!r} takes a whole scan, not one region (its card's "
                "input is 'scan'): give a region model, e.g. lidc-malignancy"
            )
    return loaded


def explain(
    volume: Volume,
    options: Optional[ExplainOptions] = None,
    *,
    lung_mask: Optional[np.ndarray] = None,
    progress: Optional[Progress] = None,
    cancel: Optional[Callable[[], bool]] = None,
    on_estimate: Optional[Callable[[CostEstimate], Optional[bool]]] = None,
    **settings: Any,
) -> Explanation:
    """Explain ``model``'s decision on a CT ``volume`` (HU, any geometry).

    The settings are one :class:`~LungGradCAMLib.options.ExplainOptions` (``options``), or its
    fields as keywords (``model``, ``method``, ``target``, ``layer``, ``mode``, ``roi``, ``device``,
    ``batch_size``, ``stride``, ``amp``, ``chest_check``, ``scale``...), which make one, once, here.

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
    :data:`CAM_STEP`, high = important) has the input CT's exact geometry. Its scale is absolute
    (``scale="absolute"``, the default): each patch's map, min-max scaled within the patch, is
    multiplied by the patch's probability of the explained class and the products are blended
    with Gaussian weights, never rescaled per scan (:func:`~LungGradCAMLib.engine.sliding.sliding_cam`),
    so a level means the same on every CT and a CT whose patches all score below 0.5 has no
    voxel at 0.5; the same holds in every mode (a region, a whole volume: one patch, its map x
    its probability). ``scale="relative"`` min-max scales the map over the covered box instead. The scan-level
    probability of the explained class is the highest blended patch score; ``score_map`` holds
    the blended scores on the CT grid. ``timings`` holds seconds per stage (:data:`STAGES`) and
    ``total``, the wall time of the call.
    ``progress(stage, done, total)`` is called as each stage starts and ends and, in the ``cam``
    stage, after each batch (counts of patches); ``cancel()`` returning True stops the run before
    the next stage or batch (:class:`CancelledError`). ``on_estimate(estimate)``, when given, is
    called with the :class:`CostEstimate` of the CAM stage before it starts; returning False stops
    the run there (:class:`CancelledError`).

    Example (the phantom stands in for ``lgc.load_dicom_series(folder)``)::

        >>> import LungGradCAMLib as lgc
        >>> phantom = lgc.phantom.chest_ct(seed=3, n_nodules=1)
        >>> explanation = lgc.explain(phantom.volume, model="default", device="cpu")
        >>> explanation.predicted_class, explanation.cam.array.shape == phantom.volume.array.shape
        ('nodule', True)
        >>> segmentation = lgc.segment_cam(explanation, threshold=0.5)
        >>> bool((phantom.nodule_labelmap > 0)[segmentation.labelmap.array > 0].any())  # a region on the nodule
        True
    """
    from ..engine.device import resolve_device

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
    _check_region_model_input(card, opts)
    with stage("lung_mask"):
        lungs, chest = _lungs(volume, lung_mask)
    mode = _mode(opts, card, chest)
    _check_memory_before(volume, loaded, mode, opts, dev, method)
    with stage("resample"):
        space, roi_space, lungs_space = _to_model_grid(volume, card.spacing_mm, opts.roi, lungs)
    patch, box = _window(mode, card, space, roi_space if roi_space is not None else opts.roi, lungs_space)
    stride = opts.stride or [max(1, p // 2) for p in patch]
    batch_size = opts.batch_size or default_batch_size(dev, patch)
    if on_estimate is not None:
        _announce(on_estimate, loaded, method, box, patch, stride, dev, batch_size)
    with stage("cam"):
        result = _cam(
            loaded, space, patch, box, stride, method, target_index, opts, dev, batch_size, stage.counter("cam"), cancel
        )
    with stage("resample_back"):
        # both maps are 0 outside the sliding window's box: only the CT voxels within its reach are computed
        cam = cam_on_ct_grid(space.with_array(result.cam.astype(np.float32, copy=False)), volume, box)
        score_map = on_ct_grid(space.with_array(result.score_map.astype(np.float32, copy=False)), volume, box)

    probabilities = card.probabilities_from_score(target_index, float(result.max_score))
    predicted = max(probabilities, key=probabilities.get)
    timings["total"] = time.perf_counter() - started
    return Explanation(
        probabilities=probabilities,
        predicted_class=predicted,
        cam=cam,
        method=method,
        target_class=card.class_names[target_index],
        timings=timings,
        ct=volume,
        lung_mask=lungs,
        score_map=score_map,
        mode=mode,
        layer=opts.layer or card.target_layer,
        n_patches=len(result.patch_scores),
        device=str(dev),
        device_used=result.device,
        batch_size_used=result.batch_size,
        box_model_space=[list(b) for b in box],
        model=card.summary(),
        chest_check=chest.to_dict(),
        options=opts.to_dict(),
    )


# --------------------------------------------------------------------------------------------
# explain's stages
# --------------------------------------------------------------------------------------------
def _check_region_model_input(card: Any, opts: ExplainOptions) -> None:
    """A model made for one region (its card's input is ``roi``) is given one."""
    if card.input == "roi" and (opts.roi is None or opts.mode not in ("auto", "roi")):
        raise InvalidInputError(
            f"model {card.name!r} judges a region around ONE nodule, not a whole scan: give the region "
            "(roi=(centre_ras_mm, size_mm) or a mask; CLI --roi X,Y,Z,SIZE; Slicer: an ROI on the nodule)"
        )


def _lungs(volume: Volume, lung_mask: Any) -> Tuple[np.ndarray, Any]:
    """The lung mask (bool, K, J, I on the CT's grid: ``lung_mask`` as given, or computed) and the
    chest-CT check's findings on it."""
    from ..engine.lung import check_chest_ct
    from ..engine.lung import lung_mask as compute_lung_mask

    if lung_mask is None:
        lungs = compute_lung_mask(volume)
    else:
        lungs = np.asarray(lung_mask.array if isinstance(lung_mask, Volume) else lung_mask).astype(bool)
        if lungs.shape != volume.shape:
            raise InvalidInputError(f"lung_mask shape {lungs.shape} differs from the CT's {volume.shape}")
    return lungs, check_chest_ct(volume, lungs)


def _mode(opts: ExplainOptions, card: Any, chest: Any) -> str:
    """The mode ``auto`` stands for (``roi`` with a roi, ``whole`` for whole-volume models, else
    ``sliding``); a CT that fails the chest-CT check is refused here unless a roi is explained or
    the check is off."""
    mode = opts.mode
    if mode == "auto":
        mode = "roi" if opts.roi is not None else ("whole" if card.patch_size is None else "sliding")
    if opts.chest_check and mode != "roi" and not chest.ok:
        raise NotChestCTError(
            "this CT does not look like a chest CT that holds lungs: "
            + "; ".join(chest.problems)
            + ". LungGradCAM explains chest CTs. If it is one, check that its values are HU; to explain a region "
            "anyway give a roi (--roi X,Y,Z,SIZE), or switch the check off (--no-chest-check, chest_check=False)."
        )
    return mode


def _check_memory_before(volume: Volume, loaded: Any, mode: str, opts: ExplainOptions, dev: Any, method: str) -> None:
    """:func:`~.cost.check_memory` for the batches the CAM stage will run, before resampling."""
    from ..engine.sliding import patch_counts

    card = loaded.card
    space_shape = resampled_shape(volume, card.spacing_mm)
    patch = space_shape if mode == "whole" or card.patch_size is None else tuple(card.patch_size)
    # a batch never holds more patches than cover the whole grid (a whole-volume model: one)
    grid_patches = np.prod(
        patch_counts([(0, n) for n in space_shape], patch, opts.stride or [max(1, p // 2) for p in patch])
    )
    check_memory(
        volume,
        space_shape,
        loaded,
        patch,
        min(opts.batch_size or default_batch_size(dev, patch), int(grid_patches)),
        dev,
        method,
    )


def _to_model_grid(
    volume: Volume, spacing_mm: Sequence[float], roi: Any, lungs: np.ndarray
) -> Tuple[Volume, Optional[np.ndarray], np.ndarray]:
    """The CT (float32, HU; air outside), a roi mask (None unless ``roi`` is one) and the lungs
    resampled to the model's grid of ``spacing_mm`` (i, j, k mm)."""
    ct = volume if volume.array.dtype == np.float32 else volume.with_array(volume.array.astype(np.float32))
    space = resample(ct, spacing_mm, order=1, default_value=AIR_HU)
    roi_space = None
    if isinstance(roi, np.ndarray):
        if roi.shape != volume.shape:
            raise InvalidInputError(f"roi mask shape {roi.shape} differs from the CT's {volume.shape}")
        roi_space = resample_to(LabelMap.like(volume, roi.astype(bool)), space).array > 0
    lungs_space = resample_to(LabelMap.like(volume, lungs), space).array > 0
    return space, roi_space, lungs_space


def _window(mode: str, card: Any, space: Volume, roi: Any, lungs_space: np.ndarray) -> Tuple[Tuple[int, ...], Box]:
    """The patch (K, J, I voxels) and the box of the model's grid the sliding window covers: the
    whole grid (``whole``), the roi (``roi``; one patch centred on it for a region model) or the
    lungs' bounding box and a quarter patch around it (``sliding``)."""
    patch = tuple(card.patch_size) if card.patch_size is not None else space.shape
    if mode == "whole":
        return space.shape, tuple((0, n) for n in space.shape)
    if mode == "roi":
        box = _roi_box(roi, space, patch)
        if card.input == "roi":  # one patch centred on the region: the model judges one lesion
            centre = [(a + b) // 2 for a, b in box]
            box = tuple((max(0, c - p // 2), min(n, c - p // 2 + p)) for c, p, n in zip(centre, patch, space.shape))
        return patch, box
    from ..engine.lung import lung_bbox

    if not lungs_space.any():
        raise VolumeError("no lung found in the CT: is it a chest CT in HU? Give a lung_mask or an roi")
    return patch, lung_bbox(lungs_space, margin_vox=[p // 4 for p in patch])


def _announce(
    on_estimate: Callable[[CostEstimate], Optional[bool]],
    loaded: Any,
    method: str,
    box: Box,
    patch: Sequence[int],
    stride: Sequence[int],
    dev: Any,
    batch_size: int,
) -> None:
    """Tell ``on_estimate`` what the CAM stage will cost; it returning False stops the run."""
    from ..engine.sliding import patch_counts

    n_patches = int(np.prod(patch_counts(box, patch, stride)))
    try:
        estimate = estimate_cost(loaded, method, n_patches, patch, dev, batch_size)
    except (RuntimeError, MemoryError) as exc:  # its trial passes: one batch of the CAM stage's size
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory("timing the heat map's first passes", exc) from None
    if on_estimate(estimate) is False:
        raise CancelledError(f"not started: {estimate}")


def _cam(
    loaded: Any,
    space: Volume,
    patch: Sequence[int],
    box: Box,
    stride: Sequence[int],
    method: str,
    target_index: int,
    opts: ExplainOptions,
    dev: Any,
    batch_size: int,
    progress: Optional[Callable[[int, int], None]],
    cancel: Optional[Callable[[], bool]],
) -> Any:
    """The sliding window's heat map and scores over ``box`` of the model's grid (``SlidingResult``)."""
    import torch

    from ..engine.sliding import sliding_cam

    card = loaded.card
    return sliding_cam(
        loaded.module,
        torch.from_numpy(space.array),
        patch,
        stride=stride,
        method=method,
        target=target_index,
        layer=opts.layer or card.target_layer,
        roi=box,
        batch_size=batch_size,
        preprocess=loaded.prepare,
        progress=progress,
        cancel=cancel,
        device=dev,
        amp=opts.amp,
        activation=card.activation,
        blend="score",
        scale=opts.scale,
    )
