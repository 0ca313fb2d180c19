"""The phantom generator: :func:`chest_ct` (anatomy, vessel trees, nodules, a scanner's blur and
noise) and :func:`write_dicom_series` (a phantom as a DICOM series)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..core.errors import InvalidInputError
from ..core.volume import Volume, check_voxel_limit
from .anatomy import Anatomy, lung_trees
from .nodules import draw_nodule, random_nodules
from .specs import TISSUES, NoduleSpec, Phantom
from .tubes import Grid, interp_matrix, occupancy, uid


# --------------------------------------------------------------------------------------------
# the public generator
# --------------------------------------------------------------------------------------------
def chest_ct(
    seed: int = 0,
    shape: Sequence[int] = (96, 192, 192),
    spacing_mm: Sequence[float] = (1.8, 1.8, 2.5),
    nodules: Union[None, str, Sequence[NoduleSpec]] = None,
    *,
    n_nodules: Optional[int] = None,
    nodule_options: Optional[dict] = None,
    noise_hu: float = 20.0,
    contrast: bool = False,
    center_ras: Sequence[float] = (0.0, 0.0, -150.0),
) -> Phantom:
    """A synthetic axial chest CT (float32 HU) with its truth, deterministic per ``seed``.

    ``shape``: (K, J, I) voxels; ``spacing_mm``: (i, j, k) mm. The patient is adult-sized when the
    in-plane field of view is at least about 380 x 300 mm and proportionally smaller otherwise
    (0.9x at the default 345 mm); the lungs span about 230 mm (scaled) around the centre in z.
    ``nodules``: None or "random" for random nodules drawn with :func:`random_nodules`
    (``nodule_options`` are passed on to it): ``n_nodules`` of them (an error if they do not fit),
    or by default 2-5, as many as fit, at least two voxels across; ``[]`` for none; or a list of
    :class:`NoduleSpec` drawn where they say (each centred in the lungs). The anatomy depends only
    on the seed and the geometry, not on the nodules. ``noise_hu``: SD (HU) of the correlated
    noise. ``contrast``: enhanced blood (~280 HU). ``center_ras``: RAS mm of the volume centre.

    The matrix is a standard axial one: i -> patient left (RAS x decreasing), j -> posterior, k ->
    superior. ``meta`` holds modality "CT", a synthetic patient, deterministic UIDs and the seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"chest_ct: seed must be a non-negative integer; got {seed!r}")
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise InvalidInputError(f"chest_ct: shape must be three sizes (K, J, I), each >= 8; got {tuple(shape)!r}")
    spacing = np.asarray(spacing_mm, np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InvalidInputError(f"chest_ct: spacing_mm must be three positive mm values (i, j, k); got {spacing_mm!r}")
    if not 0.0 <= float(noise_hu) <= 200.0:
        raise InvalidInputError(f"chest_ct: noise_hu must be within 0-200 HU; got {noise_hu!r}")
    if isinstance(nodules, str) and nodules != "random":
        raise InvalidInputError(f"chest_ct: nodules must be None, 'random' or a list of NoduleSpec; got {nodules!r}")
    check_voxel_limit(shape_t, "phantom")

    anat_ss, nodule_ss, noise_ss = np.random.SeedSequence(int(seed)).spawn(3)
    anat_rng = np.random.default_rng(anat_ss)
    fov = np.array(shape_t[::-1]) * spacing  # (i, j, k) mm
    scale = float(min(1.0, fov[0] * 0.94 / (2 * 180.0), fov[1] * 0.94 / (2 * 140.0)))
    grid = Grid(shape_t, spacing, scale)  # type: ignore[arg-type]

    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) * spacing
    matrix[:3, 3] = np.asarray(center_ras, np.float64) - matrix[:3, :3] @ ((np.array(shape_t[::-1]) - 1) / 2)
    tag = (
        int(seed),
        shape_t,
        tuple(spacing.round(6)),
        str(nodules if isinstance(nodules, str) or nodules is None else [n.to_dict() for n in nodules]),
    )
    # keys as the DICOM loader fills them
    meta = {
        "modality": "CT",
        "patient_id": f"LGC-PHANTOM-{int(seed)}",
        "patient_name": f"Phantom^Seed{int(seed)}",
        "study_uid": uid("study", *tag),
        "series_uid": uid("series", *tag),
        "frame_of_reference_uid": uid("for", *tag),
        "description": f"LungGradCAM phantom chest CT, seed {int(seed)}",
        "study_description": "LungGradCAM phantom",
        "phantom_seed": int(seed),
    }

    K = shape_t[0]
    tissues = np.empty(shape_t, np.uint8)
    hu = np.empty(shape_t, np.float32)
    lungs = np.empty(shape_t, bool)
    anatomy = Anatomy(grid, anat_rng, contrast)
    for k in range(K):
        anatomy.slice(k, tissues, hu, lungs)
    sd_vessel, sd_lumen = lung_trees(grid, anat_rng, lungs, anatomy)
    del anatomy

    # parenchyma: denser toward the back (gravity) plus a soft texture of a few mm (coarse noise,
    # linearly interpolated in-plane by matrix products and between slices)
    cell = np.maximum(1, np.round(4.0 / grid.sp).astype(int))
    coarse = anat_rng.standard_normal(tuple(int(n // c) + 2 for n, c in zip(shape_t, cell)), dtype=np.float32)
    along_i = coarse.reshape(-1, coarse.shape[2]) @ interp_matrix(shape_t[2], coarse.shape[2]).T
    planes = np.tensordot(
        interp_matrix(shape_t[1], coarse.shape[1]),
        along_i.reshape(coarse.shape[0], coarse.shape[1], shape_t[2]),
        axes=([1], [1]),
    )
    planes = planes.transpose(1, 0, 2)  # (coarse k, J, I)
    zpos = np.clip((np.arange(K) + 0.5) * coarse.shape[0] / K - 0.5, 0, coarse.shape[0] - 1.001)
    gravity = (25.0 * np.clip(-grid.y / 120.0, -1.0, 1.0)).astype(np.float32)[:, None]
    vessel_hu = np.float32(250.0 if contrast else 40.0)
    wall_mm = 1.2 * grid.scale
    in_k = np.flatnonzero(lungs.any(axis=(1, 2)))
    in_j = np.flatnonzero(lungs.any(axis=(0, 2)))
    in_i = np.flatnonzero(lungs.any(axis=(0, 1)))
    if len(in_k):
        rows, cols = slice(int(in_j[0]), int(in_j[-1]) + 1), slice(int(in_i[0]), int(in_i[-1]) + 1)
        gravity = gravity[rows]
        for k in in_k:
            crop = (k, rows, cols)
            lung = lungs[crop]
            k0, f = int(zpos[k]), np.float32(zpos[k] % 1.0)
            texture = planes[k0, rows, cols] * (1 - f) + planes[k0 + 1, rows, cols] * f
            s = hu[crop]
            s += lung * (gravity + 18.0 * texture)
            occ_v = occupancy(sd_vessel.plane(k, rows, cols), grid.h) * lung
            s += occ_v * (vessel_hu - s)
            lumen = sd_lumen.plane(k, rows, cols)
            s -= occupancy(lumen, grid.h, wall_mm) * lung * s  # bronchial wall, ~0 HU
            occ_l = occupancy(lumen, grid.h) * lung
            s += occ_l * (np.float32(-1000.0) - s)
            t = tissues[crop]
            t[occ_v >= 0.5] = TISSUES["vessel"]
            t[occ_l >= 0.5] = TISSUES["airway"]
    del sd_lumen, sd_vessel, planes

    volume = Volume(hu, matrix, meta)
    labelmap = np.zeros(shape_t, np.int16)
    nod_rng = np.random.default_rng(nodule_ss)
    if nodules is None or isinstance(nodules, str):
        count = int(n_nodules) if n_nodules is not None else int(nod_rng.integers(2, 6))
        options = dict(nodule_options or {})
        options.setdefault("strict", n_nodules is not None)  # by default, as many as fit
        # nodules under two voxels across are not resolvable: raise the default minimum size
        options.setdefault("diameter_mm", (float(np.clip(2.0 * spacing.max(), 3.0, 20.0)), 30.0))
        specs = random_nodules(nod_rng, lungs, volume, count, vessels=tissues == TISSUES["vessel"], **options)
    else:
        specs = list(nodules)
        if any(not isinstance(s, NoduleSpec) for s in specs):
            raise InvalidInputError("chest_ct: nodules must be NoduleSpec instances")
    drawn = []
    for n, spec in enumerate(specs, start=1):
        spec = replace(spec, label=n)
        draw_nodule(grid, volume, nod_rng, spec, hu, tissues, lungs, labelmap)
        drawn.append(spec)

    _blur_and_noise(hu, float(noise_hu), np.random.default_rng(noise_ss))
    volume = Volume(hu, matrix, meta)
    return Phantom(volume, lungs, labelmap, drawn, tissues)


def _blur_and_noise(hu: np.ndarray, noise_hu: float, rng: np.random.Generator) -> None:
    """Scanner blur (partial volume at every edge) and correlated noise of SD ``noise_hu``, in place.

    White noise is added before a single blur, which both correlates it and softens edges:
    Gaussian in-plane per slice (cache-friendly), a 3-tap Gaussian along k. The white noise is
    uniform (cheaper to draw); the blur sums ~100 samples per voxel, so the result is Gaussian.
    """
    sigma_ij, sigma_k = 0.7, 0.45
    w = float(np.exp(-0.5 / sigma_k**2))
    taps = np.array([w, 1.0, w]) / (1.0 + 2.0 * w)
    impulse = np.zeros((9, 9), np.float32)
    impulse[4, 4] = 1.0
    gain = float(np.sqrt((ndimage.gaussian_filter(impulse, sigma_ij) ** 2).sum() * (taps**2).sum()))
    amplitude = np.float32(noise_hu / gain * np.sqrt(12.0))  # uniform(-1/2, 1/2) has variance 1/12
    for s in hu:
        if noise_hu > 0:
            s += (rng.random(s.shape, dtype=np.float32) - np.float32(0.5)) * amplitude
        ndimage.gaussian_filter(s, sigma_ij, output=s)
    edge, centre = np.float32(taps[0]), np.float32(taps[1])
    below = hu[0].copy()  # edges reflect, as in ndimage
    for k in range(len(hu)):
        here = hu[k].copy()
        hu[k] = (below + (hu[k + 1] if k + 1 < len(hu) else here)) * edge + here * centre
        np.clip(hu[k], -1024.0, 3071.0, out=hu[k])
        below = here


def write_dicom_series(volume: Volume, folder: "str | Path", **kwargs: Any) -> List[Path]:
    """Write ``volume`` as a CT Image Storage DICOM series into ``folder`` with
    :func:`LungGradCAMLib.io.dicom_write.write_dicom_series` (options such as ``shuffle_names``). Patient
    and UIDs default to those in ``volume.meta`` (a phantom's deterministic ones); returns the
    file paths in k order."""
    from ..io.dicom_write import write_dicom_series as write

    meta = volume.meta
    for key, meta_key in (
        ("patient_id", "patient_id"),
        ("patient_name", "patient_name"),
        ("study_uid", "study_uid"),
        ("series_uid", "series_uid"),
        ("frame_of_reference_uid", "frame_of_reference_uid"),
        ("series_description", "description"),
        ("study_description", "study_description"),
    ):
        if meta.get(meta_key):
            kwargs.setdefault(key, str(meta[meta_key]))
    return write(volume, folder, **kwargs)
