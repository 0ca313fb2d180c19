"""LIDC-IDRI as training data: the readers' XML (nodules, their outlines and malignancy ratings)
over the DICOM series, and the volumes of interest (nodule crops in HU with the readers' masks)
placed into real lungs."""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import DataError, LungGradCAMError
from ..core.volume import AIR_HU, Volume, resample
from ..io.volume_files import read_volume
from .data import (
    PatchSet,
    _float_cells,
    _kji_to_ras,
    _ras_to_kji,
    _read_csv,
    _to_int16,
    crop_patch,
    patient_split,
    phantom_patches,
    to_model_grid,
)

PathLike = Union[str, "os.PathLike[str]"]
if TYPE_CHECKING:
    from .placement import Background
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# LIDC-IDRI reader XML
# --------------------------------------------------------------------------------------------
@dataclass
class LidcReading:
    """One reader's outline of one nodule: ``rois`` maps slice z (mm) to a list of
    (inclusion, points) with points (N, 2) as (x = column i, y = row j) pixel indices."""

    reader: int
    nodule_id: str
    malignancy: Optional[int]
    rois: Dict[float, List[Tuple[bool, np.ndarray]]]


@dataclass
class LidcNodule:
    """One nodule as the readers agree: ``mask`` (bool K, J, I, the voxels outlined by at least
    ``consensus`` of the readings in its cluster), the readings' ``malignancy`` ratings, ``label``
    (0 benign: median rating < 3, 1 malignant: > 3, None: median 3 or unrated), ``centre_ras`` (mm)."""

    mask: np.ndarray
    readers: List[int]
    malignancy: List[int]
    label: Optional[int]
    centre_ras: Tuple[float, float, float]


