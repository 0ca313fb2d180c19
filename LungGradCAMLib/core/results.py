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
class Segmentation:
    """``labelmap``: integer :class:`Volume` (0 = background, region ``label`` elsewhere) with the
    CT's geometry; ``regions``: one :class:`Region` per label, hottest first."""

    labelmap: Volume
    regions: List[Region] = field(default_factory=list)
    threshold: Optional[float] = None
