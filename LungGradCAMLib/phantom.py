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
"""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .core.errors import InvalidInputError
from .core.volume import Volume, check_voxel_limit

KINDS = ("solid", "part-solid", "ground-glass", "calcified")
MARGINS = ("smooth", "lobulated", "spiculated")
PLACEMENTS = ("parenchymal", "juxta-pleural", "juxta-vascular")

#: Codes of :attr:`Phantom.tissues`.
TISSUES: Dict[str, int] = {
    "air": 0, "skin": 1, "fat": 2, "muscle": 3, "bone": 4, "lung": 5, "vessel": 6, "airway": 7,
    "mediastinum": 8, "heart": 9, "blood": 10, "abdomen": 11, "nodule": 12, "soft_tissue": 13,
    "table": 14,
}
_T = TISSUES
#: Mean HU of each tissue before texture, blur and noise (bone gets a brighter cortex on top).
_HU = np.zeros(len(TISSUES), np.float32)
for _name, _hu in {"air": -1000, "skin": 30, "fat": -100, "muscle": 45, "bone": 300, "lung": -890,
                   "vessel": 40, "airway": -1000, "mediastinum": -90, "heart": 40, "blood": 40,
                   "abdomen": 55, "nodule": 30, "soft_tissue": 35, "table": -150}.items():
    _HU[TISSUES[_name]] = _hu


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
            raise InvalidInputError(f"NoduleSpec.center_ras must be three finite RAS mm values; got {self.center_ras!r}")
        self.center_ras = tuple(float(v) for v in c)
        if not 1.0 <= float(self.diameter_mm) <= 60.0:
            raise InvalidInputError(f"NoduleSpec.diameter_mm must be within 1-60 mm; got {self.diameter_mm!r}")
        self.diameter_mm = float(self.diameter_mm)
        for name, allowed in (("kind", KINDS), ("margin", MARGINS), ("placement", PLACEMENTS)):
            if getattr(self, name) not in allowed:
                raise InvalidInputError(f"NoduleSpec.{name} must be one of {', '.join(allowed)}; "
                                        f"got {getattr(self, name)!r}")
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


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------
class _Grid:
    """Maps body mm (x right, y anterior, z superior; centre of the volume = 0) to "grid mm"
    (k*sk, j*sj, i*si: array axis order, millimetres) where tubes and nodules are drawn."""

    def __init__(self, shape: Tuple[int, int, int], spacing_ijk: np.ndarray, scale: float):
        self.shape = shape
        self.sp = np.asarray(spacing_ijk, np.float64)[::-1].copy()  # (k, j, i) mm
        self.centre = (np.asarray(shape, np.float64) - 1) / 2 * self.sp
        self.scale = scale
        # body mm of every voxel centre along each axis (anatomy is defined at adult size, so
        # divide by the scale): x along i, y along j, z along k
        self.z = ((np.arange(shape[0]) * self.sp[0] - self.centre[0]) / scale).astype(np.float32)
        self.y = (-(np.arange(shape[1]) * self.sp[1] - self.centre[1]) / scale).astype(np.float32)
        self.x = (-(np.arange(shape[2]) * self.sp[2] - self.centre[2]) / scale).astype(np.float32)
        self.h = float(np.mean(self.sp))  # partial-volume ramp width, mm

    def body_to_grid(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) body mm (x, y, z; adult size) -> (N, 3) grid mm (k, j, i)."""
        xyz = np.atleast_2d(np.asarray(xyz, np.float64)) * self.scale
        return np.stack([self.centre[0] + xyz[:, 2], self.centre[1] - xyz[:, 1],
                         self.centre[2] - xyz[:, 0]], axis=1)

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
        """Index slices of the voxels whose centres lie in the grid-mm box, or None if empty."""
        lo = np.maximum(np.floor(lo_mm / self.sp).astype(int), 0)
        hi = np.minimum(np.ceil(hi_mm / self.sp).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]

    def coords(self, box: Tuple[slice, slice, slice], origin: np.ndarray) -> List[np.ndarray]:
        """Broadcastable grid-mm coordinates (k, j, i) of the voxels in ``box`` relative to ``origin``."""
        out = []
        for axis, s in enumerate(box):
            c = (np.arange(s.start, s.stop) * self.sp[axis] - origin[axis]).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = -1
            out.append(c.reshape(shape))
        return out


_FAR = np.float32(1e4)  # "no tube here" in signed-distance maps


