"""Where training and evaluation patches come from: :class:`DataSpec`, a typed description of a
data source (what ``lunggradcam train``/``evaluate``'s data options say), and :func:`load_data`,
the :class:`PatchSet` it describes, cut at a model card's patch size and spacing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.atomic import check_new_file
from ..core.errors import DataError, InvalidInputError
from .data import PatchSet, luna16_samples, manifest_samples, patches_from_samples, phantom_patches
from .lidc import lidc_patches, lidc_voi_detection_patches, lidc_voi_patches, lidc_voi_records

if TYPE_CHECKING:
    from ..engine.models import ModelCard

#: The data sources, as ``--source`` names them.
SOURCES = ("phantom", "luna16", "lidc", "lidc-vois", "manifest", "patches")


def parse_seeds(text: str) -> List[int]:
    """'0-31' or '1,2,5-7' -> list of ints."""
    seeds: List[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                seeds.extend(range(int(a), int(b) + 1))
            elif part.strip():
                seeds.append(int(part))
    except ValueError:
        raise InvalidInputError(f"--phantom-seeds: expected e.g. '0-31' or '1,2,5-7'; got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise InvalidInputError(f"--phantom-seeds: expected non-negative seeds; got {text!r}")
    return seeds


def seeds_text(seeds: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the form :func:`parse_seeds` reads)."""
    parts, values = [], sorted(set(int(s) for s in seeds))
    start = prev = None
    for s in values + [None]:
        if s is not None and prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = s
    return ",".join(parts)


@dataclass
class DataSpec:
    """A data source. ``source``: one of :data:`SOURCES` (``path``: its folder, CSV or patch
    cache; not for phantom); ``task``: nodule vs background, or benign vs malignant; ``cache``:
    a .npz the patches are saved to and read back from; ``split_fractions``: the validation and
    test fractions of the fixed lidc-vois nodule splits; ``hard_negatives``: models (names or
    paths) whose false hot spots in the background regions become negatives; ``patients``: only
    these patients' patches (None: all; e.g. a model card's test patients; a cache is read, never
    written, when given). The rest are the counts of each source (see ``lunggradcam train --help``)."""

    source: str = "phantom"
    path: Optional[str] = None
    backgrounds: Optional[str] = None
    placements: Optional[int] = None
    negatives_per_region: int = 100
    with_phantoms: Sequence[int] = ()
    phantom_seeds: Sequence[int] = tuple(range(1000, 1016))
    task: str = "nodule"
    positives_per_nodule: int = 6
    negatives_per_kind: int = 4
    max_negatives_per_scan: int = 20
    classes: Sequence[str] = ("background", "nodule")
    cache: Optional[str] = None
    hard_negatives: Sequence[str] = ()
    hard_negatives_per_region: int = 200
    hard_negatives_per_phantom: int = 0
    hard_negative_threshold: float = 0.3
    seed: int = 0
    split_fractions: Tuple[float, float] = (0.15, 0.15)
    patients: Optional[Sequence[str]] = None

    #: The fields that say what the data is (a model card's ``training.data_spec``); the others
    #: (cache, patients) say where it is kept and which part is read.
    DESCRIBING = (
        "source",
        "path",
        "backgrounds",
        "placements",
        "negatives_per_region",
        "with_phantoms",
        "phantom_seeds",
        "task",
        "positives_per_nodule",
        "negatives_per_kind",
        "max_negatives_per_scan",
        "classes",
        "hard_negatives",
        "hard_negatives_per_region",
        "hard_negatives_per_phantom",
        "hard_negative_threshold",
        "seed",
        "split_fractions",
    )

    def to_dict(self) -> Dict[str, Any]:
        """The :data:`DESCRIBING` fields as JSON-able values."""
        return {
            k: (list(v) if isinstance(v, (tuple, list)) else v)
            for k, v in ((k, getattr(self, k)) for k in self.DESCRIBING)
        }

    @classmethod
    def from_dict(cls, values: Dict[str, Any], **overrides: Any) -> "DataSpec":
        """A DataSpec from :meth:`to_dict`'s values (unknown keys refused) with ``overrides``."""
        merged = {**values, **overrides}
        unknown = sorted(set(merged) - set(cls.DESCRIBING) - {"cache", "patients"})
        if unknown:
            raise InvalidInputError(f"unknown data setting(s) {unknown}; known: {list(cls.DESCRIBING)}")
        for key in ("with_phantoms", "phantom_seeds", "classes", "hard_negatives", "split_fractions"):
            if key in merged and merged[key] is not None:
                merged[key] = tuple(merged[key])
        return cls(**merged)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidInputError(f"data source {self.source!r}: use one of {', '.join(SOURCES)}")
        if self.source not in ("phantom", "patches") and not self.path:
            raise InvalidInputError(f"--source {self.source} needs --path")

    def class_names(self) -> List[str]:
        """The classes this source labels, in index order."""
        if self.source == "lidc" or (self.source in ("phantom", "lidc-vois") and self.task == "malignancy"):
            return ["benign", "malignant"]
        if self.source in ("phantom", "lidc-vois"):
            return ["background", "nodule"]
        return list(self.classes)

    def describe(self) -> str:
        """What the data is, as the model card's ``training.data`` says it."""
        if self.source == "lidc-vois":
            text = (
                f"real LIDC-IDRI nodules (VOIs with the readers' masks) from {self.path}, task {self.task}, "
                f"{self.placements or (4 if self.task == 'malignancy' else 3)} placement(s) per nodule"
            )
            if self.backgrounds:
                text += f" into the lungs of the real CTs listed in {self.backgrounds}"
            if self.with_phantoms:
                text += f", plus synthetic chest CT phantoms (seeds {seeds_text(self.with_phantoms)})"
            if self.hard_negatives:
                text += (
                    f", plus {self.hard_negatives_per_region} hard negatives per background region "
                    f"({self.hard_negatives_per_phantom} per phantom) from the false hot spots (heat >= "
                    f"{self.hard_negative_threshold:g}) of " + ", ".join(self.hard_negatives)
                )
            return text
        if self.source == "phantom":
            return (
                f"synthetic chest CT phantoms (LungGradCAMLib.phantom.chest_ct), seeds "
                f"{seeds_text(self.phantom_seeds)}, one patient each; task {self.task}; "
                f"{self.positives_per_nodule} jittered patches per nodule, "
                f"{self.negatives_per_kind} background patches per kind per scan"
            )
        return f"{self.source} data from {self.path}"


