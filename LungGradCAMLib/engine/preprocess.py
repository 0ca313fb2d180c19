"""CT intensity preprocessing, applied as a model card asks (resampling to its spacing is
:func:`LungGradCAMLib.core.volume.resample`).

Every function takes a :class:`~LungGradCAMLib.core.volume.Volume`, a numpy array or (where it makes
sense) a torch tensor, and returns the same kind (a Volume keeps its geometry and meta).

Axis order: the last three axes are always **K, J, I** (slice, row, column) — torch's D, H, W.
Leading axes (e.g. torch's N, C) are independent samples: statistics such as min/max, mean/std and
noise are taken per sample and channel over the last three axes, never across a batch.

Intensities are CT numbers in **HU** until :func:`minmax_normalise` / :func:`zscore_normalise`;
gamma, CLAHE and Sobel enhancement work on min-max normalised intensities in [0, 1].

:func:`apply_card_preprocessing` is the single implementation of "the model's preprocessing" that
models, training and the pipeline share.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import InvalidInputError
from ..core.volume import Volume

ArrayLike = Any  # Volume | np.ndarray | torch.Tensor (torch is imported only when given one)

#: Normalisations a model card may ask for.
NORMALISATIONS = ("minmax", "zscore", "none")
CLAHE_MODES = ("slice", "3d")

#: scipy/torch Sobel response to a unit step (derivative [-1, 0, 1] x smoothing [1, 2, 1] twice).
_SOBEL_STEP_RESPONSE = 16.0


# --- kind dispatch ----------------------------------------------------------------------------------
def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _array(x: Any, name: str) -> np.ndarray:
    """The numpy array behind ``x`` (a Volume's array, or ``x`` itself); checks >= 3 axes."""
    a = x.array if isinstance(x, Volume) else np.asarray(x)
    if a.ndim < 3:
        raise InvalidInputError(f"{name}: expected a volume with axes (..., K, J, I); got shape {a.shape}")
    return a


def _wrap(x: Any, out: Any) -> Any:
    """Return ``out`` as the same kind as ``x`` (a Volume keeps geometry and meta)."""
    return x.with_array(out) if isinstance(x, Volume) else out


def _float(a: Any) -> Any:
    """Floating copy-or-view: float32 unless already floating (numpy or torch)."""
    if _is_torch(a):
        return a if a.is_floating_point() else a.float()
    return a if a.dtype.kind == "f" else a.astype(np.float32)


def _check_window(window: Sequence[float], name: str = "hu_window") -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be two numbers (low, high) in HU; got {window!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise InvalidInputError(f"{name} must be finite with low < high (HU); got {window!r}")
    return lo, hi


def _per_sample(a: Any, reduce: str) -> Any:
    """min/max/mean/std over the last three axes, keeping dims for broadcasting."""
    if _is_torch(a):
        flat = a.flatten(start_dim=-3)
        if reduce == "min":
            r = flat.amin(dim=-1)
        elif reduce == "max":
            r = flat.amax(dim=-1)
        elif reduce == "mean":
            r = flat.mean(dim=-1)
        else:
            r = flat.std(dim=-1, correction=0)
        return r[..., None, None, None]
    return getattr(np, reduce)(a, axis=(-3, -2, -1), keepdims=True)


# --- intensity -----------------------------------------------------------------------------------
def clip_hu(x: ArrayLike, hu_window: Sequence[float]) -> ArrayLike:
    """Clip CT numbers to ``hu_window`` = (low, high) HU. Returns floating intensities in HU."""
    lo, hi = _check_window(hu_window)
    a = x if _is_torch(x) else _array(x, "clip_hu")
    a = _float(a)
    return _wrap(x, a.clamp(lo, hi) if _is_torch(a) else np.clip(a, lo, hi))


def minmax_normalise(x: ArrayLike, hu_window: Optional[Sequence[float]] = None, eps: float = 1e-6) -> ArrayLike:
    """``(x - min) / (max - min)`` into [0, 1].

    With ``hu_window`` = (low, high) HU the values are first clipped to the window and min/max are
    the window's bounds (the same mapping for every scan, as a model card needs); without it, min and
    max are each sample's own (over the last three axes). A constant sample maps to 0.
    """
    if _is_torch(x):
        a = _float(x)
    else:
        a = _float(_array(x, "minmax_normalise"))
    if hu_window is not None:
        lo, hi = _check_window(hu_window)
        a = a.clamp(lo, hi) if _is_torch(a) else np.clip(a, lo, hi)
        out = (a - lo) / (hi - lo)
    else:
        lo, hi = _per_sample(a, "min"), _per_sample(a, "max")
        rng = hi - lo
        rng = rng.clamp_min(eps) if _is_torch(rng) else np.maximum(rng, eps)
        out = (a - lo) / rng
    return _wrap(x, out)


def zscore_normalise(x: ArrayLike, eps: float = 1e-6) -> ArrayLike:
    """Zero-centre and divide by the standard deviation, per sample over the last three axes.

    A constant sample maps to 0 (its std is floored at ``eps``)."""
    a = _float(x if _is_torch(x) else _array(x, "zscore_normalise"))
    mean, std = _per_sample(a, "mean"), _per_sample(a, "std")
    std = std.clamp_min(eps) if _is_torch(std) else np.maximum(std, eps)
    return _wrap(x, (a - mean) / std)


def gamma_correct(x: ArrayLike, gamma: float = 1.35) -> ArrayLike:
    """``x ** gamma`` on normalised intensities (values are clipped into [0, 1] first).

    gamma > 1 darkens mid-grey (lowers low-contrast background), gamma < 1 brightens it."""
    gamma = float(gamma)
    if not (np.isfinite(gamma) and gamma > 0):
        raise InvalidInputError(f"gamma must be a positive number; got {gamma!r}")
    a = _float(x if _is_torch(x) else _array(x, "gamma_correct"))
    if _is_torch(a):
        return a.clamp(0.0, 1.0).pow(gamma)
    return _wrap(x, np.power(np.clip(a, 0.0, 1.0), gamma))


def clahe(
    x: ArrayLike,
    mode: str = "slice",
    clip_limit: float = 0.01,
    kernel_size: Optional[Union[int, Sequence[int]]] = None,
    nbins: int = 256,
) -> ArrayLike:
    """Contrast-limited adaptive histogram equalisation (``skimage.exposure.equalize_adapthist``).

    ``mode="slice"`` equalises each axial slice (K) on its own (J, I), ``"3d"`` the whole volume.
    Input intensities must be normalised to [0, 1] (values outside are clipped); output in [0, 1],
    float32. ``kernel_size`` in voxels (skimage's default: 1/8 of each axis).

    Torch tensors are equalised on the CPU (scikit-image) and returned on their device.
    """
    from skimage.exposure import equalize_adapthist

    if mode not in CLAHE_MODES:
        raise InvalidInputError(f"clahe mode must be one of {CLAHE_MODES}; got {mode!r}")
    if _is_torch(x):
        import torch

        out = clahe(x.detach().float().cpu().numpy(), mode, clip_limit, kernel_size, nbins)
        return torch.from_numpy(out).to(x.device)
    a = np.clip(_float(_array(x, "clahe")), 0.0, 1.0)
    lead = a.shape[:-3]
    vols = a.reshape((-1,) + a.shape[-3:])
    out = np.empty(vols.shape, dtype=np.float32)
    for n, vol in enumerate(vols):
        if mode == "3d":
            out[n] = equalize_adapthist(vol, kernel_size=kernel_size, clip_limit=clip_limit, nbins=nbins)
        else:
            for k, plane in enumerate(vol):
                out[n, k] = equalize_adapthist(plane, kernel_size=kernel_size, clip_limit=clip_limit, nbins=nbins)
    return _wrap(x, out.reshape(lead + a.shape[-3:]))


def sobel_magnitude(x: ArrayLike) -> ArrayLike:
    """3D Sobel gradient magnitude over (K, J, I), scaled so a unit step gives 1.

    numpy applies scipy's Sobel kernels (derivative [-1, 0, 1], smoothing [1, 2, 1], mode ``reflect``)
    with ``scipy.ndimage.correlate1d``; torch applies the same kernels as a 3D convolution with
    replicate padding on the tensor's device — the two agree."""
    if _is_torch(x):
        import torch
        import torch.nn.functional as F

        a = _float(x)
        d = torch.tensor([-1.0, 0.0, 1.0], dtype=a.dtype, device=a.device)
        s = torch.tensor([1.0, 2.0, 1.0], dtype=a.dtype, device=a.device)
        kernels = torch.stack(
            [torch.einsum("a,b,c->abc", *[d if ax == axis else s for ax in range(3)]) for axis in range(3)]
        )[:, None]  # (3, 1, 3, 3, 3)
        vol = a.reshape((-1, 1) + tuple(a.shape[-3:]))
        grads = F.conv3d(F.pad(vol, (1, 1, 1, 1, 1, 1), mode="replicate"), kernels)
        return (grads.square().sum(dim=1).sqrt() / _SOBEL_STEP_RESPONSE).reshape(a.shape)
    a = _float(_array(x, "sobel_magnitude"))
    axes = range(a.ndim - 3, a.ndim)

    from scipy import ndimage  # here, not at import: loading a model must not pay for scipy

    def sobel(axis: int) -> np.ndarray:
        # ndimage.sobel would also smooth across leading (batch) axes: smooth only K, J, I.
        g = ndimage.correlate1d(a, [-1.0, 0.0, 1.0], axis=axis, mode="reflect")
        for other in axes:
            if other != axis:
                g = ndimage.correlate1d(g, [1.0, 2.0, 1.0], axis=other, mode="reflect")
        return g

    mag = np.sqrt(sum(np.square(sobel(ax)) for ax in axes)) / _SOBEL_STEP_RESPONSE
    return _wrap(x, mag.astype(a.dtype, copy=False))


def sobel_enhance(x: ArrayLike, weight: float = 0.5) -> ArrayLike:
    """Edge enhancement: ``x + weight * sobel_magnitude(x)``, clipped to [0, 1].

    Works on normalised intensities in [0, 1]; ``weight`` 0 leaves ``x`` unchanged."""
    weight = float(weight)
    if not (np.isfinite(weight) and weight >= 0):
        raise InvalidInputError(f"sobel weight must be a non-negative number; got {weight!r}")
    a = _float(x if _is_torch(x) else _array(x, "sobel_enhance"))
    out = a + weight * sobel_magnitude(a)
    return out.clamp(0.0, 1.0) if _is_torch(out) else _wrap(x, np.clip(out, 0.0, 1.0))


# --- noise ---------------------------------------------------------------------------------------
def noise_score(
    x: Union[Volume, np.ndarray], mask: Optional[np.ndarray] = None, per_slice: bool = False
) -> Union[float, np.ndarray]:
    """Laplacian-variance noise score: the variance of the in-plane (J, I) Laplacian.

    The 2D Laplacian of each axial slice is used (not 3D) so slice thickness does not enter the
    score; units are (input units)², i.e. HU² on CT numbers. ``mask`` (bool, K, J, I) restricts the
    voxels counted (e.g. the body or the lungs, so that the field-of-view edge and padding do not
    dominate). Returns one float for the scan, or with ``per_slice=True`` a (K,) float64 array
    (NaN for slices with no masked voxel). Flag the noisiest with :func:`flag_noisy`.
    """
    from scipy import ndimage

    a = _array(x, "noise_score").astype(np.float64, copy=False)
    if a.ndim != 3:
        raise InvalidInputError(f"noise_score: expected one (K, J, I) volume; got shape {a.shape}")
    lap = sum(ndimage.correlate1d(a, [1.0, -2.0, 1.0], axis=ax, mode="reflect") for ax in (1, 2))
    if mask is None:
        return lap.reshape(a.shape[0], -1).var(axis=1) if per_slice else float(lap.var())
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != a.shape:
        raise InvalidInputError(f"noise_score: mask shape {mask.shape} differs from the volume's {a.shape}")
    if not per_slice:
        if not mask.any():
            raise InvalidInputError("noise_score: the mask is empty; pass a mask with voxels or none")
        return float(lap[mask].var())
    n = mask.sum(axis=(1, 2))
    s1 = np.where(mask, lap, 0.0).sum(axis=(1, 2))
    s2 = np.where(mask, lap * lap, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        return np.where(n > 0, s2 / n - mean * mean, np.nan)


def flag_noisy(scores: Sequence[float], n_mad: float = 3.0) -> np.ndarray:
    """Flag outliers among noise scores (of slices, or of the scans of a cohort).

    A score is flagged when it exceeds ``median + n_mad * 1.4826 * MAD`` (a robust z-score above
    ``n_mad``; 1.4826 makes the MAD a standard deviation for normal data). NaN scores are not flagged.
    Returns a bool array of the same length."""
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    if not ok.any():
        return np.zeros(s.shape, dtype=bool)
    med = np.median(s[ok])
    mad = 1.4826 * np.median(np.abs(s[ok] - med))
    with np.errstate(invalid="ignore"):
        return ok & (s > med + n_mad * mad) & (s > med)


# --- the model card's preprocessing ------------------------------------------------------------------
def _card_get(card: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(card, dict):
            if name in card:
                return card[name]
        elif hasattr(card, name):
            return getattr(card, name)
    return default


def apply_card_preprocessing(x: ArrayLike, card: Any) -> ArrayLike:
    """Apply the intensity preprocessing a model card asks for; the one implementation shared by
    models, training and the pipeline. Resampling to the card's spacing is separate
    (:func:`LungGradCAMLib.core.volume.resample`) because it changes the grid.

    ``card`` is a ModelCard or any object/dict with these fields (missing = default):

    * ``hu_window``: (low, high) HU or None. Clip to it; min/max are its bounds.
    * ``normalisation``: ``"minmax"`` (default), ``"zscore"`` or ``"none"``.
    * ``gamma``: float or None (e.g. 1.35); ``clahe``: None/False, True/``"slice"`` or ``"3d"``;
      ``sobel``: None/False, True (weight 0.5) or a weight.

    Order: clip to the window and min-max normalise into [0, 1] (per-sample min/max without a window)
    -> gamma -> CLAHE -> Sobel enhancement -> with ``"zscore"``, zero-centre and divide by the std.
    ``"none"`` only clips to the window and allows no enhancement. ``x`` is in HU with axes
    (..., K, J, I); returns the same kind (Volume, numpy array or torch tensor on its device).
    """
    norm = _card_get(card, "normalisation", default="minmax") or "none"
    if norm not in NORMALISATIONS:
        raise InvalidInputError(f"model card normalisation must be one of {NORMALISATIONS}; got {norm!r}")
    window = _card_get(card, "hu_window")
    gamma = _card_get(card, "gamma")
    clahe_mode = _card_get(card, "clahe")
    if clahe_mode is True:
        clahe_mode = "slice"
    sobel = _card_get(card, "sobel")
    sobel_weight = 0.5 if sobel is True else (float(sobel) if sobel else 0.0)

    if norm == "none":
        if gamma or clahe_mode or sobel_weight:
            raise InvalidInputError(
                "model card: gamma, CLAHE and Sobel need normalised intensities; "
                "set normalisation to 'minmax' or 'zscore'"
            )
        return clip_hu(x, window) if window is not None else x
    out = minmax_normalise(x, window)
    if gamma:
        out = gamma_correct(out, gamma)
    if clahe_mode:
        out = clahe(out, mode=clahe_mode)
    if sobel_weight:
        out = sobel_enhance(out, sobel_weight)
    if norm == "zscore":
        out = zscore_normalise(out)
    return out
