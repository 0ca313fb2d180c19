"""PNG montages of a CT: axial, coronal and sagittal views through one point, with contours and an
optional CAM overlay.

Views follow radiological conventions whatever the volume's index order: axial with the patient's
right on the image left and anterior up; coronal with the right on the left and superior up;
sagittal with anterior on the left and superior up. Each view is drawn at its physical aspect ratio
(voxel spacing in mm). Oblique volumes are shown along their nearest patient axes.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import InvalidInputError, UnsupportedFormatError, VolumeError
from ..core.volume import Volume

#: Contour colours: cyan for lungs, the others in the order the contours are given.
LUNG_COLOUR = "#00e5ff"
PALETTE = ("#ff2d2d", "#7cfc00", "#ffd400", "#ff66ff", "#ff8c00", "#ffffff")


def _to_display(volume: Volume) -> Tuple[Tuple[int, int, int], Tuple[bool, bool, bool], np.ndarray]:
    """How to reorder a (K, J, I) array into display order (superior, posterior, left): the array
    axis feeding each display axis, whether to flip it, and the display spacing (mm)."""
    direction = volume.direction  # column c: RAS direction of index axis (i, j, k)[c]
    # index axis (i, j, k) -> RAS axis (x, y, z), the closest match overall (handles oblique): the
    # best of the 6 assignments (scipy.optimize's linear_sum_assignment cost 0.5 s of import)
    ras_of_index = dict(
        enumerate(
            max(
                itertools.permutations(range(3)), key=lambda rows: sum(abs(direction[r, c]) for c, r in enumerate(rows))
            )
        )
    )
    wanted = {2: 1.0, 1: -1.0, 0: -1.0}  # display axes grow toward S, P (-y), L (-x)
    axes, flips, spacing = [], [], []
    for ras_axis in (2, 1, 0):
        index_axis = next(c for c, r in ras_of_index.items() if r == ras_axis)
        axes.append(2 - index_axis)  # index axis i, j, k is array axis 2, 1, 0
        flips.append(bool(np.sign(direction[ras_axis, index_axis]) != wanted[ras_axis]))
        spacing.append(volume.spacing[index_axis])
    return tuple(axes), tuple(flips), np.array(spacing)  # type: ignore[return-value]


def _reorder(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    out = np.transpose(array, axes)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    return out


#: A view whose height is under this share of its width (a slab's coronal and sagittal views) is
#: stretched vertically by a whole factor, said in its title, so that it stays readable.
MIN_VIEW_ASPECT = 0.3
#: Zoomed views reach at least this far (mm) from a region's centre.
ZOOM_MIN_HALF_MM = 20.0


@dataclass
class ZoomView:
    """A row of zoomed views in :func:`save_montage`: ``label`` (its title), ``center_ijk`` (voxel
    the planes pass through) and ``box_kji`` (the (k0, k1), (j0, j1), (i0, i1) half-open voxel
    ranges to show; widened to at least :data:`ZOOM_MIN_HALF_MM` around the centre)."""

    label: str
    center_ijk: Sequence[int]
    box_kji: Sequence[Tuple[int, int]]


def save_montage(
    volume: Volume,
    path: "str | os.PathLike[str]",
    center_ijk: Optional[Sequence[int]] = None,
    *,
    contours: Optional[Dict[str, np.ndarray]] = None,
    cam: Union[np.ndarray, Volume, None] = None,
    cam_opacity: float = 0.4,
    cam_label: str = "CAM",
    cam_threshold: Optional[float] = None,
    cam_mask: Optional[np.ndarray] = None,
    zooms: Sequence[ZoomView] = (),
    window: Tuple[float, float] = (-1350.0, 150.0),
    title: Optional[str] = None,
    caption: Optional[str] = None,
    dpi: int = 100,
) -> Path:
    """Write a PNG with axial, coronal and sagittal views of ``volume`` through ``center_ijk``.

    ``center_ijk``: voxel (i, j, k) the three planes pass through (default: the volume centre).
    ``contours``: name -> mask (K, J, I, the volume's grid; bool, or labels with non-zero inside),
    drawn as coloured outlines with a legend (e.g. {"lungs": ..., "nodules": ...}); names
    containing "lung" are cyan, the others red, green, yellow, ... in order. ``cam``: values in [0, 1] on the volume's grid
    (array K, J, I or a :class:`Volume`), overlaid with the jet colour map (high = red), transparent
    near zero, at most ``cam_opacity`` opaque, with a colour bar labelled ``cam_label`` (e.g. what
    the scale means) and, when given, a white line at ``cam_threshold``; ``cam_mask`` (bool, K, J,
    I): the CAM is shown only inside it (e.g. the lungs). ``zooms``: one more row of the three views per
    :class:`ZoomView`, cropped to its box (e.g. one per hot region). A view much wider than high
    (a thin slab's coronal and sagittal views) is stretched vertically by a whole factor, said in
    its title. ``window``: (low, high) HU shown
    black to white (default: lung window). ``caption``: a line of small text along the bottom (e.g.
    the model's intended use). The file is written atomically; returns its path.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UnsupportedFormatError(f"{path}: save_montage writes PNG; give a path ending in .png")
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"save_montage: volume must be a Volume, got {type(volume).__name__}")
    lo, hi = (float(w) for w in window)
    if not hi > lo:
        raise InvalidInputError(f"save_montage: window must be (low, high) HU with high > low; got {window!r}")
    if not 0.0 <= float(cam_opacity) <= 1.0:
        raise InvalidInputError(f"save_montage: cam_opacity must be within 0-1; got {cam_opacity!r}")
    shape = volume.shape
    center_kji = _center_kji(center_ijk, shape)
    masks: Dict[str, np.ndarray] = {}
    for name, mask in (contours or {}).items():
        masks[name] = _on_grid(
            mask, shape, f"contour '{name}'"
        )  # cast per drawn slice: a CT-sized copy costs more than the figure
    cam_array = None
    if cam is not None:
        cam_array = np.asarray(cam.array if isinstance(cam, Volume) else cam, dtype=np.float32)
        if cam_array.shape != shape:
            raise VolumeError(
                f"save_montage: the CAM has shape {cam_array.shape}, the volume {shape}; resample it onto the CT first"
            )
    cam_mask = None if cam_mask is None else _on_grid(cam_mask, shape, "cam_mask")

    axes, flips, sp = _to_display(volume)
    ct = _reorder(volume.array, axes, flips)
    masks = {name: _reorder(m, axes, flips) for name, m in masks.items()}
    cam_d = _reorder(cam_array, axes, flips) if cam_array is not None else None
    shown_d = _reorder(cam_mask, axes, flips) if cam_mask is not None else None
    rows = [("", _to_display_index(center_kji, shape, axes, flips), None)]
    for zoom in zooms:
        box = _zoom_box(zoom.box_kji, _center_kji(zoom.center_ijk, shape), volume.spacing[::-1], shape)
        rows.append(
            (
                zoom.label,
                _to_display_index(_center_kji(zoom.center_ijk, shape), shape, axes, flips),
                _box_to_display(box, shape, axes, flips),
            )
        )
    n_s, n_p, n_l = ct.shape
    s_s, s_p, s_l = sp
    # a thin slab: stretch its coronal and sagittal views (superior axis) by a whole factor
    stretch = (
        max(1, int(np.ceil(MIN_VIEW_ASPECT * n_l * s_l / max(n_s * s_s, 1e-6))))
        if n_s * s_s < MIN_VIEW_ASPECT * n_l * s_l
        else 1
    )

    # (name, 2D take, row spacing, column spacing, edge labels (left, right, top, bottom))
    views = [
        ("axial", lambda a, c: a[c[0]], s_p, s_l, ("R", "L", "A", "P")),
        ("coronal", lambda a, c: a[::-1, c[1], :], s_s * stretch, s_l, ("R", "L", "S", "I")),
        ("sagittal", lambda a, c: a[::-1, :, c[2]], s_s * stretch, s_p, ("A", "P", "S", "I")),
    ]
    widths = [n_l * s_l, n_l * s_l, n_p * s_p]
    heights = [n_p * s_p, n_s * s_s * stretch, n_s * s_s * stretch]
    inch_per_mm = 4.5 / max(heights)
    row_inches = max(heights) * inch_per_mm
    zoom_inches = 2.6
    fig = Figure(
        figsize=(
            sum(widths) * inch_per_mm + 1.6 + (0.9 if cam_d is not None else 0.0),
            row_inches + zoom_inches * len(zooms) + 1.1 + (0.4 if caption else 0.0),
        ),
        facecolor="black",
    )
    FigureCanvasAgg(fig)
    total = row_inches + zoom_inches * len(zooms)
    grid = fig.add_gridspec(
        len(rows),
        3,
        width_ratios=widths,
        height_ratios=[row_inches] + [zoom_inches] * len(zooms),
        left=0.03,
        right=0.9 if cam_d is not None else 0.97,
        top=1 - 0.7 / (total + 1.1),
        bottom=(0.5 if caption else 0.2) / (total + 1.1),
        wspace=0.08,
        hspace=0.25,
    )
    jet = matplotlib.colormaps["jet"]
    others = iter(PALETTE * len(masks))
    colours = {name: LUNG_COLOUR if "lung" in name.lower() else next(others) for name in masks}
    legend: List[Line2D] = []
    for r, (label, c, crop) in enumerate(rows):
        sub = (slice(None),) * 3 if crop is None else tuple(slice(a, b) for a, b in crop)
        origin = np.zeros(3, int) if crop is None else np.array([a for a, _ in crop])
        local = np.asarray(c) - origin
        parts = {
            "ct": ct[sub],
            "cam": None if cam_d is None else cam_d[sub],
            "shown": None if shown_d is None else shown_d[sub],
        }
        for n, (name, take, row_mm, col_mm, edges) in enumerate(views):
            ax = fig.add_subplot(grid[r, n])
            img = take(parts["ct"], local)
            height, width = img.shape
            extent = (0.0, width * col_mm, height * row_mm, 0.0)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="bilinear")
            if parts["cam"] is not None:
                heat = np.clip(np.nan_to_num(take(parts["cam"], local)), 0.0, 1.0)
                rgba = jet(heat)
                # transparent near zero, fully weighted from 0.2 up; nothing outside cam_mask
                rgba[..., 3] = float(cam_opacity) * np.clip(heat / 0.2, 0.0, 1.0)
                if parts["shown"] is not None:
                    rgba[..., 3] *= take(parts["shown"], local).astype(bool)
                ax.imshow(rgba, extent=extent, interpolation="bilinear")
            xs = (np.arange(width) + 0.5) * col_mm
            ys = (np.arange(height) + 0.5) * row_mm
            for cname, mask in masks.items():
                colour = colours[cname]
                sl = take(mask[sub], local).astype(bool)
                if sl.any() and not sl.all():
                    ax.contour(xs, ys, sl.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
                if r == 0 and n == 0:
                    legend.append(Line2D([], [], color=colour, lw=2, label=cname))
            ax.set_xlim(0, width * col_mm)
            ax.set_ylim(height * row_mm, 0)
            ax.set_aspect("equal")
            ax.set_axis_off()
            where = f"{'kji'[axes[n]]} = {int(_from_display(c, shape, axes, flips)[axes[n]])}"
            stretched = f", S x{stretch}" if stretch > 1 and n > 0 else ""
            ax.set_title(
                f"{label + ': ' if label and n == 0 else ''}{name} ({where}{stretched})",
                color="white",
                fontsize=10 if r == 0 else 9,
            )
            style = dict(color="yellow", fontsize=10 if r == 0 else 8, fontweight="bold", transform=ax.transAxes)
            ax.text(0.01, 0.5, edges[0], ha="left", va="center", **style)
            ax.text(0.99, 0.5, edges[1], ha="right", va="center", **style)
            ax.text(0.5, 0.99, edges[2], ha="center", va="top", **style)
            ax.text(0.5, 0.01, edges[3], ha="center", va="bottom", **style)
    if legend:
        fig.legend(
            handles=legend, loc="upper right", frameon=False, labelcolor="white", fontsize=9, ncol=min(len(legend), 4)
        )
    if cam_d is not None:
        top = 1 - 0.7 / (total + 1.1)
        bar_ax = fig.add_axes((0.92, top - 0.75 * row_inches / (total + 1.1), 0.015, 0.7 * row_inches / (total + 1.1)))
        bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=jet), cax=bar_ax)
        bar.set_label(cam_label, color="white")
        if cam_threshold is not None:
            bar.ax.axhline(float(cam_threshold), color="white", linewidth=2)
        bar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    window_text = f"W {hi - lo:.0f} / L {(hi + lo) / 2:.0f} HU"
    fig.text(
        0.01,
        1 - 0.15 / (total + 1.1),
        (title + "   " if title else "") + window_text,
        color="white",
        fontsize=11,
        ha="left",
        va="top",
    )
    if caption:
        fig.text(0.01, 0.1 / (total + 1.1), caption, color="orange", fontsize=9, ha="left", va="bottom", wrap=True)
    with atomic_path(path) as tmp:
        # PNG zlib level 1: a quarter of the default's encoding time, for a slightly larger file
        fig.savefig(tmp, dpi=dpi, facecolor=fig.get_facecolor(), format="png", pil_kwargs={"compress_level": 1})
    return path