def parse_lidc_xml(path: PathLike) -> Tuple[str, List[LidcReading]]:
    """The series UID and every reader's nodule outlines from a LIDC-IDRI XML file
    (``readingSession/unblindedReadNodule/roi`` edge maps per ``imageZposition``)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: not a readable LIDC XML file ({exc})") from None
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    series = (root.findtext(f".//{ns}SeriesInstanceUid") or "").strip()
    readings = []
    sessions = root.findall(f"{ns}readingSession")
    if not sessions:
        raise DataError(f"{path}: no readingSession elements: is it a LIDC-IDRI reader XML?")
    for reader, session in enumerate(sessions):
        for nodule in session.findall(f"{ns}unblindedReadNodule"):
            text = nodule.findtext(f"{ns}characteristics/{ns}malignancy")
            rois: Dict[float, List[Tuple[bool, np.ndarray]]] = defaultdict(list)
            for roi in nodule.findall(f"{ns}roi"):
                try:
                    z = round(float(roi.findtext(f"{ns}imageZposition")), 3)
                    pts = np.array(
                        [
                            [int(e.findtext(f"{ns}xCoord")), int(e.findtext(f"{ns}yCoord"))]
                            for e in roi.findall(f"{ns}edgeMap")
                        ],
                        dtype=np.int64,
                    )
                except (TypeError, ValueError):
                    raise DataError(
                        f"{path}: malformed roi in nodule {nodule.findtext(f'{ns}noduleID')!r} of reading {reader + 1}"
                    ) from None
                inclusion = (roi.findtext(f"{ns}inclusion") or "TRUE").strip().upper() == "TRUE"
                if len(pts):
                    rois[z].append((inclusion, pts))
            readings.append(
                LidcReading(
                    reader,
                    (nodule.findtext(f"{ns}noduleID") or "").strip(),
                    int(text) if text and text.strip().isdigit() else None,
                    dict(rois),
                )
            )
    return series, readings


def _rasterise(reading: LidcReading, volume: Volume, z_to_k: Dict[float, int]) -> np.ndarray:
    from skimage.draw import polygon

    mask = np.zeros(volume.shape, dtype=bool)
    _, rows, cols = volume.shape
    for z, outlines in reading.rois.items():
        k = z_to_k.get(z)
        if k is None:
            continue
        for inclusion, pts in sorted(outlines, key=lambda o: not o[0]):  # inclusions first
            plane = np.zeros((rows, cols), dtype=bool)
            rr, cc = polygon(pts[:, 1], pts[:, 0], shape=(rows, cols))
            plane[rr, cc] = True
            inside = (pts[:, 1] >= 0) & (pts[:, 1] < rows) & (pts[:, 0] >= 0) & (pts[:, 0] < cols)
            plane[pts[inside, 1], pts[inside, 0]] = True  # the edge pixels belong to the nodule
            if inclusion:
                mask[k] |= plane
            else:
                mask[k] &= ~plane
    return mask


def lidc_nodules(xml_path: PathLike, volume: Volume, consensus: float = 0.5) -> List[LidcNodule]:
    """Nodules of a LIDC-IDRI series by reader consensus, on ``volume``'s grid (the series as
    loaded from its DICOM files; axial, so a roi's z matches a slice's RAS S coordinate).

    Readings are rasterised (edge maps filled, exclusions removed; rois on slices not in
    ``volume`` are dropped), then grouped into nodules when their masks overlap (within 1 voxel);
    a nodule's mask is the voxels outlined by at least ``consensus`` of its readings (pylidc's
    convention). Readings with no slice in the volume, and single-point marks of nodules < 3 mm,
    are dropped. Malignancy is binarised on the median rating: < 3 benign (0), > 3 malignant (1),
    3 excluded (None), as the published LIDC benchmarks do.
    """
    from scipy import ndimage

    _, readings = parse_lidc_xml(xml_path)
    z_of_k = volume.ijk_to_ras_points(
        np.stack([np.zeros(volume.shape[0]), np.zeros(volume.shape[0]), np.arange(volume.shape[0])], axis=1)
    )[:, 2]
    z_to_k = {round(float(z), 3): k for k, z in enumerate(z_of_k)}
    masks, kept = [], []
    for reading in readings:
        mask = _rasterise(reading, volume, z_to_k)
        if mask.sum() > 1:
            masks.append(mask)
            kept.append(reading)
    # union-find over readings whose (1-voxel dilated) masks touch
    parent = list(range(len(masks)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    grown = [ndimage.binary_dilation(m) for m in masks]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            if (grown[a] & masks[b]).any():
                parent[find(a)] = find(b)
    clusters: Dict[int, List[int]] = defaultdict(list)
    for a in range(len(masks)):
        clusters[find(a)].append(a)
    nodules = []
    for members in clusters.values():
        votes = np.sum([masks[a] for a in members], axis=0)
        mask = votes >= consensus * len(members)
        if not mask.any():
            continue
        ratings = [kept[a].malignancy for a in members if kept[a].malignancy is not None]
        label = None
        if ratings:
            median = float(np.median(ratings))
            label = 0 if median < 3 else (1 if median > 3 else None)
        kji = np.argwhere(mask).mean(axis=0)
        centre = tuple(float(v) for v in volume.ijk_to_ras_points(kji[::-1])[0])
        nodules.append(LidcNodule(mask, [kept[a].reader for a in members], ratings, label, centre))
    nodules.sort(key=lambda n: -int(n.mask.sum()))
    return nodules


def lidc_patches(
    root: PathLike,
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    consensus: float = 0.5,
    progress: bool = False,
) -> PatchSet:
    """Benign vs malignant nodule patches (classes ``benign``, ``malignant``) from a LIDC-IDRI
    folder: one sub-folder per patient (e.g. ``LIDC-IDRI-0001``) holding the DICOM series and the
    reader XML files anywhere below it. Each XML's series is loaded, its nodules are found with
    :func:`lidc_nodules`, and each nodule with a malignancy label (median rating not 3) gives one
    patch centred on its consensus mask. XMLs whose series is not present are skipped."""
    from ..core.errors import DicomError
    from ..io.dicom import load_dicom_series

    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and any(p.rglob("*.xml"))) if root.is_dir() else []
    if not folders:
        raise DataError(f"{root}: no patient folders with LIDC reader XML files found")
    patches, labels, patients, centres = [], [], [], []
    iterator = folders
    if progress:
        from tqdm import tqdm

        iterator = tqdm(folders, desc="patients", unit="patient")
    for folder in iterator:
        for xml in sorted(folder.rglob("*.xml")):
            series_uid, _ = parse_lidc_xml(xml)
            try:
                volume = load_dicom_series(folder, series_uid=series_uid or None)
            except DicomError as exc:
                log.info("%s: series not loaded (%s); skipped", xml, exc)
                continue
            grid = to_model_grid(volume, spacing_mm)
            for nodule in lidc_nodules(xml, volume, consensus):
                if nodule.label is None:
                    continue
                kji = _ras_to_kji(grid, np.array([nodule.centre_ras]))[0]
                patches.append(crop_patch(grid.array, kji, patch_size))
                labels.append(nodule.label)
                patients.append(folder.name)
                centres.append(_kji_to_ras(grid, np.rint(kji)))
    if not patches:
        raise DataError(
            f"{root}: no LIDC nodule with a malignancy label (median rating 1-2 or 4-5) in the series present"
        )
    return PatchSet(
        _to_int16(patches),
        np.array(labels),
        np.array(patients),
        ["benign", "malignant"],
        tuple(float(v) for v in spacing_mm),
        np.full(len(labels), "nodule"),
        np.array(centres),
    )


# --------------------------------------------------------------------------------------------
# LIDC-IDRI volumes of interest (nodule crops in HU with the readers' masks)
# --------------------------------------------------------------------------------------------
#: Columns of ``nodules.csv`` a LIDC VOI folder must have.
VOI_COLUMNS = ("patient_id", "nodule_id", "Diagnosis", "diameter_mm")
#: The values ``nodules.csv`` may hold: LIDC's malignancy ratings, a lesion's diameter (mm;
#: a chest is about 500 mm wide).
MALIGNANCY_RATINGS = (1.0, 5.0)
DIAMETERS_MM = (1e-3, 500.0)


def _plain_name(row: Dict[str, str], column: str, where: str) -> str:
    """``row[column]`` when it can be part of a file name inside the VOI folder: not empty, no
    path separator or control character (an ID such as ``../../x`` or ``/etc/x`` would read files
    outside it)."""
    value = row[column].strip()
    if not value or any(c in value for c in "/\\:") or not value.isprintable():
        raise DataError(
            f"{where}: {column} {value!r} is not a plain name; the VOI folder's files are named "
            "image/<patient_id>_R_<nodule_id>.nii.gz, so IDs hold no path separators"
        )
    return value


@dataclass
class LidcVoi:
    """One real LIDC-IDRI nodule: ``image`` (a NIfTI VOI in HU; spacing and origin from its
    header) and ``mask`` (the readers' outline on the same grid), ``malignant`` (1 when the table's
    Diagnosis is Malign, 0 Benign), ``malignancy`` (median reader rating 1-5, NaN if absent),
    ``diameter_mm`` and the table's other columns in ``row``."""

    patient: str
    nodule_id: str
    image: Path
    mask: Path
    malignant: int
    malignancy: float
    diameter_mm: float
    row: Dict[str, str] = field(default_factory=dict, repr=False)

    def load(self) -> Tuple[Volume, np.ndarray]:
        """The VOI (float32 HU) and its nodule mask (bool, K, J, I on the same grid)."""
        image, mask = read_volume(self.image), read_volume(self.mask)
        if image.shape != mask.shape or not np.allclose(image.ijk_to_ras, mask.ijk_to_ras, atol=1e-3):
            raise DataError(f"{self.mask}: the mask's grid differs from its image {self.image.name}")
        outline = mask.array > 0
        if not outline.any():
            raise DataError(f"{self.mask}: the nodule mask is empty")
        return image.with_array(image.array.astype(np.float32)), outline


