"""3D augmentation of training batches, on the device: contrast-enhanced vessels (in HU), then
rotation, flips, zoom and shear in one trilinear resampling, then intensity scale, shift and noise."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F


def augment(
    x: "torch.Tensor",
    generator: "torch.Generator",
    rotate_deg: float = 15.0,
    zoom: Tuple[float, float] = (0.9, 1.1),
    shear: float = 0.1,
    flip: bool = True,
    rot90: bool = True,
    scale: float = 0.1,
    shift: float = 0.05,
    noise: float = 0.02,
    masks: "Optional[torch.Tensor]" = None,
    mask_padding: str = "zeros",
) -> "Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]":
    """Randomly transform a normalised batch ``x`` (N, C, K, J, I): rotation up to ``rotate_deg``
    about each axis, a flip of each axis with probability 1/2, with ``rot90`` an in-plane swap of
    the J and I axes with probability 1/2 (with the flips: every in-plane 90-degree rotation),
    isotropic zoom in ``zoom``, shear up to ``shear``, all as one trilinear resampling (border
    values extend); then intensity
    ``x * (1 + U(-scale, scale)) + U(-shift, shift) + N(0, noise)``. Random numbers come from the
    CPU ``generator``, so runs are reproducible on any device. With ``masks`` (N, C', K, J, I,
    e.g. lesion outlines) returns (x, masks), the masks moved by the same resampling (linear, 0
    outside, or with ``mask_padding="border"`` the border values extended, as ``x``'s) and not by
    the intensity changes; the random draws are the same as without."""
    n = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, dtype=torch.float64) * (hi - lo) + lo

    a = torch.deg2rad(u(-rotate_deg, rotate_deg, n, 3))
    c, s = torch.cos(a), torch.sin(a)
    eye = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    rx, ry, rz = eye.clone(), eye.clone(), eye.clone()
    rx[:, 1, 1], rx[:, 1, 2], rx[:, 2, 1], rx[:, 2, 2] = c[:, 0], -s[:, 0], s[:, 0], c[:, 0]
    ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = c[:, 1], s[:, 1], -s[:, 1], c[:, 1]
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1] = c[:, 2], -s[:, 2], s[:, 2], c[:, 2]
    sh = eye.clone()
    sh[:, 0, 1], sh[:, 1, 2], sh[:, 0, 2] = u(-shear, shear, n), u(-shear, shear, n), u(-shear, shear, n)
    z = u(1 / zoom[1], 1 / zoom[0], n)[:, None, None]  # sampling grid scale = 1 / zoom
    signs = torch.where(torch.rand(n, 3, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n, 3)
    matrix = rx @ ry @ rz @ sh * z @ torch.diag_embed(signs.double())
    if rot90:  # swap the grid's x (I) and y (J) axes for half of the samples
        swap = torch.rand(n, generator=generator) < 0.5
        matrix[swap] = matrix[swap][:, :, [1, 0, 2]]
    theta = torch.cat([matrix, torch.zeros(n, 3, 1, dtype=torch.float64)], dim=2).to(x.device, torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = (1 + u(-scale, scale, n)).float().to(x.device).view(n, 1, 1, 1, 1)
    offset = u(-shift, shift, n).float().to(x.device).view(n, 1, 1, 1, 1)
    jitter = torch.randn(out.shape, generator=generator).to(x.device) * noise
    out = out * gain + offset + jitter
    if masks is None:
        return out
    return out, F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode=mask_padding, align_corners=False)


def enhance_vessels(
    hu: "torch.Tensor",
    lesion: "torch.Tensor",
    generator: "torch.Generator",
    max_hu: float = 600.0,
    p: float = 0.5,
    floor_hu: float = -600.0,
    ramp_hu: float = 400.0,
) -> "torch.Tensor":
    """Contrast enhancement, in HU, as an augmentation: for a share ``p`` of the samples of ``hu``
    (N, K, J, I), every voxel of tissue outside the lesion (``lesion``, bool, same shape: the
    nodule's voxels, kept as they are) gets ``U(0, max_hu)`` HU more, scaled by how dense it is
    (0 at ``floor_hu``, full from ``floor_hu + ramp_hu``), as vessels, heart and chest wall are
    brightened by contrast medium (the held-out contrast CT's vessels reach +600 HU). So a vessel
    seen end-on is a negative at any brightness, and a nodule keeps its HU beside an enhanced
    vessel. Random numbers come from the CPU ``generator``."""
    n = hu.shape[0]
    # the nodule's partial-volume rim, one voxel outside its outline, is kept too
    lesion = F.max_pool3d(lesion.to(hu.device, torch.float32).expand_as(hu).unsqueeze(1), 3, 1, 1)[:, 0] > 0
    chosen = torch.rand(n, generator=generator) < p
    gain = torch.rand(n, generator=generator) * max_hu * chosen
    dense = ((hu - floor_hu) / ramp_hu).clamp(0.0, 1.0) * ~lesion
    return hu + dense * gain.to(hu.device, hu.dtype).view(n, *([1] * (hu.dim() - 1)))
