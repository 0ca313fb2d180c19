"""Real nodules in real lungs: background CT regions for training and evaluation, and the pasting
of a nodule (its HU and the readers' outline) into a background with a feathered edge.

A :class:`Background` is a real CT resampled to a model's grid with its lung mask and the part of
it (``region``) that one split (train / validation / test) may use, so that no background region
serves two splits. :func:`sample_centres` picks patch centres of a kind (lung parenchyma, next to a
vessel, on the pleura, chest wall / mediastinum / diaphragm); :func:`paste` puts a nodule into a
background patch: inside the nodule's outline the voxels are exactly the source's HU, outside the
weight falls linearly to 0 over ``feather_mm``.

Arrays are (K, J, I) on one grid of ``spacing_mm`` (i, j, k mm); intensities are HU.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..core.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
#: Kinds of background patch centre (:func:`sample_centres`).
BACKGROUND_KINDS = ("lung", "vessel", "pleura", "wall")
#: Where a nodule may be placed: free in the parenchyma, touching a vessel, touching the pleura.
PLACEMENT_KINDS = ("parenchyma", "juxta_vascular", "juxta_pleural")
#: Lung voxels above this HU are vessels (or bronchial walls, fissures) for the sampling.
VESSEL_HU = -500.0
#: Fractions of each scan's lung volume (along K) in the train / validation / test bands.
BAND_FRACTIONS = (0.5, 0.2, 0.3)


@dataclass
class Background:
    """A real CT on a model grid: ``hu`` (float32 HU, K, J, I), ``lungs`` (bool), ``region`` (bool:
    where patch centres of ``split`` may lie), ``spacing_mm`` (i, j, k), ``name`` (its source),
    ``source`` (the file or folder it was read from) and ``ijk_to_ras`` (the grid's 4x4 matrix)."""

    name: str
    split: str
    hu: np.ndarray
    lungs: np.ndarray
    region: np.ndarray
    spacing_mm: Tuple[float, float, float]
    source: Optional[Path] = None
    ijk_to_ras: Optional[np.ndarray] = None
    _maps: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # shared by a scan's regions
    _candidates: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def _map(self, name: str) -> np.ndarray:
        """Cached distance maps (mm): ``depth`` of each lung voxel below the lung surface,
        ``vessel`` distance to the nearest vessel voxel in the lungs, ``out`` distance of each
        voxel outside the lungs to them."""
        if name not in self._maps:
            sampling = self.spacing_mm[::-1]
            if name == "depth":
                value = ndimage.distance_transform_edt(self.lungs, sampling=sampling)
            elif name == "vessel":
                value = ndimage.distance_transform_edt(~(self.lungs & (self.hu > VESSEL_HU)), sampling=sampling)
            else:
                value = ndimage.distance_transform_edt(~self.lungs, sampling=sampling)
            self._maps[name] = value.astype(np.float32)
        return self._maps[name]

    def candidates(self, kind: str, radius_mm: float = 0.0) -> np.ndarray:
        """Flat indices (into ``hu``) of the centres of ``kind`` (a :data:`BACKGROUND_KINDS` or
        :data:`PLACEMENT_KINDS` name) inside ``region``, for a nodule of ``radius_mm`` (rounded to
        whole mm); cached."""
        radius = float(round(radius_mm))
        key = f"{kind}@{radius:g}"
        if key in self._candidates:
            return self._candidates[key]
        depth = self._map("depth")
        parenchyma = self.lungs & (self.hu <= VESSEL_HU)
        if kind == "lung":
            where = self.lungs
        elif kind == "vessel":
            where = self.lungs & (self.hu > VESSEL_HU) & (depth > 3.0)
        elif kind == "pleura":
            where = self.lungs & (depth <= 3.0)
        elif kind == "wall":  # chest wall, mediastinum, heart border, diaphragm: soft tissue near the lungs
            out = self._map("out")
            where = (out > 2.0) & (out <= 15.0) & (self.hu > -300.0)
        elif kind == "parenchyma":
            where = parenchyma & (depth > radius + 4.0) & (self._map("vessel") > radius + 2.0)
        elif kind == "juxta_vascular":
            where = parenchyma & (np.abs(self._map("vessel") - (radius + 0.5)) <= 1.0) & (depth > radius + 3.0)
        elif kind == "juxta_pleural":
            where = parenchyma & (np.abs(depth - radius) <= 1.0)
        else:
            raise DataError(f"unknown centre kind {kind!r}; use one of {BACKGROUND_KINDS + PLACEMENT_KINDS}")
        self._candidates[key] = np.flatnonzero(where & self.region)
        return self._candidates[key]


def sample_centres(
    background: Background, kind: str, n: int, rng: np.random.Generator, radius_mm: float = 0.0
) -> np.ndarray:
    """Up to ``n`` distinct (K, J, I) voxel centres of ``kind`` in the background's region, drawn
    with ``rng`` (fewer when fewer exist); shape (m, 3), int."""
    where = background.candidates(kind, radius_mm)
    if where.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    chosen = rng.choice(where, size=min(n, where.size), replace=False)
    return np.stack(np.unravel_index(np.sort(chosen), background.hu.shape), axis=1).astype(np.int64)


def placement_rng(seed: int, patient: str, nodule: str) -> np.random.Generator:
    """The random stream of one nodule's placements, from ``seed`` and a stable hash of its
    ``patient`` and ``nodule`` ID (not Python's salted ``hash``): the same in every process."""
    digest = hashlib.sha256(f"{patient}\0{nodule}".encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def feather_weight(mask: np.ndarray, spacing_mm: Sequence[float], feather_mm: float) -> np.ndarray:
    """Float32 weight (K, J, I): 1 inside ``mask``, falling linearly to 0 at ``feather_mm`` (mm)
    outside it."""
    if feather_mm <= 0:
        return mask.astype(np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=tuple(spacing_mm)[::-1])
    return np.clip(1.0 - outside / float(feather_mm), 0.0, 1.0).astype(np.float32)


def inner_weight(known: np.ndarray, spacing_mm: Sequence[float], feather_mm: float) -> np.ndarray:
    """Float32 weight (K, J, I): 0 outside ``known``, rising linearly inside it to 1 at
    ``feather_mm`` (mm) from its edge (a patch's border does not count as an edge)."""
    depth = ndimage.distance_transform_edt(np.pad(known, 1, constant_values=True), sampling=tuple(spacing_mm)[::-1])[
        1:-1, 1:-1, 1:-1
    ]
    return np.where(known, np.clip(depth / max(float(feather_mm), 1e-6), 0.0, 1.0), 0.0).astype(np.float32)


def paste(background: np.ndarray, source: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``weight * source + (1 - weight) * background`` (float32 HU); where ``source`` is NaN
    (outside the source's field of view) the background is kept."""
    known = np.isfinite(source)
    w = np.where(known, weight, 0.0).astype(np.float32)
    return (w * np.where(known, source, 0.0) + (1.0 - w) * background).astype(np.float32)


# --------------------------------------------------------------------------------------------
# background scans
# --------------------------------------------------------------------------------------------
def _bands(lungs: np.ndarray, gap_vox: int) -> Dict[str, np.ndarray]:
    """The slices (bool over K) of the train / validation / test bands of a scan's lungs, holding
    :data:`BAND_FRACTIONS` of the lung volume (before the gap); the test band starts ``gap_vox``
    slices after the others end, so that no test patch overlaps a training or validation patch."""
    cumulative = np.cumsum(lungs.sum(axis=(1, 2))) / max(int(lungs.sum()), 1)
    a, b = (int(np.searchsorted(cumulative, f)) for f in np.cumsum(BAND_FRACTIONS)[:-1])
    out = {name: np.zeros(lungs.shape[0], dtype=bool) for name in SPLITS}
    out["train"][:a] = True
    out["validation"][a:b] = True
    out["test"][b + gap_vox :] = True  # test patches never overlap training or validation ones
    return out


def load_backgrounds(
    manifest: "str | Path",
    spacing_mm: Sequence[float],
    patch_size: Sequence[int],
    splits: Sequence[str] = SPLITS,
    progress: bool = False,
) -> List[Background]:
    """The background regions a CSV ``manifest`` lists: columns ``image`` (a volume file or DICOM
    folder, relative to the manifest's folder or absolute) and ``split`` (``train``,
    ``validation``, ``test``, or ``bands``: the scan's lungs cut along the slice axis into
    train / validation / test bands of 50 / 20 / 30 % of the lung volume, the test band one patch
    away from the others). Each scan
    is resampled to ``spacing_mm`` (i, j, k mm) and its lungs found with :func:`lung_mask`. Only
    the regions of ``splits`` are returned. A scan that cannot be read is skipped with a warning
    naming it; none at all -> :class:`DataError`. ``progress``: a bar over the scans (reading and
    segmenting each takes seconds)."""
    from ..core.errors import LungGradCAMError
    from ..core.volume import crop
    from ..engine.lung import lung_bbox, lung_mask
    from .data import _read_csv, read_image, to_model_grid

    manifest = Path(manifest)
    out: List[Background] = []
    rows: Any = _read_csv(manifest, ("image", "split"))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="background CTs", unit="scan")
    for where, row in rows:
        split = row["split"].strip()
        if split not in SPLITS + ("bands",):
            raise DataError(f"{where}: split must be train, validation, test or bands; got {split!r}")
        if split != "bands" and split not in splits:
            continue
        image = Path(row["image"])
        image = image if image.is_absolute() else manifest.parent / image
        try:
            grid = to_model_grid(read_image(image), spacing_mm)
        except LungGradCAMError as exc:
            log.warning("background %s skipped: %s", image, exc)
            continue
        lungs = lung_mask(grid, remove_airways=True)
        if not lungs.any():
            log.warning("background %s skipped: no lung found", image)
            continue
        # keep the lungs' box with room for a patch around the outermost centres (wall: 15 mm out)
        margin = [int(max(patch_size)) // 2 + int(np.ceil(15.0 / s)) for s in grid.spacing[::-1]]
        box = lung_bbox(lungs, margin)
        grid = crop(grid, box)
        lungs = lungs[tuple(slice(a, b) for a, b in box)]
        hu = grid.array.astype(np.float32)
        maps: Dict[str, np.ndarray] = {}
        # centres whose patch lies mostly within the scan (the sliding window pads past a scan's
        # edges with air, so patches reaching a quarter past them are part of the job)
        inside = np.zeros(hu.shape, dtype=bool)
        inside[tuple(slice(p // 4, n - p // 4) for p, n in zip(patch_size, hu.shape))] = True
        if split == "bands":
            regions = {s: inside & b[:, None, None] for s, b in _bands(lungs, int(max(patch_size))).items()}
        else:
            regions = {split: inside}
        for s, region in regions.items():
            if s in splits and (lungs & region).sum() * np.prod(grid.spacing) > 1e4:  # >= 10 ml of lung
                out.append(
                    Background(
                        f"{image.name}:{s}" if split == "bands" else image.name,
                        s,
                        hu,
                        lungs,
                        region,
                        tuple(float(v) for v in grid.spacing),
                        image,
                        grid.ijk_to_ras,
                        maps,
                    )
                )
    if not out:
        raise DataError(f"{manifest}: no background scan could be read for split(s) {list(splits)}")
    return out


def background_patches(
    backgrounds: Sequence[Background],
    patch_size: Sequence[int],
    per_kind: int,
    rng: np.random.Generator,
    kinds: Sequence[str] = BACKGROUND_KINDS,
) -> Tuple[np.ndarray, List[str], List[str]]:
    """``per_kind`` patches of each kind from each background (HU float32, (N, K, J, I)) with
    their kinds and background names."""
    from ..core.volume import AIR_HU
    from .data import crop_patch

    patches, kinds_out, names = [], [], []
    for bg in backgrounds:
        for kind in kinds:
            for c in sample_centres(bg, kind, per_kind, rng):
                patches.append(crop_patch(bg.hu, c, patch_size, fill=AIR_HU))
                kinds_out.append(kind)
                names.append(bg.name)
    shape = (0,) + tuple(int(s) for s in patch_size)
    return (np.stack(patches) if patches else np.zeros(shape, np.float32)), kinds_out, names


def hard_negative_patches(
    backgrounds: Sequence[Background],
    model: "LoadedModel",  # noqa: F821
    patch_size: Sequence[int],
    per_region: int,
    rng: np.random.Generator,
    threshold: float = 0.3,
    spacing_apart_mm: float = 6.0,
) -> Tuple[np.ndarray, List[str], List[str]]:
    """Hard negatives: where ``model`` (a ``LoadedModel`` of the backgrounds' spacing, any patch
    size) paints a nodule-free lung. Each background's lungs are explained as the product explains a scan (a
    sliding window of half-patch steps over the lungs' box, the card's method and layer, the
    absolute scale), and the local maxima of the heat map inside the region's lungs that reach
    ``threshold``, at least ``spacing_apart_mm`` apart, are its false hot spots. ``per_region``
    patches of ``patch_size`` per background are cut around them, hottest first and round again, each shifted by
    up to a quarter patch so the spot is seen anywhere near the middle. Returns the patches (HU
    float32, (N, K, J, I)), their kind (``hard``) and background names, as
    :func:`background_patches`."""
    import torch

    from ..core.volume import AIR_HU
    from ..engine.lung import lung_bbox
    from ..engine.sliding import sliding_cam
    from .data import crop_patch

    card = model.card
    size = tuple(int(s) for s in patch_size)
    if not np.allclose(card.spacing_mm, backgrounds[0].spacing_mm):
        raise DataError(
            f"the hard-negative model {card.name!r} takes voxels of {card.spacing_mm} mm; the backgrounds "
            f"are at {list(backgrounds[0].spacing_mm)} mm"
        )
    window = tuple(int(s) for s in card.patch_size)  # the model explains with its own patches
    jitter = max(s // 4 for s in size)
    patches, names = [], []
    for bg in backgrounds:
        where = bg.lungs & bg.region
        if per_region < 1 or not where.any():
            continue
        box = lung_bbox(where, [p // 4 for p in window])
        cam = sliding_cam(
            model.module,
            torch.from_numpy(bg.hu),
            window,
            [max(1, p // 2) for p in window],
            method=card.cam_method,
            target=card.cam_class_index,
            layer=card.target_layer,
            roi=box,
            batch_size=32,
            preprocess=model.prepare,
            activation=card.activation,
        ).cam
        reach = [int(round(spacing_apart_mm / s)) * 2 + 1 for s in bg.spacing_mm[::-1]]
        peaks = where & (cam >= threshold) & (cam == ndimage.maximum_filter(cam, size=reach))
        spots = np.argwhere(peaks)
        spots = spots[np.argsort(-cam[peaks], kind="stable")]
        log.info("hard negatives: %d hot spots >= %.2f in %s", len(spots), threshold, bg.name)
        for n in range(per_region if len(spots) else 0):
            centre = spots[n % len(spots)] + rng.integers(-jitter, jitter + 1, 3)
            patches.append(crop_patch(bg.hu, centre, size, fill=AIR_HU))
            names.append(bg.name)
    shape = (0,) + size
    return (np.stack(patches) if patches else np.zeros(shape, np.float32)), ["hard"] * len(patches), names


def pick(backgrounds: Sequence[Background], split: str) -> List[Background]:
    """The backgrounds of ``split``, or a :class:`DataError` naming what is missing."""
    chosen = [b for b in backgrounds if b.split == split]
    if not chosen:
        raise DataError(f"no background region for the {split} split; add one to the backgrounds manifest")
    return chosen