def load_data(spec: DataSpec, card: "ModelCard") -> PatchSet:
    """The PatchSet ``spec`` describes, cut at ``card``'s patch size and spacing. Under
    ``torchrun`` rank 0 builds a ``spec.cache`` and the other ranks read it."""
    from ..engine.distributed import barrier, init_torchrun

    if card.patch_size is None:
        raise DataError(
            "this model is whole-volume (patch_size null); training and evaluation here "
            "use patches: give the card a patch_size"
        )
    size, spacing = list(card.patch_size), list(card.spacing_mm)
    cache = Path(spec.cache) if spec.cache else None
    if spec.source == "patches" or (cache is not None and cache.is_file()):
        path = Path(spec.path if spec.source == "patches" else cache)  # type: ignore[arg-type]
        if not path.is_file():
            raise DataError(f"{path}: patch cache not found")
        data = PatchSet.load(path)
        if list(data.patch_size) != size or not np.allclose(data.spacing_mm, spacing):
            raise DataError(
                f"{path}: patches are {list(data.patch_size)} voxels at {list(data.spacing_mm)} mm "
                f"but the model needs {size} at {spacing} mm; delete the cache to rebuild"
            )
        return _only(data, spec.patients)
    if spec.patients is not None:  # a part is built only for reading: never cached
        cache = None
    rank, world, _ = init_torchrun()
    if cache is not None and rank != 0:
        barrier()  # rank 0 builds the cache; the others read it
        return PatchSet.load(cache)
    if cache is not None:
        check_new_file(cache, "patch cache")  # before the work: a folder or a link there is refused, never replaced
    progress = rank == 0
    if spec.source == "phantom":
        data = phantom_patches(
            list(spec.phantom_seeds),
            size,
            spacing,
            task=spec.task,
            positives_per_nodule=spec.positives_per_nodule,
            negatives_per_kind=spec.negatives_per_kind,
            progress=progress,
        )
    elif spec.source == "lidc":
        data = lidc_patches(spec.path, size, spacing, progress=progress)
    elif spec.source == "lidc-vois":
        data = _voi_data(spec, size, spacing, progress)
    else:
        samples = (
            luna16_samples(spec.path, spec.max_negatives_per_scan, seed=spec.seed)
            if spec.source == "luna16"
            else manifest_samples(spec.path, list(spec.classes))
        )
        data = patches_from_samples(samples, list(spec.classes), size, spacing, progress=progress)
    data = _only(data, spec.patients)
    if cache is not None:
        data.save(cache)
        if world > 1:
            barrier()
    return data


def _only(data: PatchSet, patients: Optional[Sequence[str]]) -> PatchSet:
    """The patches of ``patients`` (all when None); none of them in the data -> DataError."""
    if patients is None:
        return data
    index = np.flatnonzero(np.isin(data.patients, list(patients)))
    if index.size == 0:
        raise DataError(f"none of the {len(set(patients))} patient(s) asked for is in the data")
    return data.subset(index)


def _voi_data(spec: DataSpec, size: List[int], spacing: List[float], progress: bool) -> PatchSet:
    """The lidc-vois PatchSet: malignancy patches (split later by patient or fold), or nodule-vs-
    background patches with splits fixed by their background regions. With ``spec.patients``
    only their nodules are placed (each nodule's placements do not depend on the others)."""
    from .placement import SPLITS, load_backgrounds

    records = lidc_voi_records(spec.path)
    if spec.task == "malignancy":
        if spec.patients is not None:
            records = [r for r in records if r.patient in set(spec.patients)] or records
        backgrounds = load_backgrounds(spec.backgrounds, spacing, size, progress=progress) if spec.backgrounds else None
        return lidc_voi_patches(
            records,
            size,
            spacing,
            task="malignancy",
            backgrounds=backgrounds,
            placements=spec.placements or 4,
            jitter_vox=2,
            seed=spec.seed,
            progress=progress,
        )
    if not spec.backgrounds:
        raise InvalidInputError(
            "--source lidc-vois --task nodule needs --backgrounds (real CTs whose lungs "
            "hold the placed nodules and give the negatives)"
        )
    from ..engine.models import load_model

    val, test = spec.split_fractions
    miners = [load_model(m, device="cpu") for m in spec.hard_negatives]
    return lidc_voi_detection_patches(
        records,
        load_backgrounds(spec.backgrounds, spacing, size, SPLITS, progress=progress),
        size,
        spacing,
        fractions=(1 - val - test, val, test),
        placements=spec.placements or 3,
        negatives_per_kind=spec.negatives_per_region,
        phantom_seeds=list(spec.with_phantoms),
        phantom_positives_per_nodule=spec.positives_per_nodule,
        phantom_negatives_per_kind=spec.negatives_per_kind,
        hard_negative_models=miners,
        hard_negatives_per_region=spec.hard_negatives_per_region,
        hard_negatives_per_phantom=spec.hard_negatives_per_phantom,
        hard_negative_threshold=spec.hard_negative_threshold,
        seed=spec.seed,
        progress=progress,
    )
