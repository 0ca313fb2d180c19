"""Nodule outlines for the explained regions: the nodule at each region's heat-map peak, outlined
and measured (:func:`~LungGradCAMLib.engine.outline.nodule_outline`), as its own segment beside
the heat-map region it was found from (the heat map explains, the outline measures)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..core.errors import CancelledError
from ..core.results import Explanation, Region, Segmentation


def outline_regions(
    explanation: Explanation,
    segmentation: Segmentation,
    regions: Sequence[Region],
    device: Optional[str] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> None:
    """Outline the nodule at the peak of each of ``regions`` (hot regions of ``segmentation``) in
    the explanation's CT, with its lung mask, by the bundled outline network. A found outline is
    added to ``segmentation.outlines`` as "nodule outline N" (label N); a region whose peak lies in
    an outline made already shares it (one nodule, one segment). Each region's ``outline`` gets the
    measurements (:meth:`~LungGradCAMLib.core.results.Outline.to_dict`; ``found`` False when no
    nodule lies within the search distance of its peak)."""
    from ..engine.outline import nodule_outline

    for region in regions:
        if cancel is not None and cancel():
            raise CancelledError("cancelled while outlining the nodules")
        shared = next((o for o in segmentation.outlines if _holds(o, region.peak_ras)), None)
        if shared is not None:
            region.outline = shared.to_dict()
            continue
        outline = nodule_outline(explanation.ct, region.peak_ras, lungs=explanation.lung_mask, device=device)
        if outline.found:
            outline.label = len(segmentation.outlines) + 1
            outline.name = f"nodule outline {outline.label}"
            segmentation.outlines.append(outline)
        region.outline = outline.to_dict()


def _holds(outline: "Outline", ras: Sequence[float]) -> bool:  # noqa: F821
    """Whether the voxel at ``ras`` (mm) is inside ``outline``'s mask."""
    kji = np.rint(outline.mask.ras_to_ijk_points(np.asarray(ras, float))[0][::-1]).astype(int)
    return bool(np.all((kji >= 0) & (kji < outline.mask.shape)) and outline.mask.array[tuple(kji)])


def outline_text(outline: dict) -> str:
    """A region's nodule outline (``Region.outline``) as a radiologist reads it: volume and diameters."""
    if not outline.get("found"):
        return "no nodule outlined at its peak"
    return (
        f"{outline['name']}: {outline['volume_ml']:.2f} ml, long axis {outline['long_axis_mm']:.1f} mm, "
        f"short axis {outline['short_axis_mm']:.1f} mm, mean diameter {outline['mean_diameter_mm']:.1f} mm"
    )