class _Tubes:
    """Signed distance (mm, negative inside) to a set of tapered capsules, stored only over the
    bounding box of all of them (min-composited where tubes meet).

    ``segments``: (p0, p1, r0, r1) in grid mm. Each tube is evaluated inside its own box grown by
    ``pad_mm`` plus one voxel, so offsets up to ``pad_mm`` (walls, exclusion zones) and the
    partial-volume ramp can be read later.
    """

    def __init__(self, grid: _Grid, segments: Sequence[Tuple[np.ndarray, np.ndarray, float, float]],
                 pad_mm: float = 0.0):
        self.shape2d = grid.shape[1:]
        self.lo, self.sd = np.zeros(3, int), np.full((0, 0, 0), _FAR, np.float32)
        if not len(segments):
            return
        p0 = np.array([s[0] for s in segments], np.float64)
        p1 = np.array([s[1] for s in segments], np.float64)
        r0 = np.array([s[2] for s in segments], np.float32)
        r1 = np.array([s[3] for s in segments], np.float32)
        pad = np.maximum(r0, r1)[:, None] + pad_mm + grid.h
        lo = np.maximum(np.floor((np.minimum(p0, p1) - pad) / grid.sp).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(p0, p1) + pad) / grid.sp).astype(int) + 1, grid.shape)
        keep = np.all(hi > lo, axis=1)
        if not keep.any():
            return
        p0, p1, r0, r1, lo, hi = p0[keep], p1[keep], r0[keep], r1[keep], lo[keep], hi[keep]
        self.lo = origin = lo.min(axis=0)
        self.sd = np.full(tuple(hi.max(axis=0) - origin), _FAR, np.float32)
        v = (p1 - p0).astype(np.float32)
        v_scaled = v / np.maximum((v * v).sum(axis=1, keepdims=True), 1e-6)
        size = hi - lo
        # thousands of small tubes: evaluate those with the same (even-rounded) box size together,
        # one numpy expression per group, then min-composite each box in turn
        groups: Dict[Tuple[int, int, int], List[int]] = {}
        for n, key in enumerate(map(tuple, size + size % 2)):
            groups.setdefault(key, []).append(n)
        for key, members in groups.items():
            per_chunk = max(1, 4_000_000 // int(np.prod(key)))
            for start in range(0, len(members), per_chunk):
                idx = np.array(members[start:start + per_chunk])
                d = [((lo[idx, a, None] + np.arange(key[a])) * grid.sp[a] - p0[idx, a, None]).astype(np.float32)
                     for a in range(3)]
                dk, dj, di = d[0][:, :, None, None], d[1][:, None, :, None], d[2][:, None, None, :]
                vv, vs = v[idx][:, None, None, None, :], v_scaled[idx][:, None, None, None, :]
                t = np.clip(dk * vs[..., 0] + dj * vs[..., 1] + di * vs[..., 2], 0.0, 1.0)
                sd = np.sqrt((dk - t * vv[..., 0]) ** 2 + (dj - t * vv[..., 1]) ** 2 + (di - t * vv[..., 2]) ** 2)
                sd -= r0[idx, None, None, None] + (r1 - r0)[idx, None, None, None] * t
                for m, n in enumerate(idx):
                    a, b = lo[n] - origin, hi[n] - origin
                    view = self.sd[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
                    np.minimum(view, sd[m, :size[n, 0], :size[n, 1], :size[n, 2]], out=view)

    def plane(self, k: int, rows: slice, cols: slice) -> np.ndarray:
        """The signed distance over ``rows`` x ``cols`` of slice ``k`` (_FAR away from every tube)."""
        J = range(*rows.indices(self.shape2d[0]))
        I = range(*cols.indices(self.shape2d[1]))
        out = np.full((len(J), len(I)), _FAR, np.float32)
        kk = k - self.lo[0]
        if 0 <= kk < self.sd.shape[0]:
            j0, j1 = max(J.start, self.lo[1]), min(J.stop, self.lo[1] + self.sd.shape[1])
            i0, i1 = max(I.start, self.lo[2]), min(I.stop, self.lo[2] + self.sd.shape[2])
            if j1 > j0 and i1 > i0:
                out[j0 - J.start:j1 - J.start, i0 - I.start:i1 - I.start] = \
                    self.sd[kk, j0 - self.lo[1]:j1 - self.lo[1], i0 - self.lo[2]:i1 - self.lo[2]]
        return out


def _occupancy(sd: np.ndarray, h: float, offset: float = 0.0) -> np.ndarray:
    """Partial-volume fraction (0..1) of a voxel inside the surface ``sd == offset`` (ramp width h)."""
    return np.clip(np.float32(0.5) - (sd - np.float32(offset)) / np.float32(h), 0.0, 1.0)


def _polyline(grid: _Grid, points_body: Sequence[Sequence[float]], radius: float) -> list:
    """Segments of a tube of constant ``radius`` (body mm) through ``points_body``."""
    p = grid.body_to_grid(np.asarray(points_body, np.float64))
    r = radius * grid.scale
    return [(p[n], p[n + 1], r, r) for n in range(len(p) - 1)]


def _tree(rng: np.random.Generator, root: np.ndarray, terminals: np.ndarray, r_terminal: float,
          exponent: float) -> list:
    """A branching tree from ``root`` to every terminal point (grid mm), by recursive bisection of
    the terminals along their principal axis; radius = r_terminal * (terminals downstream)**exponent
    (Murray-like), so tubes narrow toward the periphery."""
    segments: list = []

    def grow(start: np.ndarray, pts: np.ndarray) -> None:
        n = len(pts)
        r = r_terminal * n ** exponent
        if n == 1:
            segments.append((start, pts[0], r, r_terminal * 0.6))
            return
        centre = pts.mean(axis=0)
        branch = start + (centre - start) * rng.uniform(0.3, 0.55)
        segments.append((start, branch, r, r * 0.92))
        centred = pts - centre
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]
        order = np.argsort(centred @ axis)
        cut = int(np.clip(round(n * rng.uniform(0.35, 0.65)), 1, n - 1))
        grow(branch, pts[order[:cut]])
        grow(branch, pts[order[cut:]])

    grow(np.asarray(root, np.float64), np.asarray(terminals, np.float64))
    return segments


def _smoothstep(x: Any) -> Any:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights that stretch n_in samples over n_out."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - frac
    if n_in > 1:
        m[np.arange(n_out), lo + 1] += frac
    return m


def _uid(*parts: Any) -> str:
    """A deterministic DICOM UID (2.25 + UUID) from ``parts``."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "lunggradcam-phantom:" + ":".join(map(str, parts))).int)


# --------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------
class _Anatomy:
    """The chest's fixed structures for one seed, evaluated slice by slice.

    Every field is a 2D (J, I) map or a per-slice scalar: one axial slice of work fits in cache,
    which makes the slice loop several times faster than whole-volume numpy expressions.
    """

    def __init__(self, grid: _Grid, rng: np.random.Generator, contrast: bool):
        self.grid, self.contrast = grid, contrast
        # --- per-patient variation --------------------------------------------------------------
        self.A = A = 158.0 * rng.uniform(0.94, 1.06)        # body half width (adult mm)
        self.B = B = 108.0 * rng.uniform(0.94, 1.06)        # body half depth
        # all work happens in the rows/columns the body can reach at any height
        z_max = float(np.abs(grid.z).max())
        rows = np.flatnonzero(np.abs(grid.y) <= B * 1.06 * (1 + 0.0004 * z_max) + 2.0)
        cols = np.flatnonzero(np.abs(grid.x) <= A * 1.15 + 2.0)
        self.rows = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0)
        self.cols = slice(int(cols[0]), int(cols[-1]) + 1) if len(cols) else slice(0, 0)
        X, Y = np.meshgrid(grid.x[self.cols], grid.y[self.rows])     # (J, I) body mm
        table_y = grid.y[:, None]
        self.table = (np.abs(grid.x[None, :]) < 210.0) & (table_y < -B / 1.1 - 4.0) & (table_y > -B / 1.1 - 13.0)
        fat0 = rng.uniform(6.0, 15.0)                       # subcutaneous fat
        self.rib_phase = rng.uniform(0.0, 1.0)
        heart_shift = rng.normal(0.0, 4.0, 3)
        self.dia_right = -62.0 + rng.normal(0.0, 5.0)       # diaphragm dome tops (z)
        self.dia_left = self.dia_right - 10.0 + rng.normal(0.0, 3.0)

        yb = np.where(Y < 0, Y * 1.1, Y)                    # a flatter back
        self.X2, self.Y2 = X * X, yb * yb
        self.radius = np.sqrt(self.X2 + self.Y2)
        cos_t = X / np.maximum(self.radius, 1e-3)           # around the body: right = +1
        sin_t = yb / np.maximum(self.radius, 1e-3)          # anterior = +1
        self.fat = (fat0 * (1 + 0.4 * cos_t ** 2)).astype(np.float32)
        self.paraspinal = (32.0 * np.clip(-sin_t, 0, 1) ** 2 * np.exp(-(cos_t / 0.45) ** 2)).astype(np.float32)
        self.pectoral = (12.0 * np.clip(sin_t, 0, 1) * (np.abs(cos_t) > 0.25)).astype(np.float32)
        self.lateral = np.abs(cos_t) ** 3                  # shoulder girdle: thick walls up top
        self.rib_slope = (85.0 * (1.0 + sin_t) * 0.5).astype(np.float32)   # ribs run down anteriorly
        self.rib_ok = (np.abs(X) > 26.0) & ((np.abs(cos_t) > 0.3) | (sin_t < 0))
        self.sternum_ok = (np.abs(X) < 14.0) & (sin_t > 0.9)

        # --- spine: vertebral bodies (discs along z), canal, posterior elements -----------------
        self.yv = yv = -B + 56.0
        yc = yv - 25.0
        self.r_vb = np.sqrt(X * X + (Y - yv) ** 2)
        r_canal = np.sqrt(X * X + (Y - yc) ** 2)
        self.vert_body = self.r_vb < 17.0
        self.vb_cortex = self.r_vb > 14.5
        self.canal = r_canal < 8.0
        self.post_elem = (((r_canal >= 8.0) & (r_canal < 14.0) & (Y < yc + 4.0))
                          | ((np.abs(X) < 4.0) & (Y < yc - 8.0) & (Y > yc - 44.0))
                          | ((np.abs(X) > 9.0) & (np.abs(X) < 34.0) & (np.abs(Y - yc - 3.0) < 5.0)))

        # --- diaphragm domes: deeper laterally and posteriorly ---------------------------------
        top = np.where(X > 0, self.dia_right, self.dia_left)
        self.dia = (top - 60.0 * (((np.abs(X) - 60.0) / 90.0) ** 2 + ((Y - 10.0) / 95.0) ** 2)).astype(np.float32)

        # --- lung envelope: apices are domes above z = 30; the mediastinum and spine split it --
        self.apex_xy = ((((np.abs(X) - 62.0) / 72.0) ** 2 + ((Y - yv - 38.0) / 78.0) ** 2)).astype(np.float32)
        self.mediast_col = np.abs(X + 4.0 + 6.0 * _smoothstep((Y - yv - 60.0) / 40.0)) < 13.0
        self.spine_zone = ((np.abs(X) < 24.0) & (Y < yv + 10.0)) | (self.r_vb < 22.0)

        # --- heart: a rotated ellipsoid on the diaphragm, long axis to the left-anterior -------
        self.hc = hc = np.array([-24.0, yv + 86.0, -52.0]) + heart_shift   # centre (body mm)
        ang = np.deg2rad(40.0)
        u = (X - hc[0]) * -np.cos(ang) + (Y - hc[1]) * np.sin(ang)
        v = (X - hc[0]) * np.sin(ang) + (Y - hc[1]) * np.cos(ang)
        self.heart_xy = ((u / 62.0) ** 2 + (v / 45.0) ** 2).astype(np.float32)   # half height: 52 mm
        self.gas_xy = (((X + 55.0) / 30.0) ** 2 + ((Y - 10.0) / 35.0) ** 2).astype(np.float32)

        # --- mediastinal tubes (body mm) ---------------------------------------------------------
        self.carina = np.array([0.0, yv + 46.0, 24.0])
        self.bronchus_end = {1.0: np.array([46.0, yv + 44.0, 4.0]), -1.0: np.array([-48.0, yv + 40.0, -2.0])}
        trachea = _polyline(grid, [[2.0, yv + 50.0, 250.0], self.carina], 9.0)
        bronchi = sum((_polyline(grid, [self.carina, end], r) for end, r in
                       ((self.bronchus_end[1.0], 6.5), (self.bronchus_end[-1.0], 6.0))), [])
        hz = self.hc[2]
        blood = (_polyline(grid, [[16, yv + 80, hz + 40], [18, yv + 82, 30], [10, yv + 70, 52], [-8, yv + 45, 60],
                                  [-22, yv + 22, 52], [-22, yv + 14, 30], [-20, yv + 14, -250]], 13.0)      # aorta
                 + _polyline(grid, [[-8, yv + 88, hz + 35], [-18, yv + 78, 8], [-26, yv + 62, 14]], 13.0)  # trunk
                 + _polyline(grid, [[-26, yv + 62, 14], [-52, yv + 50, 8]], 10.0)                           # left PA
                 + _polyline(grid, [[-14, yv + 70, 10], [22, yv + 58, 6], [52, yv + 50, 2]], 10.0)          # right PA
                 + _polyline(grid, [[36, yv + 70, 250], [34, yv + 72, hz + 40]], 10.0)                      # SVC
                 + _polyline(grid, [[30, yv + 50, hz - 10], [30, yv + 45, -250]], 12.0))                    # IVC
        esophagus = _polyline(grid, [[-6, yv + 27, 250], [-10, yv + 30, -70], [-35, yv + 45, -120]], 7.5)
        self.excl_mm = 5.0 * grid.scale
        self.blood = _Tubes(grid, blood, self.excl_mm)
        self.air = _Tubes(grid, trachea + bronchi, self.excl_mm)
        self.esophagus = _Tubes(grid, esophagus, self.excl_mm)

    def slice(self, k: int, tissues: np.ndarray, hu: np.ndarray, lungs: np.ndarray) -> None:
        """Fill tissue codes, HU (before texture, blur, noise) and the lung mask of slice ``k``."""
        g = self.grid
        z = float(g.z[k])
        up = float(_smoothstep((z - 50.0) / 70.0))
        down = float(_smoothstep((-z - 70.0) / 60.0))
        # shoulders up top, a deeper (AP) lower chest and belly
        a = self.A * (1 + 0.12 * up - 0.03 * down) * (1 + 0.02 * np.sin(z / 23.0))
        b = self.B * (1 - 0.10 * up + 0.06 * down) * (1 - 0.0004 * z)
        rho2 = self.X2 * np.float32(1 / a ** 2) + self.Y2 * np.float32(1 / b ** 2)
        body = rho2 <= 1.0
        depth = (1.0 / np.sqrt(np.maximum(rho2, 1e-6)) - 1.0) * self.radius      # mm in from the skin
        wall = 2.0 + self.fat + self.paraspinal + self.pectoral * np.float32(_smoothstep(z / 50.0)) \
            + self.lateral * np.float32(10.0 * _smoothstep((z + 40.0) / 120.0) + 25.0 * up) \
            + np.float32(7.0)                                                    # muscle >= 7 mm
        rib_zone = 11.0
        inner = body & (depth >= wall + rib_zone)
        above_dia = z > self.dia

        t = np.zeros(body.shape, np.uint8)
        t[body] = _T["skin"]
        t[body & (depth >= 2.0)] = _T["fat"]
        t[body & (depth >= 2.0 + self.fat)] = _T["muscle"]

        sd_b, sd_a, sd_e = (tubes.plane(k, self.rows, self.cols) for tubes in (self.blood, self.air, self.esophagus))
        excl = np.minimum(np.minimum(sd_b, sd_a), sd_e) < self.excl_mm
        e_heart = self.heart_xy + np.float32(((z - self.hc[2]) / 52.0) ** 2)
        apex = self.apex_xy + np.float32((max(z - 30.0, 0.0) / 90.0) ** 2)
        lung = (inner & above_dia & (apex < 1.0) & ~self.mediast_col & ~self.spine_zone
                & ~(e_heart < 1.3) & ~excl)

        cavity = inner & ~lung
        t[cavity] = _T["mediastinum"] if z <= 90.0 else _T["muscle"]           # above: neck base
        t[cavity & ~above_dia] = _T["abdomen"]
        t[lung] = _T["lung"]
        t[(e_heart < 1.0) & (self.dia < z + 10.0)] = _T["heart"]
        t[(sd_e < 0) & body] = _T["soft_tissue"]
        t[(sd_b < 0) & inner] = _T["blood"]
        t[(sd_a < 2.0 * g.scale) & body & ~lung] = _T["soft_tissue"]             # airway wall
        t[(sd_a < 0) & body & ~lung] = _T["airway"]
        z_gas = self.dia_left - 22.0
        if abs(z - z_gas) < 12.0:                                                 # stomach bubble
            gas = (self.gas_xy + ((z - z_gas) / 12.0) ** 2 < 1.0) & inner & ~above_dia & (self.dia < z + 30.0)
            t[gas] = _T["air"]

        # bones; the cortex is brighter than the cancellous core
        bone_hu = np.zeros(body.shape, np.float32)
        disc = abs(((z + 7.0) / 27.0) % 1.0 - 0.5) < 0.09
        vb = self.vert_body & body
        t[vb] = _T["soft_tissue"] if disc else _T["bone"]
        if not disc:
            bone_hu[vb] = np.where(self.vb_cortex[vb], 580.0, 180.0)
        t[self.canal & body] = _T["soft_tissue"]
        pe = self.post_elem & body
        t[pe] = _T["bone"]
        bone_hu[pe] = 300.0
        if z < 125.0:
            phase = (z + self.rib_slope) / 26.0 + self.rib_phase
            dz = (phase - np.round(phase)) * np.float32(26.0 / 5.5)
            dd = (depth - wall - np.float32(rib_zone * 0.5)) / np.float32(5.5)
            e_rib = dd * dd + dz * dz
            rib = (e_rib < 1.0) & body & self.rib_ok
            t[rib] = _T["bone"]
            bone_hu[rib] = 100.0 + 650.0 * e_rib[rib] ** 2
        if -75.0 < z < 95.0:
            sternum = self.sternum_ok & body & (depth > wall - 4.0) & (depth < wall + 9.0)
            t[sternum] = _T["bone"]
            bone_hu[sternum] = 150.0
        h = np.take(_HU, t)
        h += bone_hu
        if self.contrast:
            h[t == _T["blood"]] = 280.0
            heart = t == _T["heart"]
            h[heart] = np.where(e_heart[heart] < 0.55, 280.0, 110.0)
        crop = (k, self.rows, self.cols)
        tissues[k] = _T["air"]
        tissues[k][self.table] = _T["table"]
        tissues[crop] = np.where(body, t, tissues[crop])
        hu[k] = _HU[_T["air"]]
        hu[k][self.table] = _HU[_T["table"]]
        hu[crop] = np.where(body, h, hu[crop])
        lungs[k] = False
        lungs[crop] = lung


def _lung_trees(grid: _Grid, rng: np.random.Generator, lungs: np.ndarray, anatomy: _Anatomy
                ) -> Tuple[_Tubes, _Tubes]:
    """Signed distances (grid mm) to the pulmonary vessels and to the bronchial lumens.

    Two vessel trees per lung (arteries and veins) and one bronchial tree, each from its hilum to
    random terminal points spread through that lung.
    """
    stride = np.maximum(1, np.round(6.0 / grid.sp).astype(int))
    coarse = np.argwhere(lungs[::stride[0], ::stride[1], ::stride[2]])
    centres = coarse * stride * grid.sp
    mid_i = grid.body_to_grid(np.zeros((1, 3)))[0, 2]
    vessels, lumens = [], []
    yv = anatomy.yv
    for sgn in (1.0, -1.0):
        # +x (the patient's right) is toward lower i
        mine = centres[(mid_i - centres[:, 2]) * sgn > 0]
        if len(mine) < 8:
            continue
        for root_z in (10.0, -14.0):                                         # arteries, veins
            pick = mine[rng.choice(len(mine), size=min(300, len(mine)), replace=False)]
            pick = pick + rng.uniform(-0.5, 0.5, pick.shape) * stride * grid.sp
            root = grid.body_to_grid([[sgn * 50.0, yv + 48.0, root_z]])[0]
            vessels += _tree(rng, root, pick, 0.75 * grid.scale, 0.38)
        pick = mine[rng.choice(len(mine), size=min(24, len(mine)), replace=False)]
        for seg in _tree(rng, grid.body_to_grid([anatomy.bronchus_end[sgn]])[0], pick, 0.9 * grid.scale, 0.45):
            if seg[2] > 1.2 * grid.scale:                                     # visible bronchi only
                lumens.append(seg)
    wall = 1.2 * grid.scale
    return _Tubes(grid, vessels), _Tubes(grid, lumens, wall)


# --------------------------------------------------------------------------------------------
# nodules
# --------------------------------------------------------------------------------------------
def _nodule_radius(rng: np.random.Generator, spec: NoduleSpec):
    """A radial function R(u) (mm) for unit directions u (..., 3), per the nodule's margin, with
    mean volume close to the sphere of ``diameter_mm``."""
    R = spec.diameter_mm / 2.0
    # a mild random ellipsoid of unit determinant keeps the volume of the sphere
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    e = rng.uniform(0.85, 1.15, 2)
    axes = np.array([e[0], e[1], 1.0 / (e[0] * e[1])])
    lobes = rng.normal(size=(rng.integers(4, 8), 3))
    lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
    lobe_amp = {"smooth": 0.0, "lobulated": 0.28, "spiculated": 0.12}[spec.margin]
    spikes = rng.normal(size=(rng.integers(8, 16), 3))
    spikes /= np.linalg.norm(spikes, axis=1, keepdims=True)
    spike_len = rng.uniform(0.6, 1.3, len(spikes)) * max(R, 3.0) if spec.margin == "spiculated" else None
    spike_width = 0.09  # radians at the base

    def bumps(u: np.ndarray) -> np.ndarray:
        return np.exp(4.0 * (u @ lobes.T - 1.0)).sum(axis=-1)

    probe = rng.normal(size=(4000, 3))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    bump_mean = float(bumps(probe).mean())
    # scale so that the mean of R(u)**3 (the volume) matches the sphere's
    base = 1.0 + lobe_amp * (bumps(probe) - bump_mean)
    norm = float(np.mean(base ** 3)) ** (-1.0 / 3.0)

    def radius(u: np.ndarray) -> np.ndarray:
        ue = (u @ q) / axes            # ellipsoidal stretch
        stretch = 1.0 / np.linalg.norm(ue, axis=-1)
        r = R * norm * stretch * (1.0 + lobe_amp * (bumps(u) - bump_mean))
        if spike_len is not None:
            ang = np.sqrt(np.clip(2.0 * (1.0 - u @ spikes.T), 0.0, None))
            r = r + (spike_len * np.clip(1.0 - ang / spike_width, 0.0, None)).max(axis=-1)
        return r

    extent = R * norm * 1.2 * (1 + lobe_amp * 3) + (float(spike_len.max()) if spike_len is not None else 0.0)
    return radius, extent


def _draw_nodule(grid: _Grid, volume: Volume, rng: np.random.Generator, spec: NoduleSpec,
                 hu: np.ndarray, tissues: np.ndarray, lungs: np.ndarray, labelmap: np.ndarray) -> None:
    """Draw one nodule (HU, tissue code, label) whose centre lies in the lungs."""
    ijk = volume.ras_to_ijk_points(spec.center_ras)[0]
    nearest = np.round(ijk[::-1]).astype(int)
    if np.any(nearest < 0) or np.any(nearest >= grid.shape) or not lungs[tuple(nearest)]:
        raise InvalidInputError(f"chest_ct: nodule {spec.label} at RAS {np.round(spec.center_ras, 1).tolist()} mm "
                                f"({spec.diameter_mm:.1f} mm) is not centred in the lungs; place it inside them "
                                "(random_nodules samples valid centres)")
    c = ijk[::-1] * grid.sp
    radius, extent = _nodule_radius(rng, spec)
    box = grid.box(c - extent - grid.h, c + extent + grid.h)
    dk, dj, di = grid.coords(box, c)
    dk = dk + np.float32(1e-3)   # no voxel exactly at the centre, where the direction is undefined
    dist = np.sqrt(dk * dk + dj * dj + di * di)
    u = np.stack(np.broadcast_arrays(dk, dj, di), axis=-1) / dist[..., None]
    occ = np.clip((radius(u) - dist) / grid.h + 0.5, 0.0, 1.0).astype(np.float32)
    occ *= lungs[box]                       # nodules displace lung, never the chest wall
    R = spec.diameter_mm / 2.0
    view = hu[box]
    if spec.kind in ("ground-glass", "part-solid"):
        ggo = np.float32(rng.uniform(-620.0, -470.0))
        np.maximum(view, view * (1 - occ) + ggo * occ, out=view)   # vessels stay visible
    else:
        solid = np.float32(rng.uniform(10.0, 50.0))
        view[...] = view * (1 - occ) + solid * occ
    if spec.kind in ("part-solid", "calcified"):
        r_core = R * (rng.uniform(0.45, 0.65) if spec.kind == "part-solid" else rng.uniform(0.55, 0.8))
        offset = rng.normal(0.0, 0.15 * (R - r_core), 3)
        dc = np.sqrt((dk - offset[0]) ** 2 + (dj - offset[1]) ** 2 + (di - offset[2]) ** 2)
        core = np.clip((r_core - dc) / grid.h + 0.5, 0.0, 1.0) * occ
        value = np.float32(rng.uniform(10.0, 50.0) if spec.kind == "part-solid" else rng.uniform(500.0, 1000.0))
        view[...] = view * (1 - core) + value * core
    inside = occ >= 0.5
    # a nodule smaller than a voxel still owns the voxel holding its centre
    nearest = tuple(int(round(v)) - s.start for v, s in zip(ijk[::-1], box))
    inside[nearest] = True
    labelmap[box][inside] = spec.label
    tissues[box][inside] = _T["nodule"]


def random_nodules(rng: np.random.Generator, lungs: np.ndarray, volume: Volume, n: int, *,
                   vessels: Optional[np.ndarray] = None, kinds: Optional[Sequence[str]] = None,
                   margins: Optional[Sequence[str]] = None, placements: Optional[Sequence[str]] = None,
                   diameter_mm: Tuple[float, float] = (3.0, 30.0), malignant_fraction: float = 0.5,
                   avoid: Sequence[NoduleSpec] = (), min_gap_mm: float = 5.0, strict: bool = True
                   ) -> List[NoduleSpec]:
    """Sample ``n`` valid nodules inside ``lungs`` (bool, K, J, I, on ``volume``'s grid).

    Each nodule is malignant with probability ``malignant_fraction``; kind, margin and size are then
    drawn to follow radiology (malignant: larger, mostly spiculated/lobulated, solid or part-solid;
    benign: smaller, mostly smooth, often calcified) from ``kinds``/``margins`` (default: all).
    Diameters (mm) are log-uniform within ``diameter_mm`` and shrink (not below its minimum) when a
    nodule does not fit. ``placements`` (default: mostly parenchymal, some juxta-pleural, and
    juxta-vascular when ``vessels``, a bool mask, is given): parenchymal nodules lie wholly in the
    lung, juxta-pleural ones are centred 0.6 radii from the costal pleura (not the mediastinal or
    diaphragmatic pleura) so that they sit on the chest wall, juxta-vascular ones are centred 0.75
    radii from a vessel voxel. Nodules keep ``min_gap_mm`` from each other and from ``avoid``.
    When a nodule cannot be placed this raises :class:`InvalidInputError` (``strict``) or returns
    the nodules placed so far.
    """
    lungs = np.asarray(lungs, bool)
    if lungs.shape != volume.shape:
        raise InvalidInputError(f"random_nodules: lungs mask shape {lungs.shape} differs from the volume's {volume.shape}")
    lo, hi = (float(d) for d in diameter_mm)
    if not 1.0 <= lo <= hi <= 60.0:
        raise InvalidInputError(f"random_nodules: diameter_mm must be (min, max) within 1-60 mm; got {diameter_mm!r}")
    if not 0.0 <= float(malignant_fraction) <= 1.0:
        raise InvalidInputError(f"random_nodules: malignant_fraction must be within 0-1; got {malignant_fraction!r}")
    if placements is None:
        placements = ["parenchymal"] * 5 + ["juxta-pleural"] * 2 + (["juxta-vascular"] * 2 if vessels is not None else [])
    for name, values, allowed in (("kinds", kinds, KINDS), ("margins", margins, MARGINS),
                                  ("placements", placements, PLACEMENTS)):
        if values is not None and (not len(values) or any(v not in allowed for v in values)):
            raise InvalidInputError(f"random_nodules: {name} must be a non-empty list from {', '.join(allowed)}; got {values!r}")
    vessel_ijk = np.argwhere(vessels & lungs)[:, ::-1] if vessels is not None else np.zeros((0, 3), int)
    if "juxta-vascular" in placements and not len(vessel_ijk):
        raise InvalidInputError("random_nodules: juxta-vascular placement needs a vessels mask with vessels in the lungs")

    # distance to the pleura on a ~3 mm grid over the lungs' bounding box
    sp = volume.spacing[::-1]                                           # (k, j, i) mm
    stride = np.maximum(1, np.round(3.0 / sp).astype(int))
    coarse = lungs[::stride[0], ::stride[1], ::stride[2]]
    if not coarse.any():
        raise InvalidInputError("random_nodules: the lungs mask is empty; cannot place nodules")
    nz = np.argwhere(coarse)
    c0, c1 = nz.min(axis=0), nz.max(axis=0) + 1
    crop = np.pad(coarse[c0[0]:c1[0], c0[1]:c1[1], c0[2]:c1[2]], 1)
    cell = stride * sp
    # EDT measures to the nearest outside cell centre; the pleura lies half a cell nearer
    dist = ndimage.distance_transform_edt(crop, sampling=cell) - 0.5 * float(cell.mean())
    inward = np.stack(np.gradient(dist, *cell), axis=-1)                 # grid mm, toward the lung
    cells = np.argwhere(crop)
    cell_dist = dist[tuple(cells.T)]
    cell_ijk = ((cells - 1 + c0) * stride)[:, ::-1].astype(np.float64)
    cell_ras = volume.ijk_to_ras_points(cell_ijk)
    out_ras = -(inward[tuple(cells.T)][:, ::-1] / stride[::-1]) @ volume.ijk_to_ras[:3, :3].T
    out_ras /= np.maximum(np.linalg.norm(out_ras, axis=1, keepdims=True), 1e-9)
    # costal pleura: the outward normal does not point to the midline (mediastinum) or down (diaphragm)
    lateral = np.sign(cell_ras[:, 0] - np.median(cell_ras[:, 0]))
    costal = (out_ras[:, 0] * lateral > -0.2) & (out_ras[:, 2] > -0.5)
    step = float(np.min(sp)) / 2

    def wall_distance(start: np.ndarray, direction: np.ndarray, limit: float) -> Optional[float]:
        """mm from ``start`` (RAS) along ``direction`` to the first voxel outside the lungs."""
        t = np.arange(0.0, limit, step)
        ijk = np.round(volume.ras_to_ijk_points(start + t[:, None] * direction)).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(volume.shape[::-1])), axis=1)
        inside[inside] = lungs[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
        outside = np.flatnonzero(~inside)
        return float(t[outside[0]]) if len(outside) else None

    placed: List[Tuple[np.ndarray, float]] = [(np.asarray(s.center_ras), s.diameter_mm / 2) for s in avoid]
    out: List[NoduleSpec] = []
    for _ in range(int(n)):
        malignant = bool(rng.random() < malignant_fraction)
        if malignant:
            kind_p = {"solid": 0.55, "part-solid": 0.3, "ground-glass": 0.15, "calcified": 0.0}
            margin_p = {"smooth": 0.1, "lobulated": 0.35, "spiculated": 0.55}
            d_lo, d_hi = max(lo, min(8.0, hi)), hi
        else:
            kind_p = {"solid": 0.45, "part-solid": 0.05, "ground-glass": 0.2, "calcified": 0.3}
            margin_p = {"smooth": 0.75, "lobulated": 0.2, "spiculated": 0.05}
            d_lo, d_hi = lo, min(hi, max(lo, 15.0))
        kind = _pick(rng, kinds, kind_p)
        margin = _pick(rng, margins, margin_p)
        placement = str(placements[rng.integers(len(placements))])
        diameter = float(np.exp(rng.uniform(np.log(d_lo), np.log(d_hi))))
        centre = None
        while centre is None:
            R = diameter / 2
            centre = _place(rng, placement, R, margin, cell_ras, cell_dist, costal, out_ras, vessel_ijk,
                            volume, dist, c0, stride, float(cell.max()), wall_distance, placed, min_gap_mm)
            if centre is None:
                if diameter <= lo:
                    if not strict:
                        return out
                    raise InvalidInputError(
                        f"random_nodules: no room for a {diameter:.1f} mm {placement} nodule in these lungs "
                        f"(nodule {len(out) + 1} of {n}); ask for fewer or smaller nodules")
                diameter = max(lo, diameter * 0.7)
        placed.append((centre, diameter / 2))
        out.append(NoduleSpec(tuple(centre), diameter, kind, margin, placement, malignant))
    return out


def _pick(rng: np.random.Generator, options: Optional[Sequence[str]], probs: Dict[str, float]) -> str:
    """One of ``options`` (default: the keys of ``probs``), weighted by ``probs``."""
    names = list(options) if options is not None else list(probs)
    p = np.array([probs.get(v, 0.0) for v in names]) + 1e-3
    return str(names[rng.choice(len(names), p=p / p.sum())])


def _place(rng, placement, R, margin, cell_ras, cell_dist, costal, out_ras, vessel_ijk, volume, dist, c0,
           stride, cell_mm, wall_distance, placed, min_gap_mm) -> Optional[np.ndarray]:
    """A RAS centre for one nodule of radius R (mm) with this placement, or None if none fits."""
    def free(centres: np.ndarray) -> np.ndarray:
        ok = np.ones(len(centres), bool)
        for c, r in placed:
            ok &= np.linalg.norm(centres - c, axis=1) >= r + R + min_gap_mm
        return ok

    if placement == "juxta-vascular":
        cand = vessel_ijk[rng.choice(len(vessel_ijk), size=min(400, len(vessel_ijk)), replace=False)]
        direction = rng.normal(size=(len(cand), 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        centres = volume.ijk_to_ras_points(cand) + direction * 0.75 * R
        ck = np.round(volume.ras_to_ijk_points(centres)[:, ::-1] / stride).astype(int) - c0 + 1
        inside = np.all((ck >= 0) & (ck < np.array(dist.shape)), axis=1)
        ok = np.zeros(len(cand), bool)
        ok[inside] = dist[tuple(ck[inside].T)] >= R + cell_mm
        ok &= free(centres)
        return centres[rng.choice(np.flatnonzero(ok))] if ok.any() else None
    if placement == "parenchymal":
        reach = R * (1.8 if margin == "spiculated" else 1.0)
        ok = (cell_dist >= reach + cell_mm) & free(cell_ras)
        return cell_ras[rng.choice(np.flatnonzero(ok))] if ok.any() else None
    # juxta-pleural: start from cells near the costal pleura, find the wall along the outward
    # normal on the full-resolution mask and put the centre 0.6 R inside it
    ok = costal & (cell_dist <= R + cell_mm) & (cell_dist >= 0.0)
    for index in rng.permutation(np.flatnonzero(ok))[:50]:
        d = wall_distance(cell_ras[index], out_ras[index], cell_dist[index] + 2 * cell_mm + R)
        if d is None:
            continue
        centre = cell_ras[index] + out_ras[index] * (d - 0.6 * R)
        # the far side must stay in the lung: look back along the normal
        back = wall_distance(centre, -out_ras[index], 2.2 * R)
        if (back is None or back >= 1.6 * R) and free(centre[None])[0]:
            return centre
    return None


# --------------------------------------------------------------------------------------------
# the public generator
# --------------------------------------------------------------------------------------------
def chest_ct(seed: int = 0, shape: Sequence[int] = (96, 192, 192), spacing_mm: Sequence[float] = (1.8, 1.8, 2.5),
             nodules: Union[None, str, Sequence[NoduleSpec]] = None, *, n_nodules: Optional[int] = None,
             nodule_options: Optional[dict] = None, noise_hu: float = 20.0, contrast: bool = False,
             center_ras: Sequence[float] = (0.0, 0.0, -150.0)) -> Phantom:
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
    fov = np.array(shape_t[::-1]) * spacing                     # (i, j, k) mm
    scale = float(min(1.0, fov[0] * 0.94 / (2 * 180.0), fov[1] * 0.94 / (2 * 140.0)))
    grid = _Grid(shape_t, spacing, scale)  # type: ignore[arg-type]

    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1.0, -1.0, 1.0]) * spacing
    matrix[:3, 3] = np.asarray(center_ras, np.float64) - matrix[:3, :3] @ ((np.array(shape_t[::-1]) - 1) / 2)
    tag = (int(seed), shape_t, tuple(spacing.round(6)), str(nodules if isinstance(nodules, str) or nodules is None else [n.to_dict() for n in nodules]))
    # keys as the DICOM loader fills them
    meta = {
        "modality": "CT", "patient_id": f"LGC-PHANTOM-{int(seed)}", "patient_name": f"Phantom^Seed{int(seed)}",
        "study_uid": _uid("study", *tag), "series_uid": _uid("series", *tag),
        "frame_of_reference_uid": _uid("for", *tag), "description": f"LungGradCAM phantom chest CT, seed {int(seed)}",
        "study_description": "LungGradCAM phantom", "phantom_seed": int(seed),
    }

    K = shape_t[0]
    tissues = np.empty(shape_t, np.uint8)
    hu = np.empty(shape_t, np.float32)
    lungs = np.empty(shape_t, bool)
    anatomy = _Anatomy(grid, anat_rng, contrast)
    for k in range(K):
        anatomy.slice(k, tissues, hu, lungs)
    sd_vessel, sd_lumen = _lung_trees(grid, anat_rng, lungs, anatomy)
    del anatomy

    # parenchyma: denser toward the back (gravity) plus a soft texture of a few mm (coarse noise,
    # linearly interpolated in-plane by matrix products and between slices)
    cell = np.maximum(1, np.round(4.0 / grid.sp).astype(int))
    coarse = anat_rng.standard_normal(tuple(int(n // c) + 2 for n, c in zip(shape_t, cell)), dtype=np.float32)
    along_i = (coarse.reshape(-1, coarse.shape[2]) @ _interp_matrix(shape_t[2], coarse.shape[2]).T)
    planes = np.tensordot(_interp_matrix(shape_t[1], coarse.shape[1]),
                          along_i.reshape(coarse.shape[0], coarse.shape[1], shape_t[2]), axes=([1], [1]))
    planes = planes.transpose(1, 0, 2)                         # (coarse k, J, I)
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
            occ_v = _occupancy(sd_vessel.plane(k, rows, cols), grid.h) * lung
            s += occ_v * (vessel_hu - s)
            lumen = sd_lumen.plane(k, rows, cols)
            s -= _occupancy(lumen, grid.h, wall_mm) * lung * s             # bronchial wall, ~0 HU
            occ_l = _occupancy(lumen, grid.h) * lung
            s += occ_l * (np.float32(-1000.0) - s)
            t = tissues[crop]
            t[occ_v >= 0.5] = _T["vessel"]
            t[occ_l >= 0.5] = _T["airway"]
    del sd_lumen, sd_vessel, planes

    volume = Volume(hu, matrix, meta)
    labelmap = np.zeros(shape_t, np.int16)
    nod_rng = np.random.default_rng(nodule_ss)
    if nodules is None or isinstance(nodules, str):
        count = int(n_nodules) if n_nodules is not None else int(nod_rng.integers(2, 6))
        options = dict(nodule_options or {})
        options.setdefault("strict", n_nodules is not None)   # by default, as many as fit
        # nodules under two voxels across are not resolvable: raise the default minimum size
        options.setdefault("diameter_mm", (float(np.clip(2.0 * spacing.max(), 3.0, 20.0)), 30.0))
        specs = random_nodules(nod_rng, lungs, volume, count, vessels=tissues == _T["vessel"], **options)
    else:
        specs = list(nodules)
        if any(not isinstance(s, NoduleSpec) for s in specs):
            raise InvalidInputError("chest_ct: nodules must be NoduleSpec instances")
    drawn = []
    for n, spec in enumerate(specs, start=1):
        spec = replace(spec, label=n)
        _draw_nodule(grid, volume, nod_rng, spec, hu, tissues, lungs, labelmap)
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
    w = float(np.exp(-0.5 / sigma_k ** 2))
    taps = np.array([w, 1.0, w]) / (1.0 + 2.0 * w)
    impulse = np.zeros((9, 9), np.float32)
    impulse[4, 4] = 1.0
    gain = float(np.sqrt((ndimage.gaussian_filter(impulse, sigma_ij) ** 2).sum() * (taps ** 2).sum()))
    amplitude = np.float32(noise_hu / gain * np.sqrt(12.0))      # uniform(-1/2, 1/2) has variance 1/12
    for s in hu:
        if noise_hu > 0:
            s += (rng.random(s.shape, dtype=np.float32) - np.float32(0.5)) * amplitude
        ndimage.gaussian_filter(s, sigma_ij, output=s)
    edge, centre = np.float32(taps[0]), np.float32(taps[1])
    below = hu[0].copy()                                          # edges reflect, as in ndimage
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
    from .io.dicom_write import write_dicom_series as write

    meta = volume.meta
    for key, meta_key in (("patient_id", "patient_id"), ("patient_name", "patient_name"), ("study_uid", "study_uid"),
                          ("series_uid", "series_uid"), ("frame_of_reference_uid", "frame_of_reference_uid"),
                          ("series_description", "description"), ("study_description", "study_description")):
        if meta.get(meta_key):
            kwargs.setdefault(key, str(meta[meta_key]))
    return write(volume, folder, **kwargs)