def lidc_voi_records(root: PathLike) -> List[LidcVoi]:
    """The nodules of a LIDC VOI folder: ``nodules.csv`` (one row per nodule: patient_id,
    nodule_id, Diagnosis Benign/Malign, diameter_mm, Malignancy_value, ...) with
    ``image/<patient_id>_R_<nodule_id>.nii.gz`` and ``nodule_mask/<same name>``. Rows whose
    files are missing are skipped with one warning naming them; a bad table -> :class:`DataError`."""
    root = Path(root)
    table = root / "nodules.csv"
    if not table.is_file():
        raise DataError(f"{root}: no nodules.csv; a LIDC VOI folder holds nodules.csv, image/ and nodule_mask/")
    records, missing = [], []
    for where, row in _read_csv(table, VOI_COLUMNS):
        diagnosis = row["Diagnosis"].strip().lower()
        if diagnosis not in ("benign", "malign", "malignant"):
            raise DataError(f"{where}: Diagnosis must be Benign or Malign; got {row['Diagnosis']!r}")
        patient, nodule = (_plain_name(row, column, where) for column in ("patient_id", "nodule_id"))
        name = f"{patient}_R_{nodule}.nii.gz"
        image, mask = root / "image" / name, root / "nodule_mask" / name
        if not image.is_file() or not mask.is_file():
            missing.append(str(image if not image.is_file() else mask))
            continue
        rating = math.nan
        if (row.get("Malignancy_value") or "").strip():
            rating = _float_cells(row, ("Malignancy_value",), where, *MALIGNANCY_RATINGS)[0]
        records.append(
            LidcVoi(
                patient,
                nodule,
                image,
                mask,
                int(diagnosis != "benign"),
                rating,
                _float_cells(row, ("diameter_mm",), where, *DIAMETERS_MM)[0],
                row,
            )
        )
    if missing:
        log.warning(
            "%d row(s) of %s have no image or mask file and are skipped: %s",
            len(missing),
            table,
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )
    if not records:
        raise DataError(f"{table}: none of its rows has its image and mask files under {root}")
    return records


