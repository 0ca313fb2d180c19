"""Training the nodule outline network (``nodule-outline``, a small 3D U-Net): real LIDC-IDRI
nodules with the readers' masks, placed into real lungs so that the network sees the vessels and
pleura a nodule touches on a whole scan, and learns to leave them out.

Patches are (K, J, I) at the card's spacing (1 mm), larger than the training crop so every batch
takes a random crop around the nodule (the heat map's peak, the seed at inference, is rarely its
centre); the network marks every nodule voxel of its input, and the caller keeps the component at
the seed (:func:`~LungGradCAMLib.engine.outline.nodule_outline`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..core.errors import DataError
from .data import PatchSet, _to_int16, patient_split
from .lidc import LidcVoi, lidc_voi_patches
from .placement import SPLITS, Background, background_patches, pick

log = logging.getLogger(__name__)

CLASSES = ["background", "nodule"]


def outline_patches(
    records: Sequence[LidcVoi],
    backgrounds: Sequence[Background],
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    split: str,
    own: int = 2,
    placed: int = 3,
    jitter_vox: int = 4,
    negatives_per_kind: int = 40,
    seed: int = 0,
    progress: bool = False,
) -> PatchSet:
    """The outline network's patches of one ``split`` (``records`` are that split's nodules,
    placed only into ``backgrounds`` regions of that split), with the readers' masks:

    * ``own`` placements per nodule of the VOI with its own surroundings (its real vessels and
      pleura) pasted into a random lung position (kind ``own``);
    * ``placed`` placements of the nodule alone, in turn in the parenchyma, touching a vessel and
      on the pleura (kinds ``parenchyma``, ``juxta_vascular``, ``juxta_pleural``);
    * ``negatives_per_kind`` patches of lung, vessels, pleura and chest wall per background region
      (empty masks), so that the network learns what is not a nodule.

    Nodules are centred up to ``jitter_vox`` voxels off the patch centre. Classes are background
    (0) and nodule (1); ``splits`` is ``split`` throughout."""
    size = tuple(int(s) for s in patch_size)
    regions = pick(backgrounds, split)
    sets: List[PatchSet] = []
    for task, n in (("malignancy", own), ("nodule", placed)):
        if n <= 0:
            continue
        part = lidc_voi_patches(
            records,
            size,
            spacing_mm,
            task=task,
            backgrounds=regions,
            placements=n,
            jitter_vox=jitter_vox,
            feather_mm=3.0,
            seed=seed * 7 + len(sets),
            progress=progress,
        )
        kinds = np.where(part.kinds == "nodule", "own", part.kinds) if task == "malignancy" else part.kinds
        sets.append(
            PatchSet(
                part.patches,
                np.ones(len(part), np.int64),
                part.patients,
                CLASSES,
                part.spacing_mm,
                kinds,
                part.centres,
                part.masks,
            )
        )
    if negatives_per_kind > 0:
        hu, kinds, names = background_patches(regions, size, negatives_per_kind, np.random.default_rng(seed))
        sets.append(
            PatchSet(
                _to_int16(hu),
                np.zeros(len(hu), np.int64),
                [f"background:{m}" for m in names],
                CLASSES,
                tuple(float(s) for s in spacing_mm),
                kinds,
                masks=np.zeros(hu.shape, bool),
            )
        )
    if not sets:
        raise DataError("no outline patches asked for: own, placed and negatives_per_kind are all 0")
    data = PatchSet.concatenate(sets)
    data.splits = np.full(len(data), split)
    return data


def split_records(
    records: Sequence[LidcVoi], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> Dict[str, List[LidcVoi]]:
    """``records`` split by patient into train / validation / test (:func:`patient_split`: the
    split of the bundled ``default`` model's nodules for the same ``fractions`` and ``seed``)."""
    parts = patient_split([r.patient for r in records], fractions, seed=seed)
    return {name: [records[i] for i in index] for name, index in zip(SPLITS, parts)}


def _crop(x: np.ndarray, starts: np.ndarray, crop: int) -> np.ndarray:
    return np.stack([a[k : k + crop, j : j + crop, i : i + crop] for a, (k, j, i) in zip(x, starts)])


def dice_scores(probability: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-sample Dice of ``probability >= 0.5`` against ``truth`` (N, ...); NaN where both are empty."""
    pred = probability >= 0.5
    axes = tuple(range(1, truth.ndim))
    overlap = (pred & truth).sum(axis=axes)
    total = pred.sum(axis=axes) + truth.sum(axis=axes)
    return np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), np.nan)


def fit_outline(
    train: PatchSet,
    val: PatchSet,
    card: "ModelCard",  # noqa: F821
    out_dir: "str | Path",
    *,
    epochs: int = 5,
    batch_size: int = 8,
    lr: float = 2e-3,
    crop: int = 32,
    seed: int = 0,
    zoom: Sequence[float] = (0.8, 1.25),
    report: Optional[Callable[[dict], None]] = None,
) -> Path:
    """Train ``card``'s segmenter on ``train`` (random ``crop``^3 crops, 3D augmentation incl.
    ``zoom``, soft Dice + binary cross-entropy), validate after each epoch on the centre crops of
    ``val`` (mean Dice of its nodule patches at 0.5), keep the best epoch as
    ``out_dir/best.safetensors`` (+ card) and log each epoch to ``out_dir/log.jsonl`` (and to
    ``report``). Adam with a cosine learning rate from ``lr``. Deterministic for a ``seed`` and a
    thread count. Returns the best weights' path."""
    import torch
    import torch.nn.functional as F

    from ..engine.models import build_model, save_model
    from ..engine.preprocess import apply_card_preprocessing
    from .augment import augment
    from .train import deterministic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if train.masks is None or val.masks is None:
        raise DataError("the outline network trains on patches with masks (outline_patches)")
    if min(train.patch_size) < crop:
        raise DataError(f"patches of {train.patch_size} voxels are smaller than the {crop}^3 crop")
    with deterministic(seed):
        # channels-last: oneDNN's fast layout for 3D convolutions on the CPU (a third faster here)
        module = build_model(card.architecture, **card.kwargs).to(memory_format=torch.channels_last_3d)
        optimiser = torch.optim.Adam(module.parameters(), lr=lr)
        steps = epochs * int(np.ceil(len(train) / batch_size))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps, eta_min=lr / 50)
        generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        vk = [(s - crop) // 2 for s in val.patch_size]
        val_x = val.patches[:, vk[0] : vk[0] + crop, vk[1] : vk[1] + crop, vk[2] : vk[2] + crop]
        val_y = val.masks[:, vk[0] : vk[0] + crop, vk[1] : vk[1] + crop, vk[2] : vk[2] + crop]
        nodules = val.labels == 1
        best, best_path = -1.0, out / "best.safetensors"
        log_path = out / "log.jsonl"
        log_path.write_text("")
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            module.train()
            order = rng.permutation(len(train))
            losses = []
            for b in range(0, len(order), batch_size):
                index = np.sort(order[b : b + batch_size])
                starts = rng.integers(0, np.asarray(train.patch_size) - crop + 1, size=(len(index), 3))
                x = torch.from_numpy(_crop(train.patches[index], starts, crop).astype(np.float32))[:, None]
                y = torch.from_numpy(_crop(train.masks[index], starts, crop).astype(np.float32))[:, None]
                # the masks' border extends as the image's does (a nodule cut by the crop stays cut)
                x, y = augment(
                    apply_card_preprocessing(x, card), generator, zoom=tuple(zoom), masks=y, mask_padding="border"
                )
                y = (y >= 0.5).float()
                logits = module(x.contiguous(memory_format=torch.channels_last_3d))
                p = torch.sigmoid(logits)
                overlap = (p * y).sum(dim=(1, 2, 3, 4))
                soft_dice = (2 * overlap + 1.0) / (p.sum(dim=(1, 2, 3, 4)) + y.sum(dim=(1, 2, 3, 4)) + 1.0)
                loss = F.binary_cross_entropy_with_logits(logits, y) + (1 - soft_dice).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(float(loss.detach()))
            module.eval()
            probability = []
            with torch.inference_mode():
                for b in range(0, len(val_x), 16):
                    x = torch.from_numpy(val_x[b : b + 16].astype(np.float32))[:, None]
                    probability.append(torch.sigmoid(module(apply_card_preprocessing(x, card)))[:, 0].numpy())
            probability = np.concatenate(probability)
            dice = dice_scores(probability, val_y)
            false_ml = (
                float((probability[~nodules] >= 0.5).sum(axis=(1, 2, 3)).mean())
                * float(np.prod(card.spacing_mm))
                / 1000.0
                if (~nodules).any()
                else 0.0
            )
            entry = {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "val_dice": float(np.nanmean(dice[nodules])),
                "val_negative_ml": false_ml,
                "seconds": time.perf_counter() - t0,
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if report is not None:
                report(entry)
            if entry["val_dice"] > best:
                best = entry["val_dice"]
                card.metrics = {"validation_patch_dice": {"value": best, "epoch": epoch}}
                save_model(module, card, best_path)
    return best_path
