"""The hot regions of an explanation and what each gets: :func:`explain_and_segment` (what the
command line, the batch and the Slicer module run: :func:`~LungGradCAMLib.pipeline.explainer.explain`,
then the regions, a region model's second opinion on each and the nodule outline) and
:func:`second_opinions`."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

from ..core.results import Explanation, Segmentation
from ..core.volume import Volume, crop
from ..options import ExplainOptions
from .cost import CostEstimate
from .explainer import explain, get_model
from .stages import Progress, Stages


def explain_and_segment(
    volume: Volume,
    options: ExplainOptions,
    *,
    lung_mask: Optional[np.ndarray] = None,
    progress: Optional[Progress] = None,
    cancel: Optional[Callable[[], bool]] = None,
    on_estimate: Optional[Callable[[CostEstimate], Optional[bool]]] = None,
) -> Tuple[Explanation, Segmentation]:
    """:func:`explain`, then :func:`~LungGradCAMLib.pipeline.segment.segment_cam` at ``options.threshold``
    (inside the lungs when ``options.restrict_to_lungs``): what the command line, the batch and the
    Slicer module do. The segmentation stage is timed and reported as ``segment``. The explained
    regions (every region of an ROI run; with a region model, those it is asked about) get the
    nodule outline at their peak (:func:`~LungGradCAMLib.pipeline.outlines.outline_regions`, stage
    ``outline``)."""
    from .outlines import outline_regions
    from .segment import segment_cam

    explanation = explain(
        volume, lung_mask=lung_mask, progress=progress, cancel=cancel, options=options, on_estimate=on_estimate
    )
    stage = Stages(explanation.timings, progress, cancel)
    with stage("segment"):
        segmentation = segment_cam(
            explanation, threshold=options.threshold, within=None if options.restrict_to_lungs else False
        )
    if options.region_model is not None and segmentation.regions:
        with stage("second_opinion"):
            second_opinions(volume, explanation, segmentation, options, cancel=cancel)
    explained = (
        segmentation.regions
        if explanation.mode == "roi"
        else segmentation.regions[:MAX_SECOND_OPINIONS]
        if options.region_model is not None
        else []
    )
    if explained:
        with stage("outline"):
            outline_regions(explanation, segmentation, explained, device=options.device, cancel=cancel)
    return explanation, segmentation


#: The most hot regions (hottest first) a region model is asked about in one run.
MAX_SECOND_OPINIONS = 20


def second_opinions(
    volume: Volume,
    explanation: Explanation,
    segmentation: Segmentation,
    options: ExplainOptions,
    cancel: Optional[Callable[[], bool]] = None,
) -> None:
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
        answer = explain(
            block,
            lung_mask=lungs,
            cancel=cancel,
            options=ExplainOptions(
                model=loaded,
                mode="roi",
                roi=(tuple(centre), 1.0),
                chest_check=False,
                device=options.device,
                batch_size=options.batch_size,
                amp=options.amp,
            ),
        )
        region.second_opinion = {
            "model": card.name,
            "version": card.version,
            "target_class": answer.target_class,
            "probability": answer.probabilities.get(answer.target_class),
            "predicted_class": answer.predicted_class,
            "probabilities": answer.probabilities,
        }