def _center_kji(center_ijk: Optional[Sequence[int]], shape: Tuple[int, ...]) -> np.ndarray:
    if center_ijk is None:
        return np.array(shape) // 2
    center_kji = np.asarray(center_ijk, dtype=float).round().astype(int)[::-1]
    if center_kji.shape != (3,) or np.any(center_kji < 0) or np.any(center_kji >= shape):
        raise InvalidInputError(
            f"save_montage: center_ijk {tuple(center_ijk)} is outside the volume (i, j, k sizes {shape[::-1]})"
        )
    return center_kji


def _on_grid(mask: np.ndarray, shape: Tuple[int, ...], what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise InvalidInputError(
            f"save_montage: {what} has shape {mask.shape}, the volume {shape}; "
            "give masks on the volume's grid (K, J, I)"
        )
    return mask


def _to_display_index(center_kji: np.ndarray, shape, axes, flips) -> np.ndarray:
    """An array index (k, j, i) as an index of the display-ordered array."""
    return np.array([shape[a] - 1 - center_kji[a] if f else center_kji[a] for a, f in zip(axes, flips)])


def _from_display(c: np.ndarray, shape, axes, flips) -> np.ndarray:
    """A display index back to the array's (k, j, i), for the views' titles."""
    out = np.zeros(3, int)
    for d, (a, f) in enumerate(zip(axes, flips)):
        out[a] = shape[a] - 1 - c[d] if f else c[d]
    return out


def _zoom_box(box_kji, center_kji: np.ndarray, spacing_kji, shape) -> List[Tuple[int, int]]:
    """``box_kji`` widened to at least :data:`ZOOM_MIN_HALF_MM` around the centre, within the volume."""
    out = []
    for (a, b), c, s, n in zip(box_kji, center_kji, spacing_kji, shape):
        half = int(np.ceil(ZOOM_MIN_HALF_MM / s))
        out.append((max(0, min(int(a), int(c) - half)), min(int(n), max(int(b), int(c) + half + 1))))
    return out


def _box_to_display(box_kji, shape, axes, flips) -> List[Tuple[int, int]]:
    out = []
    for a, f in zip(axes, flips):
        lo, hi = box_kji[a]
        out.append((shape[a] - hi, shape[a] - lo) if f else (lo, hi))
    return out
