"""Result types shared by the engine, the pipeline, the writers and the Slicer layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import numpy as np

from .volume import Volume


@dataclass
class Explanation:
    """What ``explain`` returns.

    ``cam`` is a float32 :class:`Volume` in [0, 1] with exactly the input CT's geometry
    (high = important). ``probabilities`` maps class name -> probability. ``timings`` maps stage
    name -> seconds. ``ct`` and ``lung_mask`` (bool, K, J, I) are kept for segmentation and
    reporting; ``score_map`` holds the blended patch scores on the CT's grid.

    How it was made: ``mode`` (sliding, whole or roi), ``layer`` (the CAM layer, "+" fusing
    several), ``n_patches`` (model inputs), ``device`` (asked for, resolved) and ``device_used``
    (where it finished: the CPU after a GPU ran out of memory), ``batch_size_used`` (after any
    halving), ``box_model_space`` ((k0, k1), (j0, j1), (i0, i1) on the model's grid), ``model``
    (the card's summary), ``chest_check`` (the chest-CT check's values) and ``options`` (the
    :class:`~LungGradCAMLib.options.ExplainOptions` as a dict).
    """

    probabilities: Dict[str, float]
    predicted_class: str
    cam: Volume
    method: str
    target_class: str
    timings: Dict[str, float] = field(default_factory=dict)
    ct: Optional[Volume] = None
    lung_mask: Optional[np.ndarray] = None
    score_map: Optional[Volume] = None
    mode: str = ""
    layer: str = ""
    n_patches: int = 0
    device: str = ""
    device_used: str = ""
    batch_size_used: Optional[int] = None
    box_model_space: List[List[int]] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    chest_check: Optional[dict] = None
    options: dict = field(default_factory=dict)


@dataclass
class Region:
    """One connected hot region of a thresholded CAM.

    Volumes in mm³ and ml, CAM in [0, 1], HU from the CT, centroid in RAS mm, bounding boxes as
    ((k0, k1), (j0, j1), (i0, i1)) half-open voxel ranges and as RAS (min xyz, max xyz) of the
    voxel centres. ``score`` is the model's probability for the region when known.
    ``second_opinion``: a region model's answer about this region when one was asked
    (``ExplainOptions.region_model``): ``model``, ``version``, ``target_class``, ``probability``
    (of the target class), ``predicted_class`` and ``probabilities``.
    ``outline``: the nodule outline made at the region's peak (an ROI run's regions, and those
    with a second opinion): :meth:`Outline.to_dict`, the measurements without the mask (its
    ``name`` is the outline's segment in :attr:`Segmentation.outlines`).
    """

    label: int
    name: str
    voxels: int
    volume_mm3: float
    volume_ml: float
    peak_cam: float
    mean_cam: float
    mean_hu: Optional[float]
    max_hu: Optional[float]
    centroid_ras: Tuple[float, float, float]
    peak_ras: Tuple[float, float, float]
    bbox_ijk: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
    bbox_ras: Tuple[Tuple[float, float, float], Tuple[float, float, float]]
    color: Tuple[float, float, float] = (1.0, 0.0, 0.0)
    score: Optional[float] = None
    second_opinion: Optional[dict] = None
    outline: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "Region":
        """A region from its :meth:`to_dict` (e.g. a ``report.json`` entry): lists become tuples,
        keys it does not know are left out."""

        def tuples(value):
            return tuple(tuples(v) for v in value) if isinstance(value, list) else value

        return cls(**{f.name: tuples(record[f.name]) for f in fields(cls) if f.name in record})


@dataclass
class Outline:
    """A nodule outline and what a radiologist measures on it.

    ``mask``: a uint8 :class:`Volume` (1 = nodule; K, J, I) on a box of the CT's own grid (same
    spacing and direction; its ``ijk_to_ras`` places it), empty when no nodule was found near
    ``seed_ras`` (RAS mm: the point it was asked for, e.g. the heat map's peak). ``volume_mm3``/
    ``volume_ml`` count its voxels. ``long_axis_mm`` is the longest diameter in a slice of the CT
    (axial for an axial CT), ``short_axis_mm`` the widest extent perpendicular to it in that slice,
    ``mean_diameter_mm`` their mean (Lung-RADS' and Fleischner's size); ``long_axis_ras`` and
    ``short_axis_ras`` are the end points of both (RAS mm), on the contour at half a voxel. The
    measurements are None for an empty outline. ``method``: how it was made (e.g. ``network``);
    ``model``: the outline model's name and version when a network made it. ``name``/``label``/
    ``color``: its segment (name, label value, RGB in [0, 1]) in the outputs.
    """

    mask: Volume
    seed_ras: Tuple[float, float, float]
    method: str
    voxels: int = 0
    volume_mm3: float = 0.0
    volume_ml: float = 0.0
    long_axis_mm: Optional[float] = None
    short_axis_mm: Optional[float] = None
    mean_diameter_mm: Optional[float] = None
    centroid_ras: Optional[Tuple[float, float, float]] = None
    long_axis_ras: Optional[Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = None
    short_axis_ras: Optional[Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = None
    model: Optional[str] = None
    name: str = "nodule outline"
    label: int = 1
    color: Tuple[float, float, float] = (0.0, 0.85, 1.0)

    @property
    def found(self) -> bool:
        """Whether a nodule was found at the seed (the mask is not empty)."""
        return self.voxels > 0

    def to_dict(self) -> dict:
        """The outline's facts without its mask (JSON-able); an empty outline has no segment (its
        ``name`` is None)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mask"}
        out["found"] = self.found
        if not self.found:
            out["name"] = None
        return out


@dataclass
class Segmentation:
    """``labelmap``: integer :class:`Volume` (0 = background, region ``label`` elsewhere) with the
    CT's geometry; ``regions``: one :class:`Region` per label, hottest first; ``threshold``: the
    level used; ``peak``: the hottest region's peak CAM or, with no region, the highest CAM
    value where regions were looked for (e.g. inside the lungs): how far it stayed below the
    threshold; ``outlines``: the nodule outlines made at regions' peaks (:class:`Outline`, each
    its own segment, which may overlap the heat-map regions: the heat map explains, the outline
    measures)."""

    labelmap: Volume
    regions: List[Region] = field(default_factory=list)
    threshold: Optional[float] = None
    peak: Optional[float] = None
    outlines: List[Outline] = field(default_factory=list)

    def outline_labels(self) -> np.ndarray:
        """The outlines on the labelmap's grid (K, J, I; each outline's ``label`` where its mask is,
        0 elsewhere; where two overlap, the first)."""
        out = np.zeros(self.labelmap.shape, dtype=np.uint8 if len(self.outlines) < 256 else np.uint16)
        for outline in reversed(self.outlines):
            lo = np.rint(self.labelmap.ras_to_ijk_points(outline.mask.ijk_to_ras_points([[0, 0, 0]]))[0][::-1])
            box = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, outline.mask.shape))
            out[box][outline.mask.array > 0] = outline.label
        return out
