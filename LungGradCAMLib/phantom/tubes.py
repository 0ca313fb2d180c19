"""The phantom's geometry: :class:`Grid` (body mm <-> the volume's voxels) and tubes, the vessel
and airway trees drawn as signed-distance maps (:class:`Tubes`, :func:`tree`)."""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------
class Grid:
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
        return np.stack([self.centre[0] + xyz[:, 2], self.centre[1] - xyz[:, 1], self.centre[2] - xyz[:, 0]], axis=1)

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


class Tubes:
    """Signed distance (mm, negative inside) to a set of tapered capsules, stored only over the
    bounding box of all of them (min-composited where tubes meet).

    ``segments``: (p0, p1, r0, r1) in grid mm. Each tube is evaluated inside its own box grown by
    ``pad_mm`` plus one voxel, so offsets up to ``pad_mm`` (walls, exclusion zones) and the
    partial-volume ramp can be read later.
    """

    def __init__(
        self, grid: Grid, segments: Sequence[Tuple[np.ndarray, np.ndarray, float, float]], pad_mm: float = 0.0
    ):
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
                idx = np.array(members[start : start + per_chunk])
                d = [
                    ((lo[idx, a, None] + np.arange(key[a])) * grid.sp[a] - p0[idx, a, None]).astype(np.float32)
                    for a in range(3)
                ]
                dk, dj, di = d[0][:, :, None, None], d[1][:, None, :, None], d[2][:, None, None, :]
                vv, vs = v[idx][:, None, None, None, :], v_scaled[idx][:, None, None, None, :]
                t = np.clip(dk * vs[..., 0] + dj * vs[..., 1] + di * vs[..., 2], 0.0, 1.0)
                sd = np.sqrt((dk - t * vv[..., 0]) ** 2 + (dj - t * vv[..., 1]) ** 2 + (di - t * vv[..., 2]) ** 2)
                sd -= r0[idx, None, None, None] + (r1 - r0)[idx, None, None, None] * t
                for m, n in enumerate(idx):
                    a, b = lo[n] - origin, hi[n] - origin
                    view = self.sd[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
                    np.minimum(view, sd[m, : size[n, 0], : size[n, 1], : size[n, 2]], out=view)

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
                out[j0 - J.start : j1 - J.start, i0 - I.start : i1 - I.start] = self.sd[
                    kk, j0 - self.lo[1] : j1 - self.lo[1], i0 - self.lo[2] : i1 - self.lo[2]
                ]
        return out


def occupancy(sd: np.ndarray, h: float, offset: float = 0.0) -> np.ndarray:
    """Partial-volume fraction (0..1) of a voxel inside the surface ``sd == offset`` (ramp width h)."""
    return np.clip(np.float32(0.5) - (sd - np.float32(offset)) / np.float32(h), 0.0, 1.0)


def polyline(grid: Grid, points_body: Sequence[Sequence[float]], radius: float) -> list:
    """Segments of a tube of constant ``radius`` (body mm) through ``points_body``."""
    p = grid.body_to_grid(np.asarray(points_body, np.float64))
    r = radius * grid.scale
    return [(p[n], p[n + 1], r, r) for n in range(len(p) - 1)]


def tree(rng: np.random.Generator, root: np.ndarray, terminals: np.ndarray, r_terminal: float, exponent: float) -> list:
    """A branching tree from ``root`` to every terminal point (grid mm), by recursive bisection of
    the terminals along their principal axis; radius = r_terminal * (terminals downstream)**exponent
    (Murray-like), so tubes narrow toward the periphery."""
    segments: list = []

    def grow(start: np.ndarray, pts: np.ndarray) -> None:
        n = len(pts)
        r = r_terminal * n**exponent
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


def smoothstep(x: Any) -> Any:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights that stretch n_in samples over n_out."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - frac
    if n_in > 1:
        m[np.arange(n_out), lo + 1] += frac
    return m


def uid(*parts: Any) -> str:
    """A deterministic DICOM UID (2.25 + UUID) from ``parts``."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "lunggradcam-phantom:" + ":".join(map(str, parts))).int)
