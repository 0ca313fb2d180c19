"""Maps on the model's grid brought back onto the CT's grid: the heat map (:func:`cam_on_ct_grid`,
rounded to :data:`CAM_STEP`) and the score map (:func:`on_ct_grid`). Arrays are K, J, I; both
grids are placed in RAS mm by their ``ijk_to_ras``."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..core.volume import Volume, crop, resample_to

#: The CAM's resolution: values are multiples of 1/1024 (float16's precision near 1). The heat
#: map is coarse (one model feature per ~12 mm) and shown through a 256-colour map, so nothing
#: visible changes, and gzip makes cam.nrrd 7x smaller and twice as fast to write.
CAM_STEP = 2.0**-10


def cam_on_ct_grid(cam: Volume, ct: Volume, box: Optional[Sequence[Sequence[int]]] = None) -> Volume:
    """A CAM on the model's grid (float32, [0, 1]) brought onto the CT's grid by
    :func:`on_ct_grid`, clipped to [0, 1] and rounded to multiples of :data:`CAM_STEP`. Within
    ``CAM_STEP / 2`` (+ float32 rounding) of SimpleITK's trilinear resampling of the same map,
    which this replaces (Testing/Python/test_pipeline.py checks it)."""

    def quantise(a: np.ndarray) -> None:  # a slab at a time, while it is in the cache
        np.clip(a, 0.0, 1.0, out=a)
        a *= 1.0 / CAM_STEP
        np.rint(a, out=a)
        a *= CAM_STEP

    return on_ct_grid(cam, ct, box, finish=quantise)


def on_ct_grid(
    values: Volume,
    ct: Volume,
    box: Optional[Sequence[Sequence[int]]] = None,
    finish: Optional[Callable[[np.ndarray], None]] = None,
) -> Volume:
    """A float32 map on the model's grid (the grid :func:`~LungGradCAMLib.core.volume.resample`
    made from ``ct``) onto the CT's grid: trilinear, by ``resample_to``'s separable path (slab by
    slab), 0 outside. ``box`` ((k0, k1), (j0, j1), (i0, i1), model voxels): the map is 0 outside
    it (the sliding window's box), so only the CT voxels within reach of the box are interpolated
    and the others stay 0 (untouched memory); the values are the same as without it."""
    if box is None:
        return resample_to(values, ct, order=1, default_value=0.0, finish=finish)
    # the box and one voxel around it (zeros, which the interpolation at its edge reads)
    sub = crop(values, [(max(0, a - 1), min(n, b + 1)) for (a, b), n in zip(box, values.shape)])
    corners = [
        [i, j, k]
        for i in (-0.5, sub.shape[2] - 0.5)
        for j in (-0.5, sub.shape[1] - 0.5)
        for k in (-0.5, sub.shape[0] - 0.5)
    ]
    ijk = ct.ras_to_ijk_points(sub.ijk_to_ras_points(corners))
    lo = np.clip(np.floor(ijk.min(axis=0)), 0, None).astype(int)[::-1]  # k, j, i
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int)[::-1] + 1, ct.shape)
    m = ct.ijk_to_ras.copy()
    m[:3, 3] = ct.ijk_to_ras_points(lo[::-1])[0]
    reach = Volume(np.broadcast_to(np.uint8(0), tuple(hi - lo)), m)  # geometry only
    out = np.zeros(ct.shape, dtype=np.float32)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = resample_to(
        sub, reach, order=1, default_value=0.0, finish=finish
    ).array
    return ct.with_array(out)
