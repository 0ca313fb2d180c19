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

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

#: HU above which a voxel counts as solid enough to belong to a nodule (part-solid and solid
#: nodules; pure ground glass mostly lies below it).
SOLID_HU = -500.0
#: How far (mm) the nodule's component may grow from the patch's centre.
GROW_MM = 20.0
#: Radius (mm) around the centre where the component's seed may lie.
SEED_MM = 3.0


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(mask, 3, stride=1, padding=1)


def _erode(mask: torch.Tensor) -> torch.Tensor:
    return -F.max_pool3d(-mask, 3, stride=1, padding=1)


def _ball(shape: Sequence[int], radius_vox: float, device: torch.device) -> torch.Tensor:
    """(K, J, I) bool: the voxels within ``radius_vox`` of the patch's centre."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) ** 2 for n in shape]
    dist2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    return dist2 <= radius_vox ** 2


def central_component(hu: torch.Tensor, voxel_mm: float) -> torch.Tensor:
    """(N, 1, K, J, I) float 0/1: the solid component at the patch's centre: voxels above
    :data:`SOLID_HU`, opened by one voxel (thin vessels and fissures fall away), grown from those
    within :data:`SEED_MM` of the centre for at most :data:`GROW_MM`."""
    solid = (hu > SOLID_HU).float()
    opened = _dilate(_erode(solid)) * solid
    seed = opened * _ball(hu.shape[2:], max(SEED_MM / voxel_mm, 1.0), hu.device).float()
    grown = seed
    for _ in range(int(math.ceil(GROW_MM / voxel_mm))):
        nxt = _dilate(grown) * opened
        if torch.equal(nxt, grown):
            break
        grown = nxt
    return grown


def solid_component(hu: torch.Tensor, voxel_mm: float) -> torch.Tensor:
    """The central solid component's log volume (log(1 + mm³)), mean HU (/1000; the centre
    voxel's where there is no component) and its share of the voxels above :data:`SOLID_HU` within
    :data:`GROW_MM` of the centre (how separate it is from vessels and pleura)."""
    comp = central_component(hu, voxel_mm)
    n = comp.sum(dim=(1, 2, 3, 4))
    volume = torch.log1p(n * voxel_mm ** 3)
    centre = hu[(slice(None), 0) + tuple(s // 2 for s in hu.shape[2:])]
    mean_hu = torch.where(n > 0, (hu * comp).sum(dim=(1, 2, 3, 4)) / n.clamp_min(1), centre) / 1000.0
    near = _ball(hu.shape[2:], GROW_MM / voxel_mm, hu.device)
    solid_near = ((hu[:, 0] > SOLID_HU) & near).sum(dim=(1, 2, 3)).float()
    share = n / solid_near.clamp_min(1)
    return torch.stack([volume, mean_hu, share], dim=1)


def density_profile(hu: torch.Tensor, voxel_mm: float) -> torch.Tensor:
    """The share of voxels above :data:`SOLID_HU` within 3, 6, 10 and 15 mm of the centre."""
    solid = hu[:, 0] > SOLID_HU
    out = [(solid & _ball(hu.shape[2:], r / voxel_mm, hu.device)).sum(dim=(1, 2, 3)).float()
           / _ball(hu.shape[2:], r / voxel_mm, hu.device).sum().clamp_min(1) for r in (3.0, 6.0, 10.0, 15.0)]
    return torch.stack(out, dim=1)


#: name -> (function, the names of its values)
FEATURES: Dict[str, Tuple[Callable[[torch.Tensor, float], torch.Tensor], List[str]]] = {
    "solid_component": (solid_component, ["log_volume_mm3", "mean_hu_per_1000", "share_of_solid_within_20mm"]),
    "density_profile": (density_profile, ["solid_within_3mm", "solid_within_6mm", "solid_within_10mm",
                                          "solid_within_15mm"]),
}


def feature_names(names: Sequence[str]) -> List[str]:
    """The value names of the features ``names``, in order."""
    return [f"{name}.{value}" for name in names for value in FEATURES[name][1]]


def image_features(hu: torch.Tensor, voxel_mm: float, names: Sequence[str]) -> torch.Tensor:
    """(N, n) the features ``names`` (keys of :data:`FEATURES`) of HU patches (N, 1, K, J, I)."""
    return torch.cat([FEATURES[name][0](hu, voxel_mm) for name in names], dim=1)
