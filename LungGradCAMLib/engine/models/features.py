"""Image features of a nodule region, computed from the model's input patch itself (never from a
reader's outline or table): what a region model fuses with its networks' output
(:class:`~LungGradCAMLib.engine.models.networks.RegionNet`).

Each feature function takes the patch in HU, (N, 1, K, J, I) with the nodule at its centre, and
the voxel size in mm (isotropic grid), and returns (N, n) float32 values; :data:`FEATURES` names
them. Everything is torch (batched, on the model's device, no round trip to numpy).

To add a feature (e.g. the volume and diameters of a nodule outline method), register a function
here under a new name and list it in the region model's ``features``; the fusion's weights are then
fitted again on the cross-validation's out-of-fold outputs (``training.region``), without
retraining the networks.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

#: HU above which a voxel counts as solid enough to belong to a nodule (part-solid and solid
#: nodules; pure ground glass mostly lies below it).
SOLID_HU = -500.0
#: The nodule's edge: the first spherical shell (1 voxel thick) around the centre of which less
#: than this share is solid. Vessels and fissures cross a shell without filling it.
SHELL_SOLID = 0.7
#: How far out (mm) the shells go.
MAX_RADIUS_MM = 20.0


def _distance(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """(K, J, I) distance in voxels of each voxel from the patch's centre."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) ** 2 for n in shape]
    return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]).sqrt()


def _ball(shape: Sequence[int], radius_vox: float, device: torch.device) -> torch.Tensor:
    """(K, J, I) bool: the voxels within ``radius_vox`` of the patch's centre."""
    return _distance(shape, device) <= radius_vox


def radial_extent(hu: torch.Tensor, voxel_mm: float) -> torch.Tensor:
    """The nodule's radius (mm): how many 1-voxel shells around the centre are at least
    :data:`SHELL_SOLID` solid (> :data:`SOLID_HU`) before the first that is not (at most
    :data:`MAX_RADIUS_MM`), and the mean HU (/1000) within that radius (the centre voxel's when
    it is 0): a size and density the readers' outline is not needed for."""
    distance = _distance(hu.shape[2:], hu.device)
    solid = (hu[:, 0] > SOLID_HU).float()
    shells = [(distance >= r) & (distance < r + 1) for r in range(int(MAX_RADIUS_MM / voxel_mm))]
    share = torch.stack([(solid * s).sum(dim=(1, 2, 3)) / s.sum().clamp_min(1) for s in shells], dim=1)
    run = torch.cumprod((share >= SHELL_SOLID).float(), dim=1).sum(dim=1)  # shells, from the centre out
    inside = (distance[None] < run[:, None, None, None]).float()
    n = inside.sum(dim=(1, 2, 3))
    centre = hu[(slice(None), 0) + tuple(s // 2 for s in hu.shape[2:])]
    mean_hu = torch.where(n > 0, (hu[:, 0] * inside).sum(dim=(1, 2, 3)) / n.clamp_min(1), centre) / 1000.0
    return torch.stack([run * voxel_mm, mean_hu], dim=1)


def density_profile(hu: torch.Tensor, voxel_mm: float) -> torch.Tensor:
    """The share of voxels above :data:`SOLID_HU` within 3, 6, 10 and 15 mm of the centre."""
    solid = hu[:, 0] > SOLID_HU
    out = [
        (solid & _ball(hu.shape[2:], r / voxel_mm, hu.device)).sum(dim=(1, 2, 3)).float()
        / _ball(hu.shape[2:], r / voxel_mm, hu.device).sum().clamp_min(1)
        for r in (3.0, 6.0, 10.0, 15.0)
    ]
    return torch.stack(out, dim=1)


#: name -> (function, the names of its values)
FEATURES: Dict[str, Tuple[Callable[[torch.Tensor, float], torch.Tensor], List[str]]] = {
    "radial_extent": (radial_extent, ["radius_mm", "mean_hu_per_1000"]),
    "density_profile": (
        density_profile,
        ["solid_within_3mm", "solid_within_6mm", "solid_within_10mm", "solid_within_15mm"],
    ),
}


def feature_names(names: Sequence[str]) -> List[str]:
    """The value names of the features ``names``, in order."""
    return [f"{name}.{value}" for name in names for value in FEATURES[name][1]]


def image_features(hu: torch.Tensor, voxel_mm: float, names: Sequence[str]) -> torch.Tensor:
    """(N, n) the features ``names`` (keys of :data:`FEATURES`) of HU patches (N, 1, K, J, I)."""
    return torch.cat([FEATURES[name][0](hu, voxel_mm) for name in names], dim=1)
