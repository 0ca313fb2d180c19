"""Training and evaluation data: labelled CT patches from phantoms, LUNA16, LIDC-IDRI and CSV
manifests, and patient-wise splits.

Every source ends as a :class:`PatchSet`: HU patches (N, K, J, I) cut from the scan after
resampling it to the model's voxel spacing (exactly as the pipeline resamples a scan before the
sliding window), labels, and the patient each patch came from (splits never share a patient).
Positions are RAS mm unless a name says LPS (LUNA16 and DICOM world coordinates are LPS).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import DataError
from ..core.volume import AIR_HU, MAX_POSITION_MM, LabelMap, Volume, resample
from ..io.volume_files import read_volume

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# patch sets
# --------------------------------------------------------------------------------------------
@dataclass
class PatchSet:
    """Labelled patches: ``patches`` (N, K, J, I) int16 HU at ``spacing_mm`` (i, j, k mm),
    ``labels`` (N,) class indices into ``class_names``, ``patients`` (N,) patient IDs,
    ``kinds`` (N,) what each patch shows (e.g. ``nodule``, ``vessel``, ``chest_wall``),
    ``centres`` (N, 3) RAS mm of each patch's centre voxel (NaN where unknown),
    ``masks`` (N, K, J, I) bool, the lesion's outline in each patch where known (e.g. the readers'
    nodule mask of a LIDC VOI; all False for background patches), or None, ``splits`` (N,)
    ``train``/``validation``/``test`` where the source fixes the split (e.g. background regions
    that must not serve two splits), or None (split by patient later), and ``diameters`` (N,) the
    readers' nodule diameter in mm where a table gives one (NaN elsewhere), or None: what the
    diameter-only baseline ranks by (never a model input)."""

    patches: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    class_names: List[str]
    spacing_mm: Tuple[float, float, float]
    kinds: np.ndarray = field(default=None)  # type: ignore[assignment]
    centres: np.ndarray = field(default=None)  # type: ignore[assignment]
    masks: Optional[np.ndarray] = None
    splits: Optional[np.ndarray] = None
    diameters: Optional[np.ndarray] = None

    #: per-patch arrays, in constructor order after ``spacing_mm``; the last three are optional
    _PER_PATCH = ("kinds", "centres", "masks", "splits", "diameters")

    def __post_init__(self) -> None:
        self.patches = np.asarray(self.patches)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.patients = np.asarray(self.patients).astype(str)
        n = len(self.labels)
        self.kinds = np.full(n, "", dtype="<U16") if self.kinds is None else np.asarray(self.kinds).astype(str)
        self.centres = (
            np.full((n, 3), np.nan)
            if self.centres is None
            else np.asarray(self.centres, dtype=np.float64).reshape(-1, 3)
        )
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=bool)
        if self.splits is not None:
            self.splits = np.asarray(self.splits).astype(str)
            unknown = sorted(set(self.splits) - {"train", "validation", "test"})
            if unknown:
                raise DataError(f"a PatchSet's splits must be train, validation or test; got {unknown}")
        if self.diameters is not None:
            self.diameters = np.asarray(self.diameters, dtype=np.float64)
        if (
            self.patches.ndim != 4
            or len(self.patches) != n
            or len(self.patients) != n
            or any(v is not None and len(v) != n for v in (self.kinds, self.centres, self.splits, self.diameters))
            or (self.masks is not None and self.masks.shape != self.patches.shape)
        ):
            raise DataError(
                f"a PatchSet needs (N, K, J, I) patches and N labels/patients/kinds/centres "
                f"(and masks/splits when given); got {self.patches.shape}, {n} labels, "
                f"{len(self.patients)} patients"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels must be 0..{len(self.class_names) - 1} for classes {self.class_names}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def patch_size(self) -> Tuple[int, int, int]:
        """(K, J, I) voxels."""
        return tuple(int(s) for s in self.patches.shape[1:])  # type: ignore[return-value]

    def counts(self) -> Dict[str, int]:
        """Number of patches per class name."""
        return {c: int(np.sum(self.labels == i)) for i, c in enumerate(self.class_names)}

    def _rest(self, index: np.ndarray) -> List[Optional[np.ndarray]]:
        return [None if getattr(self, f) is None else getattr(self, f)[index] for f in self._PER_PATCH]

    def subset(self, index: Sequence[int]) -> "PatchSet":
        index = np.asarray(index, dtype=np.int64)
        return PatchSet(
            self.patches[index],
            self.labels[index],
            self.patients[index],
            list(self.class_names),
            self.spacing_mm,
            *self._rest(index),
        )

    def split_index(self, name: str) -> np.ndarray:
        """Indices of the patches of the fixed split ``name`` (needs ``splits``)."""
        if self.splits is None:
            raise DataError("this patch set has no fixed splits; split it by patient")
        return np.flatnonzero(self.splits == name)

    @staticmethod
    def concatenate(sets: Sequence["PatchSet"]) -> "PatchSet":
        """One PatchSet from several with the same classes, spacing and patch size. Masks are kept
        when every set has them; splits must be given by all or none."""
        first = sets[0]
        for s in sets[1:]:
            if (
                s.class_names != first.class_names
                or s.patch_size != first.patch_size
                or not np.allclose(s.spacing_mm, first.spacing_mm)
            ):
                raise DataError("cannot concatenate patch sets with different classes, patch size or spacing")
        if len({s.splits is None for s in sets}) > 1:
            raise DataError("cannot concatenate patch sets with and without fixed splits")
        masks = None if any(s.masks is None for s in sets) else np.concatenate([s.masks for s in sets])
        splits = None if first.splits is None else np.concatenate([s.splits for s in sets])
        diameters = (
            None
            if all(s.diameters is None for s in sets)
            else np.concatenate([np.full(len(s), np.nan) if s.diameters is None else s.diameters for s in sets])
        )
        return PatchSet(
            np.concatenate([s.patches for s in sets]),
            np.concatenate([s.labels for s in sets]),
            np.concatenate([s.patients for s in sets]),
            list(first.class_names),
            first.spacing_mm,
            np.concatenate([s.kinds for s in sets]),
            np.concatenate([s.centres for s in sets]),
            masks,
            splits,
            diameters,
        )

    def save(self, path: PathLike) -> Path:
        """Cache as an uncompressed .npz (no pickled objects; masks bit-packed), atomically, as a new
        file: an existing file at ``path`` is never replaced (:class:`OutputError`)."""
        path = Path(path)
        extra: Dict[str, np.ndarray] = {}
        if self.masks is not None:
            extra["masks"] = np.packbits(self.masks, axis=-1)
        if self.splits is not None:
            extra["splits"] = self.splits
        if self.diameters is not None:
            extra["diameters"] = self.diameters
        with atomic_path(path, replace=False) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    patches=self.patches,
                    labels=self.labels,
                    patients=self.patients,
                    kinds=self.kinds,
                    centres=self.centres,
                    class_names=np.array(self.class_names),
                    spacing_mm=np.array(self.spacing_mm, dtype=np.float64),
                    **extra,
                )
        return path

    @classmethod
    def load(cls, path: PathLike) -> "PatchSet":
        """Read a cache written by :meth:`save` (``allow_pickle=False``)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                masks = None
                if "masks" in z.files:
                    masks = np.unpackbits(z["masks"], axis=-1, count=z["patches"].shape[-1]).astype(bool)
                return cls(
                    z["patches"],
                    z["labels"],
                    z["patients"],
                    [str(c) for c in z["class_names"]],
                    tuple(float(s) for s in z["spacing_mm"]),
                    z["kinds"],
                    z["centres"],
                    masks,
                    z["splits"] if "splits" in z.files else None,
                    z["diameters"] if "diameters" in z.files else None,
                )
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a patch cache written by LungGradCAM ({exc}); delete it to rebuild") from None


