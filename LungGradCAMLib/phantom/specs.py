"""What a phantom is made of and returns: the tissue codes and their HU (:data:`TISSUES`), the
kinds, margins and placements of nodules, :class:`NoduleSpec` and :class:`Phantom`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.errors import InvalidInputError
from ..core.volume import Volume

KINDS = ("solid", "part-solid", "ground-glass", "calcified")
MARGINS = ("smooth", "lobulated", "spiculated")
PLACEMENTS = ("parenchymal", "juxta-pleural", "juxta-vascular")

#: Codes of :attr:`Phantom.tissues`.
TISSUES: Dict[str, int] = {
    "air": 0,
    "skin": 1,
    "fat": 2,
    "muscle": 3,
    "bone": 4,
    "lung": 5,
    "vessel": 6,
    "airway": 7,
    "mediastinum": 8,
    "heart": 9,
    "blood": 10,
    "abdomen": 11,
    "nodule": 12,
    "soft_tissue": 13,
    "table": 14,
}
#: Mean HU of each tissue before texture, blur and noise (bone gets a brighter cortex on top).
TISSUE_HU = np.zeros(len(TISSUES), np.float32)
for _name, _hu in {
    "air": -1000,
    "skin": 30,
    "fat": -100,
    "muscle": 45,
    "bone": 300,
    "lung": -890,
    "vessel": 40,
    "airway": -1000,
    "mediastinum": -90,
    "heart": 40,
    "blood": 40,
    "abdomen": 55,
    "nodule": 30,
    "soft_tissue": 35,
    "table": -150,
}.items():
    TISSUE_HU[TISSUES[_name]] = _hu


@dataclass
class NoduleSpec:
    """One lung nodule.

    ``center_ras``: centre in RAS mm. ``diameter_mm``: diameter of the sphere of equal volume
    (3-30 mm is the clinical range). ``kind``: solid (~0-50 HU), part-solid (ground glass with a
    solid core), ground-glass (-600..-450 HU, vessels stay visible) or calcified (>200 HU core).
    ``margin``: smooth, lobulated or spiculated. ``placement``: parenchymal (surrounded by lung),
    juxta-pleural (on the costal pleura, broad base on the chest wall) or juxta-vascular (attached to
    a vessel); it describes where the nodule is, :func:`random_nodules` honours it. ``malignant``:
    the class label for training. ``label``: its value in :attr:`Phantom.nodule_labelmap` (1-based,
    set by :func:`chest_ct`).
    """

    center_ras: Tuple[float, float, float]
    diameter_mm: float
    kind: str = "solid"
    margin: str = "smooth"
    placement: str = "parenchymal"
    malignant: bool = False
    label: int = 0

    def __post_init__(self) -> None:
        c = np.asarray(self.center_ras, dtype=np.float64)
        if c.shape != (3,) or not np.all(np.isfinite(c)):
            raise InvalidInputError(
                f"NoduleSpec.center_ras must be three finite RAS mm values; got {self.center_ras!r}"
            )
        self.center_ras = tuple(float(v) for v in c)
        if not 1.0 <= float(self.diameter_mm) <= 60.0:
            raise InvalidInputError(f"NoduleSpec.diameter_mm must be within 1-60 mm; got {self.diameter_mm!r}")
        self.diameter_mm = float(self.diameter_mm)
        for name, allowed in (("kind", KINDS), ("margin", MARGINS), ("placement", PLACEMENTS)):
            if getattr(self, name) not in allowed:
                raise InvalidInputError(
                    f"NoduleSpec.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        self.malignant = bool(self.malignant)
        self.label = int(self.label)

    def to_dict(self) -> dict:
        """JSON-able dict of the fields."""
        return asdict(self)


@dataclass
class Phantom:
    """A synthetic chest CT and its truth.

    ``volume``: float32 HU :class:`Volume`. ``lungs``: bool (K, J, I), the anatomical lungs,
    including the intrapulmonary vessels, bronchi and nodules (not the trachea or main bronchi).
    ``nodule_labelmap``: int16 (K, J, I), ``n`` for nodule ``nodules[n-1]`` (voxels at least half
    inside it), 0 elsewhere. ``nodules``: the drawn :class:`NoduleSpec` list with labels set.
    ``tissues``: uint8 (K, J, I) codes of :data:`TISSUES` (the tissue filling each voxel's centre).
    """

    volume: Volume
    lungs: np.ndarray
    nodule_labelmap: np.ndarray
    nodules: List[NoduleSpec] = field(default_factory=list)
    tissues: Optional[np.ndarray] = None