def voi_on_grid(
    voi: LidcVoi, spacing_mm: Sequence[float], size: Sequence[int], offset_vox: Sequence[int] = (0, 0, 0)
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The VOI resampled to ``spacing_mm`` (i, j, k mm) and cut to a ``size`` (K, J, I) block
    centred on the mask's centre of mass shifted by ``offset_vox`` (K, J, I): (HU float32 with NaN
    outside the VOI's field of view, the nodule mask, the block's centre in RAS mm)."""
    image, outline = voi.load()
    grid = resample(image, spacing_mm, order=1, default_value=math.nan)
    mask = resample(image.with_array(outline.astype(np.float32)), spacing_mm, order=1).array >= 0.5
    if not mask.any():  # a nodule smaller than one voxel of the new grid: keep the voxel at its centre
        centre_ras = image.ijk_to_ras_points(np.argwhere(outline).mean(axis=0)[None, ::-1])
        ijk = np.rint(grid.ras_to_ijk_points(centre_ras)[0]).astype(int)
        mask[tuple(np.clip(ijk[::-1], 0, np.asarray(mask.shape) - 1))] = True
    centre = np.argwhere(mask).mean(axis=0) + np.asarray(offset_vox)
    hu = crop_patch(grid.array, centre, size, fill=math.nan)
    cut = crop_patch(mask, centre, size, fill=False)
    return hu, cut, _kji_to_ras(grid, np.rint(centre))


def place_voi(
    hu: np.ndarray, spacing_mm: Sequence[float], voi: LidcVoi, centre_kji: Sequence[int], feather_mm: float = 2.0
) -> Tuple[Tuple[slice, slice, slice], np.ndarray]:
    """Paste ``voi``'s nodule into ``hu`` (float32 HU, K, J, I, on a grid of ``spacing_mm`` i, j, k
    mm, changed in place) with its centre of mass at voxel ``centre_kji``: the VOI resampled to
    the grid (:func:`voi_on_grid`), its outline feathered over ``feather_mm`` into the background
    (:func:`~LungGradCAMLib.training.placement.paste`), so inside the outline the voxels are
    exactly the (resampled) source's HU. Returns the block of ``hu`` it wrote (slices) and the
    nodule's mask on that block; parts past the array's edges are left out."""
    from .placement import feather_weight, paste

    image = read_volume(voi.image)  # the block: the VOI's extent on the new grid, and room for the feather
    extent_mm = np.asarray(image.shape) * np.asarray(image.spacing)[::-1]
    step = np.asarray(spacing_mm, dtype=float)[::-1]
    size = tuple(int(v) for v in np.ceil(extent_mm / step) + 2 * np.ceil(feather_mm / step) + 3)
    source, mask, _ = voi_on_grid(voi, spacing_mm, size)
    weight = feather_weight(mask, spacing_mm, feather_mm)
    start = [int(c) - n // 2 for c, n in zip(centre_kji, size)]  # crop_patch's convention: centre at size // 2
    dst = tuple(slice(max(a, 0), min(a + n, m)) for a, n, m in zip(start, size, hu.shape))
    src = tuple(slice(d.start - a, d.stop - a) for d, a in zip(dst, start))
    hu[dst] = paste(hu[dst], source[src], weight[src])
    return dst, mask[src]


def lidc_voi_patches(
    records: Sequence[LidcVoi],
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    task: str = "malignancy",
    backgrounds: Optional[Sequence["Background"]] = None,
    placements: int = 1,
    jitter_vox: int = 0,
    feather_mm: float = 3.0,
    seed: int = 0,
    progress: Union[bool, str] = False,
) -> PatchSet:
    """Patches of real nodules (with their reader masks in ``PatchSet.masks``), ``placements`` per
    nodule, each centred on the nodule shifted by up to ``jitter_vox`` voxels per axis.

    The VOIs are tight crops (along K only the slices the nodule spans), so the rest of each patch
    comes from a real lung. ``task="malignancy"`` (classes benign, malignant: the table's
    Diagnosis): the VOI with its own surroundings is pasted into a ``backgrounds`` patch at a random
    lung position (weight 1 on the nodule and inside the VOI, falling to 0 over ``feather_mm``
    towards the VOI's edges). ``task="nodule"`` (class ``nodule``; add background patches
    separately): the nodule alone (its outline, feathered over ``feather_mm``) is put into the
    parenchyma, next to a vessel and on the pleura in turn (the VOI's box edges would tell a
    detector where nodules are). Without backgrounds the rest of the patch is air.
    Each nodule's placements are drawn from its own random stream (:func:`placement_rng` of
    ``seed``, patient and nodule), so a nodule's patches are the same whichever other nodules are
    placed with it (a test patient's patches do not depend on who else was loaded). The patient is
    ``patient_id``; ``diameters`` holds the table's ``diameter_mm``. ``progress``: a progress bar,
    labelled with it when it is a string (e.g. "nodules (validation)")."""
    from .placement import PLACEMENT_KINDS, feather_weight, inner_weight, paste, placement_rng, sample_centres

    if task not in ("malignancy", "nodule"):
        raise DataError(f"task must be 'malignancy' or 'nodule'; got {task!r}")
    size = tuple(int(s) for s in patch_size)
    patches, labels, patients, kinds, centres, masks, diameters = [], [], [], [], [], [], []
    iterator: Iterable[LidcVoi] = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc=progress if isinstance(progress, str) else "nodules", unit="nodule")
    for voi in iterator:
        rng = placement_rng(seed, voi.patient, voi.nodule_id)
        for p in range(max(1, placements)):
            offset = rng.integers(-jitter_vox, jitter_vox + 1, size=3) if jitter_vox else np.zeros(3, int)
            try:
                hu, mask, centre = voi_on_grid(voi, spacing_mm, size, offset)
            except LungGradCAMError as exc:
                log.warning("%s skipped: %s", voi.image, exc)
                break
            kind = "own" if task == "malignancy" else PLACEMENT_KINDS[p % len(PLACEMENT_KINDS)]
            weight = feather_weight(mask, spacing_mm, feather_mm)
            if kind == "own":  # the VOI's own surroundings too, fading out towards its edges
                weight = np.maximum(weight, inner_weight(np.isfinite(hu), spacing_mm, feather_mm))
            background = np.full(size, AIR_HU, np.float32)
            if backgrounds:
                bg = backgrounds[int(rng.integers(len(backgrounds)))]
                radius = (3 * mask.sum() * float(np.prod(spacing_mm)) / (4 * math.pi)) ** (1 / 3)
                site = sample_centres(bg, "lung" if kind == "own" else kind, 1, rng, radius_mm=radius)
                if len(site) == 0:
                    site = sample_centres(bg, "lung", 1, rng)
                # the nodule's centre goes to the site: shift the patch by the jitter offset
                background = crop_patch(bg.hu, site[0] - np.asarray(offset), size)
            patches.append(paste(background, hu, weight))
            masks.append(mask)
            labels.append(voi.malignant if task == "malignancy" else 1)
            patients.append(voi.patient)
            kinds.append(kind if task == "nodule" else "nodule")
            centres.append(centre)
            diameters.append(voi.diameter_mm)
    if not patches:
        raise DataError("no LIDC VOI could be read")
    classes = ["benign", "malignant"] if task == "malignancy" else ["background", "nodule"]
    return PatchSet(
        _to_int16(patches),
        np.array(labels),
        np.array(patients),
        classes,
        tuple(float(v) for v in spacing_mm),
        np.array(kinds),
        np.array(centres),
        np.stack(masks),
        diameters=np.array(diameters),
    )


def lidc_voi_detection_patches(
    records: Sequence[LidcVoi],
    backgrounds: Sequence["Background"],
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    placements: int = 3,
    jitter_vox: Optional[int] = None,
    negatives_per_kind: int = 100,
    phantom_seeds: Sequence[int] = (),
    phantom_positives_per_nodule: int = 6,
    phantom_negatives_per_kind: int = 16,
    seed: int = 0,
    hard_negative_models: Sequence[Any] = (),
    hard_negatives_per_region: int = 0,
    hard_negatives_per_phantom: int = 0,
    hard_negative_threshold: float = 0.3,
    progress: bool = False,
) -> PatchSet:
    """Nodule-vs-background patches (classes background, nodule) from real nodules placed into
    real lungs, with fixed ``splits``: the VOIs' patients (and the phantoms' seeds) are split by
    patient into train / validation / test by ``fractions``; each split's nodules are placed into
    that split's background regions only (:func:`lidc_voi_patches`, ``placements`` per nodule,
    shifted by up to ``jitter_vox`` voxels, default a quarter patch), and its negatives are
    ``negatives_per_kind`` patches of each :data:`~LungGradCAMLib.training.placement.BACKGROUND_KINDS` from
    each of its regions (patient ``background:<region>``). ``phantom_seeds`` adds synthetic chest
    CTs (:func:`phantom_patches` with ``phantom_positives_per_nodule`` and
    ``phantom_negatives_per_kind``), split by seed the same way. Each of ``hard_negative_models``
    (``LoadedModel``: rounds of hard-negative mining) adds ``hard_negatives_per_region`` patches
    of each region around the spots where it paints the nodule-free lung at
    ``hard_negative_threshold`` or more (:func:`~LungGradCAMLib.training.placement.hard_negative_patches`),
    and ``hard_negatives_per_phantom`` of each phantom's lungs away from its nodules."""
    from .placement import SPLITS, Background, background_patches, hard_negative_patches, pick

    size = tuple(int(s) for s in patch_size)
    jitter = max(s // 4 for s in size) if jitter_vox is None else int(jitter_vox)
    rng = np.random.default_rng(seed)
    classes = ["background", "nodule"]
    parts = patient_split([r.patient for r in records], fractions, seed=seed)
    phantom_parts = (
        patient_split([f"phantom-{s}" for s in phantom_seeds], fractions, seed=seed)
        if len(phantom_seeds)
        else [[] for _ in SPLITS]
    )
    sets = []
    for n, (split, index, phantoms) in enumerate(zip(SPLITS, parts, phantom_parts)):
        regions = pick(backgrounds, split)
        nodules = lidc_voi_patches(
            [records[i] for i in index],
            size,
            spacing_mm,
            task="nodule",
            backgrounds=regions,
            placements=placements,
            jitter_vox=jitter,
            seed=seed * 31 + n,
            progress=progress and f"nodules ({split})",
        )
        found = [nodules]
        sampled = [background_patches(regions, size, negatives_per_kind, rng)]
        sampled += [
            hard_negative_patches(regions, model, size, hard_negatives_per_region, rng, hard_negative_threshold)
            for model in hard_negative_models
        ]
        for hu, kinds, names in sampled:
            found.append(
                PatchSet(
                    _to_int16(hu),
                    np.zeros(len(hu), np.int64),
                    [f"background:{m}" for m in names],
                    classes,
                    nodules.spacing_mm,
                    kinds,
                    masks=np.zeros(hu.shape, bool),
                )
            )
        if len(phantoms):

            def hard(
                hu: np.ndarray, lungs: np.ndarray, clear: np.ndarray, patient: str, draw: np.random.Generator
            ) -> List[np.ndarray]:
                scan = Background(patient, split, hu, lungs, clear, tuple(float(v) for v in spacing_mm))
                return [
                    p
                    for model in hard_negative_models
                    for p in hard_negative_patches(
                        [scan], model, size, hard_negatives_per_phantom, draw, hard_negative_threshold
                    )[0]
                ]

            found.append(
                phantom_patches(
                    [int(phantom_seeds[i]) for i in phantoms],
                    size,
                    spacing_mm,
                    positives_per_nodule=phantom_positives_per_nodule,
                    negatives_per_kind=phantom_negatives_per_kind,
                    jitter_vox=jitter,
                    hard_negatives=hard if hard_negatives_per_phantom > 0 else None,
                    progress=progress and f"phantoms ({split})",
                )
            )
        part = PatchSet.concatenate(found)
        part.splits = np.full(len(part), split)
        sets.append(part)
    return PatchSet.concatenate(sets)