def to_model_grid(volume: Volume, spacing_mm: Sequence[float]) -> Volume:
    """The volume as float32 HU resampled to ``spacing_mm`` (i, j, k mm), air outside: the same
    grid the pipeline runs the model on."""
    ct = volume if volume.array.dtype == np.float32 else volume.with_array(volume.array.astype(np.float32))
    if np.allclose(ct.spacing, spacing_mm, rtol=1e-4):
        return ct
    return resample(ct, spacing_mm, order=1, default_value=AIR_HU)


def crop_patch(array: np.ndarray, centre_kji: Sequence[float], size: Sequence[int], fill: float = AIR_HU) -> np.ndarray:
    """The ``size`` (K, J, I) block of ``array`` whose voxel ``size // 2`` is the voxel nearest to
    ``centre_kji``; parts outside the array are ``fill``."""
    start = [int(round(c)) - s // 2 for c, s in zip(centre_kji, size)]
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for a, s, n in zip(start, size, array.shape):
        lo, hi = max(a, 0), min(a + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - a, hi - a))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _to_int16(patches: Iterable[np.ndarray]) -> np.ndarray:
    stack = np.stack(list(patches)).astype(np.float32)
    return np.clip(np.rint(stack), -32768, 32767).astype(np.int16)


def _ras_to_kji(volume: Volume, ras: np.ndarray) -> np.ndarray:
    return volume.ras_to_ijk_points(ras)[:, ::-1]


