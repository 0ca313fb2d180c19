"""The phantom's nodules: each :class:`~.specs.NoduleSpec` drawn with partial volume
(:func:`draw_nodule`), and :func:`random_nodules`, nodules of every kind, margin and placement
placed in the lungs."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..core.errors import InvalidInputError
from ..core.volume import Volume
from .specs import KINDS, MARGINS, PLACEMENTS, TISSUES, NoduleSpec
from .tubes import Grid


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
    norm = float(np.mean(base**3)) ** (-1.0 / 3.0)

    def radius(u: np.ndarray) -> np.ndarray:
        ue = (u @ q) / axes  # ellipsoidal stretch
        stretch = 1.0 / np.linalg.norm(ue, axis=-1)
        r = R * norm * stretch * (1.0 + lobe_amp * (bumps(u) - bump_mean))
        if spike_len is not None:
            ang = np.sqrt(np.clip(2.0 * (1.0 - u @ spikes.T), 0.0, None))
            r = r + (spike_len * np.clip(1.0 - ang / spike_width, 0.0, None)).max(axis=-1)
        return r

    extent = R * norm * 1.2 * (1 + lobe_amp * 3) + (float(spike_len.max()) if spike_len is not None else 0.0)
    return radius, extent


def draw_nodule(
    grid: Grid,
    volume: Volume,
    rng: np.random.Generator,
    spec: NoduleSpec,
    hu: np.ndarray,
    tissues: np.ndarray,
    lungs: np.ndarray,
    labelmap: np.ndarray,
) -> None:
    """Draw one nodule (HU, tissue code, label) whose centre lies in the lungs."""
    ijk = volume.ras_to_ijk_points(spec.center_ras)[0]
    nearest = np.round(ijk[::-1]).astype(int)
    if np.any(nearest < 0) or np.any(nearest >= grid.shape) or not lungs[tuple(nearest)]:
        raise InvalidInputError(
            f"chest_ct: nodule {spec.label} at RAS {np.round(spec.center_ras, 1).tolist()} mm "
            f"({spec.diameter_mm:.1f} mm) is not centred in the lungs; place it inside them "
            "(random_nodules samples valid centres)"
        )
    c = ijk[::-1] * grid.sp
    radius, extent = _nodule_radius(rng, spec)
    box = grid.box(c - extent - grid.h, c + extent + grid.h)
    dk, dj, di = grid.coords(box, c)
    dk = dk + np.float32(1e-3)  # no voxel exactly at the centre, where the direction is undefined
    dist = np.sqrt(dk * dk + dj * dj + di * di)
    u = np.stack(np.broadcast_arrays(dk, dj, di), axis=-1) / dist[..., None]
    occ = np.clip((radius(u) - dist) / grid.h + 0.5, 0.0, 1.0).astype(np.float32)
    occ *= lungs[box]  # nodules displace lung, never the chest wall
    R = spec.diameter_mm / 2.0
    view = hu[box]
    if spec.kind in ("ground-glass", "part-solid"):
        ggo = np.float32(rng.uniform(-620.0, -470.0))
        np.maximum(view, view * (1 - occ) + ggo * occ, out=view)  # vessels stay visible
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
    tissues[box][inside] = TISSUES["nodule"]


def random_nodules(
    rng: np.random.Generator,
    lungs: np.ndarray,
    volume: Volume,
    n: int,
    *,
    vessels: Optional[np.ndarray] = None,
    kinds: Optional[Sequence[str]] = None,
    margins: Optional[Sequence[str]] = None,
    placements: Optional[Sequence[str]] = None,
    diameter_mm: Tuple[float, float] = (3.0, 30.0),
    malignant_fraction: float = 0.5,
    avoid: Sequence[NoduleSpec] = (),
    min_gap_mm: float = 5.0,
    strict: bool = True,
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
        raise InvalidInputError(
            f"random_nodules: lungs mask shape {lungs.shape} differs from the volume's {volume.shape}"
        )
    lo, hi = (float(d) for d in diameter_mm)
    if not 1.0 <= lo <= hi <= 60.0:
        raise InvalidInputError(f"random_nodules: diameter_mm must be (min, max) within 1-60 mm; got {diameter_mm!r}")
    if not 0.0 <= float(malignant_fraction) <= 1.0:
        raise InvalidInputError(f"random_nodules: malignant_fraction must be within 0-1; got {malignant_fraction!r}")
    if placements is None:
        placements = (
            ["parenchymal"] * 5 + ["juxta-pleural"] * 2 + (["juxta-vascular"] * 2 if vessels is not None else [])
        )
    for name, values, allowed in (
        ("kinds", kinds, KINDS),
        ("margins", margins, MARGINS),
        ("placements", placements, PLACEMENTS),
    ):
        if values is not None and (not len(values) or any(v not in allowed for v in values)):
            raise InvalidInputError(
                f"random_nodules: {name} must be a non-empty list from {', '.join(allowed)}; got {values!r}"
            )
    vessel_ijk = np.argwhere(vessels & lungs)[:, ::-1] if vessels is not None else np.zeros((0, 3), int)
    if "juxta-vascular" in placements and not len(vessel_ijk):
        raise InvalidInputError(
            "random_nodules: juxta-vascular placement needs a vessels mask with vessels in the lungs"
        )

    # distance to the pleura on a ~3 mm grid over the lungs' bounding box
    sp = volume.spacing[::-1]  # (k, j, i) mm
    stride = np.maximum(1, np.round(3.0 / sp).astype(int))
    coarse = lungs[:: stride[0], :: stride[1], :: stride[2]]
    if not coarse.any():
        raise InvalidInputError("random_nodules: the lungs mask is empty; cannot place nodules")
    nz = np.argwhere(coarse)
    c0, c1 = nz.min(axis=0), nz.max(axis=0) + 1
    crop = np.pad(coarse[c0[0] : c1[0], c0[1] : c1[1], c0[2] : c1[2]], 1)
    cell = stride * sp
    # EDT measures to the nearest outside cell centre; the pleura lies half a cell nearer
    dist = ndimage.distance_transform_edt(crop, sampling=cell) - 0.5 * float(cell.mean())
    inward = np.stack(np.gradient(dist, *cell), axis=-1)  # grid mm, toward the lung
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
            centre = _place(
                rng,
                placement,
                R,
                margin,
                cell_ras,
                cell_dist,
                costal,
                out_ras,
                vessel_ijk,
                volume,
                dist,
                c0,
                stride,
                float(cell.max()),
                wall_distance,
                placed,
                min_gap_mm,
            )
            if centre is None:
                if diameter <= lo:
                    if not strict:
                        return out
                    raise InvalidInputError(
                        f"random_nodules: no room for a {diameter:.1f} mm {placement} nodule in these lungs "
                        f"(nodule {len(out) + 1} of {n}); ask for fewer or smaller nodules"
                    )
                diameter = max(lo, diameter * 0.7)
        placed.append((centre, diameter / 2))
        out.append(NoduleSpec(tuple(centre), diameter, kind, margin, placement, malignant))
    return out


def _pick(rng: np.random.Generator, options: Optional[Sequence[str]], probs: Dict[str, float]) -> str:
    """One of ``options`` (default: the keys of ``probs``), weighted by ``probs``."""
    names = list(options) if options is not None else list(probs)
    p = np.array([probs.get(v, 0.0) for v in names]) + 1e-3
    return str(names[rng.choice(len(names), p=p / p.sum())])


def _place(
    rng,
    placement,
    R,
    margin,
    cell_ras,
    cell_dist,
    costal,
    out_ras,
    vessel_ijk,
    volume,
    dist,
    c0,
    stride,
    cell_mm,
    wall_distance,
    placed,
    min_gap_mm,
) -> Optional[np.ndarray]:
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
