"""Synthetic chest CT phantoms with ground truth (lungs, tissues, nodules), deterministic per seed.

:func:`chest_ct` builds an axial chest CT in HU that a radiologist recognises at a glance: air
outside, a body outline that changes with height, skin, subcutaneous fat, muscle, ribs, sternum and
vertebrae, two lungs with parenchymal texture and a branching vessel tree, the trachea splitting at
the carina into the main bronchi, a mediastinum with heart, aorta, pulmonary arteries, superior vena
cava and oesophagus, the diaphragm with liver and stomach below it, a CT table, a scanner-like blur
and correlated noise. Nodules (:class:`NoduleSpec`) of every kind, margin and placement are drawn
into the lungs with partial volume, each with its own label.

Geometry follows Slicer for a standard axial DICOM series: array axes K, J, I; index i runs toward
the patient's left (RAS x decreasing), j toward posterior, k toward superior. Anatomy is built in
"body" millimetres (RAS offsets from the volume centre, x = right, y = anterior, z = superior) for an
adult chest and scaled down (never up) when the field of view is smaller than the chest.

The parts: :mod:`.specs` (tissues, :class:`NoduleSpec`, :class:`Phantom`), :mod:`.tubes` (the grid and
the vessel and airway trees), :mod:`.anatomy`, :mod:`.nodules`, :mod:`.chest` (:func:`chest_ct`).
"""

from .chest import chest_ct, write_dicom_series
from .nodules import random_nodules
from .specs import KINDS, MARGINS, PLACEMENTS, TISSUES, NoduleSpec, Phantom

__all__ = [
    "KINDS",
    "MARGINS",
    "PLACEMENTS",
    "TISSUES",
    "NoduleSpec",
    "Phantom",
    "chest_ct",
    "random_nodules",
    "write_dicom_series",
]