def _kji_to_ras(volume: Volume, kji: np.ndarray) -> np.ndarray:
    return volume.ijk_to_ras_points(np.asarray(kji, dtype=np.float64)[::-1])[0]


# --------------------------------------------------------------------------------------------
# phantoms
# --------------------------------------------------------------------------------------------
#: What negative (background) phantom patches are centred on; see :func:`phantom_patches`.
NEGATIVE_KINDS = ("lung", "vessel", "airway", "chest_wall", "mediastinum", "lung_box")
_CHEST_FOV_MM = (345.0, 345.0, 240.0)  # (i, j, k): a whole adult chest


def _phantom_geometry(rng: np.random.Generator) -> Tuple[Tuple[int, int, int], Tuple[float, float, float], float]:
    """A scanner setting: shape (K, J, I) covering a chest, spacing (i, j, k mm), noise SD (HU)."""
    inplane = float(rng.choice([1.6, 1.8, 2.0]))
    thick = float(rng.choice([2.0, 2.5, 3.0]))
    spacing = (inplane, inplane, thick)
    shape = tuple(int(round(f / s)) for f, s in zip(_CHEST_FOV_MM, spacing))[::-1]
    return shape, spacing, float(rng.uniform(10.0, 30.0))  # type: ignore[return-value]


def phantom_patches(
    seeds: Iterable[int],
    patch_size: Sequence[int] = (32, 32, 32),
    spacing_mm: Sequence[float] = (1.5, 1.5, 1.5),
    task: str = "nodule",
    positives_per_nodule: int = 6,
    negatives_per_kind: int = 4,
    jitter_vox: Optional[int] = None,
    hard_negatives: Optional[Callable[..., Sequence[np.ndarray]]] = None,
    progress: Union[bool, str] = False,
) -> PatchSet:
    """Patches from one synthetic chest CT per seed (:func:`LungGradCAMLib.phantom.chest_ct` with
    its random nodules, at a scanner setting drawn from the seed: in-plane 1.6-2 mm, slices 2-3
    mm, noise 10-30 HU), resampled to ``spacing_mm`` (i, j, k mm) as the pipeline does.

    ``task="nodule"`` (classes background, nodule): ``positives_per_nodule`` patches per nodule,
    its centre shifted by up to ``jitter_vox`` voxels per axis (default a quarter of the patch)
    so the model sees nodules anywhere near the middle of a window; and ``negatives_per_kind``
    patches centred in each of :data:`NEGATIVE_KINDS` (lung parenchyma, vessels, airways, chest
    wall and mediastinum near the lungs, anywhere in the lungs' bounding box), none holding a nodule
    voxel; ``hard_negatives(hu, lungs, clear, patient, rng)`` (the phantom on the model grid, its
    lungs, where a patch holds no nodule voxel even when shifted by a quarter patch, its patient ID
    and the seed's random generator) returns more negative patches (kind ``hard``: e.g. around a model's false hot spots,
    :func:`~LungGradCAMLib.training.placement.hard_negative_patches`).
    ``task="malignancy"`` (classes benign, malignant): the nodule patches only, labelled by
    the phantom's ``malignant`` flag. Deterministic per seed; patient ID ``phantom-<seed>``.
    ``PatchSet.masks`` holds each patch's nodule voxels (the phantom's truth on the model grid).
    """
    from scipy import ndimage

    from .. import phantom
    from ..core.volume import resample_to

    if task not in ("nodule", "malignancy"):
        raise DataError(f"task must be 'nodule' or 'malignancy'; got {task!r}")
    size = tuple(int(v) for v in patch_size)
    jitter = max(s // 4 for s in size) if jitter_vox is None else int(jitter_vox)
    codes = phantom.TISSUES
    patches, labels, patients, kinds, centres, masks = [], [], [], [], [], []
    seeds = list(seeds)
    iterator = seeds
    if progress:
        from tqdm import tqdm

        iterator = tqdm(seeds, desc=progress if isinstance(progress, str) else "phantoms", unit="scan")
    for seed in iterator:
        rng = np.random.default_rng([int(seed), 20240605])
        shape, spacing, noise = _phantom_geometry(rng)
        ph = phantom.chest_ct(seed=int(seed), shape=shape, spacing_mm=spacing, noise_hu=noise)
        grid = to_model_grid(ph.volume, spacing_mm)

        def on_grid(mask: np.ndarray) -> np.ndarray:
            return resample_to(LabelMap.like(ph.volume, mask.astype(np.uint8)), grid).array

        nodules = on_grid(ph.nodule_labelmap > 0) > 0

        def add(centre: np.ndarray, label: int, kind: str) -> None:
            patches.append(crop_patch(grid.array, centre, size))
            masks.append(crop_patch(nodules, centre, size, fill=False))
            labels.append(label)
            patients.append(f"phantom-{seed}")
            kinds.append(kind)
            centres.append(_kji_to_ras(grid, np.rint(centre)))

        for spec in ph.nodules:
            centre = _ras_to_kji(grid, np.array([spec.center_ras]))[0]
            label = int(spec.malignant) if task == "malignancy" else 1
            for _ in range(positives_per_nodule):
                add(centre + rng.integers(-jitter, jitter + 1, 3), label, "nodule")
        if task == "malignancy":
            continue
        tissues = on_grid(ph.tissues)
        lungs = on_grid(ph.lungs).astype(bool)
        # centres whose patch would hold a nodule voxel
        forbidden = ndimage.maximum_filter(nodules, size=size)
        near = ndimage.maximum_filter(lungs.astype(np.uint8), size=int(round(20.0 / min(spacing_mm))) | 1) > 0
        box = np.zeros_like(lungs)
        if lungs.any():
            (k0, j0, i0), (k1, j1, i1) = np.argwhere(lungs).min(0), np.argwhere(lungs).max(0) + 1
            box[k0:k1, j0:j1, i0:i1] = True
        wall = np.isin(tissues, [codes[t] for t in ("skin", "fat", "muscle", "bone", "soft_tissue")])
        medi = np.isin(tissues, [codes[t] for t in ("mediastinum", "heart", "blood", "abdomen")])
        where = {
            "lung": tissues == codes["lung"],
            "vessel": tissues == codes["vessel"],
            "airway": tissues == codes["airway"],
            "chest_wall": wall & near,
            "mediastinum": medi & near,
            "lung_box": box,
        }
        for kind in NEGATIVE_KINDS:
            cand = np.flatnonzero(where[kind] & ~forbidden)
            for flat in rng.choice(cand, size=min(negatives_per_kind, cand.size), replace=False):
                add(np.array(np.unravel_index(flat, grid.shape), dtype=np.float64), 0, kind)
        if hard_negatives is not None:
            clear = ~ndimage.maximum_filter(nodules, size=tuple(s + 2 * (s // 4) for s in size))
            for hu in hard_negatives(grid.array, lungs, clear, f"phantom-{seed}", rng):
                patches.append(hu)
                masks.append(np.zeros(size, bool))
                labels.append(0)
                patients.append(f"phantom-{seed}")
                kinds.append("hard")
                centres.append(np.full(3, np.nan))
    classes = ["benign", "malignant"] if task == "malignancy" else ["background", "nodule"]
    if not patches:
        raise DataError(f"phantoms {seeds} gave no patches")
    return PatchSet(
        _to_int16(patches),
        np.array(labels),
        np.array(patients),
        classes,
        tuple(float(v) for v in spacing_mm),
        np.array(kinds),
        np.array(centres),
        np.stack(masks),
    )


# --------------------------------------------------------------------------------------------
# sources: scans + points
# --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One labelled point of one scan: ``image`` (volume file or DICOM folder), ``centre_ras``
    (mm, or None for the scan's centre), ``label`` (class index), ``patient`` ID."""

    image: Path
    centre_ras: Optional[Tuple[float, float, float]]
    label: int
    patient: str
    kind: str = ""


def read_image(path: PathLike) -> Volume:
    """A CT volume from a volume file or a DICOM series folder."""
    path = Path(path)
    if path.is_dir():
        from ..io.dicom import load_dicom_series

        return load_dicom_series(path)
    if not path.exists():
        raise DataError(f"{path}: image not found")
    return read_volume(path)


def patches_from_samples(
    samples: Sequence[Sample],
    class_names: Sequence[str],
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    progress: bool = False,
) -> PatchSet:
    """Cut one ``patch_size`` (K, J, I) patch per sample, reading each scan once and resampling it
    to ``spacing_mm`` (i, j, k mm)."""
    if not samples:
        raise DataError("no samples to cut patches from")
    by_image: Dict[Path, List[Sample]] = defaultdict(list)
    for s in samples:
        by_image[Path(s.image)].append(s)
    patches, labels, patients, kinds, centres = [], [], [], [], []
    images = list(by_image.items())
    if progress:
        from tqdm import tqdm

        images = tqdm(images, desc="scans", unit="scan")
    for image, group in images:
        grid = to_model_grid(read_image(image), spacing_mm)
        centre = (np.array(grid.shape, dtype=np.float64) - 1) / 2
        for s in group:
            kji = centre if s.centre_ras is None else _ras_to_kji(grid, np.array([s.centre_ras]))[0]
            patches.append(crop_patch(grid.array, kji, patch_size))
            labels.append(s.label)
            patients.append(s.patient)
            kinds.append(s.kind)
            centres.append(_kji_to_ras(grid, np.rint(kji)))
    return PatchSet(
        _to_int16(patches),
        np.array(labels),
        np.array(patients),
        list(class_names),
        tuple(float(v) for v in spacing_mm),
        np.array(kinds),
        np.array(centres),
    )


def _read_csv(path: Path, required: Sequence[str]) -> List[Tuple[str, Dict[str, str]]]:
    """The rows of the CSV table ``path``, each as (where: "<path> line N", the row), every row
    with one cell per column of the header. A table without the ``required`` columns, or a row
    with fewer or more cells than the header, raises :class:`DataError` naming its line."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; expected at least {list(required)}")
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if None in row or None in row.values():
                    cells = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                    raise DataError(
                        f"{where}: {cells} cell(s) where the header has {len(header)} columns; "
                        "give each row one cell per column (an empty one for no value)"
                    )
                rows.append((where, row))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc})") from None
    return rows


def _float_cells(
    row: Dict[str, str], names: Sequence[str], where: str, low: float = -MAX_POSITION_MM, high: float = MAX_POSITION_MM
) -> Tuple[float, ...]:
    """The cells ``names`` of ``row`` as numbers from ``low`` to ``high`` (default: a position in
    mm, at most :data:`MAX_POSITION_MM` from the origin, as a CT's); else :class:`DataError`."""
    what = f"{where}: {', '.join(names)} must be " + ("a number" if len(names) == 1 else "numbers")
    try:
        values = tuple(float(row[n]) for n in names)
    except (TypeError, ValueError):
        raise DataError(f"{what}; got {[row.get(n) for n in names]}") from None
    if not all(math.isfinite(v) and low <= v <= high for v in values):
        raise DataError(f"{what} from {low:g} to {high:g}; got {[row.get(n) for n in names]}")
    return values


def lps_to_ras(point: Sequence[float]) -> Tuple[float, float, float]:
    """A world point (x, y, z) in LPS mm as RAS mm."""
    return (-float(point[0]), -float(point[1]), float(point[2]))


def luna16_samples(root: PathLike, max_negatives_per_scan: Optional[int] = 20, seed: int = 0) -> List[Sample]:
    """Samples from a LUNA16-layout folder: ``subset*/<seriesuid>.mhd`` (+ ``.raw``) anywhere
    under ``root``, ``annotations.csv`` (seriesuid, coordX, coordY, coordZ, diameter_mm) and/or
    ``candidates.csv`` (seriesuid, coordX, coordY, coordZ, class), coordinates in world **LPS** mm.

    Positives (label 1): annotations (or candidates of class 1 without annotations.csv);
    negatives (label 0): candidates of class 0, at most ``max_negatives_per_scan`` per scan
    (picked with ``seed``; None = all). The patient is the series UID (LUNA16 has one scan per
    patient). Rows of scans not present are skipped; a folder with none -> :class:`DataError`.
    """
    root = Path(root)
    scans = {p.stem: p for p in root.rglob("*.mhd")}
    if not scans:
        raise DataError(f"{root}: no .mhd scans found (LUNA16 layout: subset*/<seriesuid>.mhd)")
    ann_path, cand_path = root / "annotations.csv", root / "candidates.csv"
    if not ann_path.is_file() and not cand_path.is_file():
        raise DataError(f"{root}: neither annotations.csv nor candidates.csv found")
    xyz = ("coordX", "coordY", "coordZ")
    positives: List[Sample] = []
    negatives: Dict[str, List[Sample]] = defaultdict(list)
    if ann_path.is_file():
        for where, row in _read_csv(ann_path, ("seriesuid",) + xyz):
            if row["seriesuid"] in scans:
                centre = lps_to_ras(_float_cells(row, xyz, where))
                positives.append(Sample(scans[row["seriesuid"]], centre, 1, row["seriesuid"], "nodule"))
    if cand_path.is_file():
        for where, row in _read_csv(cand_path, ("seriesuid", "class") + xyz):
            uid = row["seriesuid"]
            if uid not in scans:
                continue
            if row["class"].strip() not in ("0", "1"):
                raise DataError(f"{where}: class must be 0 or 1; got {row['class']!r}")
            centre = lps_to_ras(_float_cells(row, xyz, where))
            if row["class"].strip() == "0":
                negatives[uid].append(Sample(scans[uid], centre, 0, uid, "candidate"))
            elif not ann_path.is_file():
                positives.append(Sample(scans[uid], centre, 1, uid, "nodule"))
    rng = np.random.default_rng(seed)
    samples = list(positives)
    for uid in sorted(negatives):
        group = negatives[uid]
        if max_negatives_per_scan is not None and len(group) > max_negatives_per_scan:
            group = [group[i] for i in sorted(rng.choice(len(group), max_negatives_per_scan, replace=False))]
        samples.extend(group)
    if not samples:
        raise DataError(f"{root}: the CSV files name none of the {len(scans)} scans found")
    return samples


def manifest_samples(path: PathLike, class_names: Sequence[str]) -> List[Sample]:
    """Samples from a CSV manifest with columns ``image`` (volume file or DICOM folder, relative
    to the manifest's folder or absolute), ``label`` (a class name or index), and optionally
    ``patient`` (defaults to the image path), ``x, y, z`` (patch centre, mm) and ``space``
    (``RAS``, the default, or ``LPS``). Without x, y, z the patch is the scan's centre."""
    path = Path(path)
    samples = []
    for where, row in _read_csv(path, ("image", "label")):
        label = row["label"].strip()
        if label in class_names:
            index = list(class_names).index(label)
        elif label.isdigit() and int(label) < len(class_names):
            index = int(label)
        else:
            raise DataError(f"{where}: label {label!r} is not one of {list(class_names)} or their index")
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        centre = None
        if (row.get("x") or "").strip():
            point = _float_cells(row, ("x", "y", "z"), where)
            space = (row.get("space") or "RAS").strip().upper()
            if space not in ("RAS", "LPS"):
                raise DataError(f"{where}: space must be RAS or LPS; got {space!r}")
            centre = lps_to_ras(point) if space == "LPS" else point
        patient = (row.get("patient") or "").strip() or str(image)
        samples.append(Sample(image, centre, index, patient, label))
    if not samples:
        raise DataError(f"{path}: the manifest has no rows")
    return samples


# --------------------------------------------------------------------------------------------
# patient-wise splits
# --------------------------------------------------------------------------------------------
def patient_kfold(patients: Sequence[str], k: int = 5, seed: int = 0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``k`` (train_index, test_index) pairs over samples whose patient IDs are ``patients``:
    each patient's samples are all in one test fold (never in two splits of a fold). Patients are
    shuffled with ``seed`` and dealt round-robin, largest first, so folds have similar sizes."""
    patients = np.asarray(patients).astype(str)
    unique, counts = np.unique(patients, return_counts=True)
    if k < 2 or k > len(unique):
        raise DataError(f"k-fold needs 2 <= k <= number of patients ({len(unique)}); got k={k}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    order = order[np.argsort(-counts[order], kind="stable")]
    fold_of = {}
    sizes = np.zeros(k, dtype=np.int64)
    for u in order:
        f = int(np.argmin(sizes))
        fold_of[unique[u]] = f
        sizes[f] += counts[u]
    fold = np.array([fold_of[p] for p in patients])
    all_index = np.arange(len(patients))
    return [(all_index[fold != f], all_index[fold == f]) for f in range(k)]


def patient_split(
    patients: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> List[np.ndarray]:
    """Sample indices split by patient into parts of about ``fractions`` of the patients
    (e.g. train/validation/test); each patient is in exactly one part."""
    patients = np.asarray(patients).astype(str)
    unique = np.unique(patients)
    if len(unique) < len(fractions):
        raise DataError(f"{len(unique)} patient(s) cannot be split into {len(fractions)} parts")
    order = np.random.default_rng(seed).permutation(unique)
    n, m = len(unique), len(fractions)
    bounds, prev = [], 0
    for i, b in enumerate(np.round(np.cumsum(fractions) / np.sum(fractions) * n).astype(int)):
        prev = min(max(int(b), prev + 1), n - (m - 1 - i))  # every part keeps at least one patient
        bounds.append(prev)
    parts, start = [], 0
    for end in bounds:
        chosen = set(order[start:end])
        parts.append(np.flatnonzero(np.isin(patients, list(chosen))))
        start = end
    return parts
