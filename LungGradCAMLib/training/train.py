"""Training: ``lunggradcam train`` and :func:`fit`.

Adam; class weights w_i = n_samples / (n_classes * n_i); 3D augmentation on the device (random
rotation, flips, zoom and shear in one resampling, then intensity scale/shift/noise); early
stopping and ReduceLROnPlateau on the validation loss; automatic mixed precision on CUDA; best
and last checkpoints (safetensors + model card) and ``resume.pt`` to resume; a per-epoch
JSON-lines log; a tqdm bar; deterministic seeds. Under ``torchrun`` it trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPUs) and a DistributedSampler; rank 0 writes.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.atomic import atomic_path, write_text
from .data import (PatchSet, lidc_patches, lidc_voi_detection_patches, lidc_voi_patches, lidc_voi_records,
                   luna16_samples, manifest_samples, patches_from_samples, patient_kfold, patient_split,
                   phantom_patches)
from ..core.errors import DataError, InvalidInputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings. ``patience``: epochs without a validation-loss improvement before
    stopping; ``lr_patience``/``lr_factor``: ReduceLROnPlateau; ``augment``: 3D augmentation of
    training batches; ``amp``: mixed precision (CUDA only)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 8
    lr_patience: int = 3
    lr_factor: float = 0.5
    augment: bool = True
    class_weights: bool = True
    amp: bool = True
    seed: int = 0
    workers: int = 0


@dataclass
class FitResult:
    """Where :func:`fit` wrote the best model, and the per-epoch history."""

    best_path: Path
    last_path: Path
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# augmentation (batched, on the device)
# --------------------------------------------------------------------------------------------
def augment(x: "torch.Tensor", generator: "torch.Generator", rotate_deg: float = 15.0,
            zoom: Tuple[float, float] = (0.9, 1.1), shear: float = 0.1, flip: bool = True,
            rot90: bool = True, scale: float = 0.1, shift: float = 0.05, noise: float = 0.02) -> "torch.Tensor":
    """Randomly transform a normalised batch ``x`` (N, C, K, J, I): rotation up to ``rotate_deg``
    about each axis, a flip of each axis with probability 1/2, with ``rot90`` an in-plane swap of
    the J and I axes with probability 1/2 (with the flips: every in-plane 90-degree rotation),
    isotropic zoom in ``zoom``, shear up to ``shear``, all as one trilinear resampling (border
    values extend); then intensity
    ``x * (1 + U(-scale, scale)) + U(-shift, shift) + N(0, noise)``. Random numbers come from the
    CPU ``generator``, so runs are reproducible on any device."""
    import torch
    import torch.nn.functional as F

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
    return out * gain + offset + jitter


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------
def _dist() -> Tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _all_sum(values: Sequence[float], device: Any) -> List[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """w_i = n_samples / (n_classes * n_i); classes absent from ``labels`` get weight 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------
def fit(train_set: PatchSet, val_set: PatchSet, card: Any, out_dir: Any, config: Optional[TrainConfig] = None,
        resume: bool = False, progress: bool = True, device: Optional[str] = None) -> FitResult:
    """Train ``card``'s architecture on ``train_set`` and keep the weights with the lowest
    validation loss on ``val_set``.

    Writes into ``out_dir`` (rank 0 only): ``best.safetensors``/``best.json`` (model + card,
    ``card.training`` filled in), ``last.safetensors``/``last.json``, ``resume.pt`` (weights,
    optimiser, scheduler, counters; read back with ``weights_only=True``) and ``log.jsonl`` (one
    JSON object per epoch: epoch, train_loss, val_loss, val_auc, val_accuracy, lr, seconds).
    ``resume=True`` continues from ``resume.pt``. Works unchanged under ``torchrun``.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from ..evaluation.evaluate import roc_auc
    from ..engine.models import build_model, save_model
    from ..engine.preprocess import apply_card_preprocessing

    cfg = config or TrainConfig()
    out = Path(out_dir)
    rank, world, local_rank = _dist()
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if train_set.class_names != card.class_names or val_set.class_names != card.class_names:
        raise DataError(f"data classes {train_set.class_names} differ from the card's {card.class_names}")
    if card.patch_size is not None and list(train_set.patch_size) != list(card.patch_size):
        raise DataError(f"patches are {train_set.patch_size} voxels but the card says {card.patch_size}")
    if len(train_set) == 0 or len(val_set) == 0:
        raise DataError("training and validation sets must not be empty")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    module = build_model(card.architecture, **card.kwargs).to(dev)
    net = module
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)
    n_classes = len(card.class_names)
    weights = torch.tensor(class_weights(train_set.labels, n_classes) if cfg.class_weights else np.ones(n_classes),
                           dtype=torch.float32, device=dev)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = logits.float()
        if card.activation == "softmax":
            return F.cross_entropy(logits, y, weight=weights, reduction=reduction)
        # one-vs-rest binary cross-entropy, each sample weighted by its class weight
        per = F.binary_cross_entropy_with_logits(logits, F.one_hot(y, n_classes).float(), reduction="none").mean(1)
        per = per * weights[y]
        return per.sum() if reduction == "sum" else per.sum() / weights[y].sum()

    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    amp = cfg.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    use_scaler = amp and amp_dtype == torch.float16
    # torch.amp.GradScaler("cuda") replaced torch.cuda.amp.GradScaler in torch 2.3
    scaler = (torch.amp.GradScaler("cuda", enabled=use_scaler) if hasattr(torch.amp, "GradScaler")
              else torch.cuda.amp.GradScaler(enabled=use_scaler))

    start_epoch, best_loss, bad_epochs, best_epoch, history = 1, math.inf, 0, 0, []
    resume_path = out / "resume.pt"
    fingerprint = json.dumps({"architecture": card.architecture, "kwargs": card.kwargs,
                              "classes": card.class_names, "n_train": len(train_set)}, sort_keys=True)
    if resume and resume_path.is_file():
        state = torch.load(resume_path, map_location=dev, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise InvalidInputError(f"{resume_path}: was written for another model or data set; "
                                    "use a new --out folder or drop --resume")
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best_loss = int(state["epoch"]) + 1, float(state["best_loss"])
        bad_epochs, best_epoch = int(state["bad_epochs"]), int(state["best_epoch"])
        history = json.loads(state["history"])
        log.info("resuming after epoch %d", start_epoch - 1)

    train_ds = TensorDataset(torch.from_numpy(train_set.patches), torch.from_numpy(train_set.labels))
    # validation: each rank takes every world-th sample; losses and scores are gathered
    val_index = np.arange(rank, len(val_set), world)
    val_ds = TensorDataset(torch.from_numpy(val_set.patches[val_index]), torch.from_numpy(val_set.labels[val_index]),
                           torch.from_numpy(val_index))

    def prepare(xb: torch.Tensor) -> torch.Tensor:
        return apply_card_preprocessing(xb.to(dev, non_blocking=True).float().unsqueeze(1), card)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        if bad_epochs >= cfg.patience:
            break
        t0 = time.perf_counter()
        # every epoch's randomness (order, augmentation, dropout) derives from (seed, epoch, rank),
        # so a resumed run continues exactly as an uninterrupted one would have
        torch.manual_seed(cfg.seed * 1000003 + epoch * 101 + rank)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 1009 + rank)
        if world > 1:
            sampler: Any = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=False)
        net.train()
        total, count = 0.0, 0
        batches = loader
        if progress and rank == 0:
            from tqdm import tqdm

            batches = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
        for xb, yb in batches:
            x = prepare(xb)
            if cfg.augment:
                x = augment(x, gen)
            y = yb.to(dev)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        train_loss_sum, train_n = _all_sum([total, count], dev)

        module.eval()
        val_sum, scores, seen = 0.0, [], []
        with torch.inference_mode():
            for xb, yb, ib in DataLoader(val_ds, batch_size=cfg.batch_size):
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                    logits = module(prepare(xb)).float()
                val_sum += float(loss_fn(logits, yb.to(dev), reduction="sum"))
                probs = torch.softmax(logits, 1) if card.activation == "softmax" else torch.sigmoid(logits)
                scores.append(probs[:, card.cam_class_index].cpu().numpy())
                seen.append(ib.numpy())
        # weighted-mean validation loss over all ranks (the normaliser is the summed sample weights)
        val_w = float(weights[torch.from_numpy(val_set.labels[val_index]).to(dev)].sum())
        val_loss_sum, val_norm = _all_sum([val_sum, val_w], dev)
        val_loss = val_loss_sum / max(val_norm, 1e-12)
        score = np.zeros(len(val_set))
        idx = np.concatenate(seen) if seen else np.zeros(0, np.int64)
        score[idx] = np.concatenate(scores) if scores else 0.0
        score = np.array(_all_sum(score.tolist(), dev)) if world > 1 else score
        truth = (val_set.labels == card.cam_class_index).astype(np.int64)
        sched.step(val_loss)
        improved = val_loss < best_loss - 1e-6
        if improved:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
        else:
            bad_epochs += 1
        record = {"epoch": epoch, "train_loss": train_loss_sum / max(train_n, 1), "val_loss": val_loss,
                  "val_auc": roc_auc(truth, score), "val_accuracy": float(np.mean((score >= 0.5) == truth)),
                  "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, "best": improved}
        history.append(record)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            info = _training_info(card, train_set, val_set, cfg, history, best_epoch, world, dev)
            if improved:
                best_card = copy.deepcopy(card)
                best_card.training = {**card.training, **info}
                save_model(module, best_card, out / "best.safetensors")
            last_card = copy.deepcopy(card)
            last_card.training = {**card.training, **info, "epoch": epoch}
            save_model(module, last_card, out / "last.safetensors")
            with atomic_path(resume_path) as tmp:
                torch.save({"model": module.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch, "best_loss": best_loss,
                            "bad_epochs": bad_epochs, "best_epoch": best_epoch,
                            "history": json.dumps(history), "fingerprint": fingerprint}, tmp)
            write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            if progress:
                print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()}),
                      file=sys.stderr, flush=True)
        _barrier()
    return FitResult(out / "best.safetensors", out / "last.safetensors", history, best_epoch,
                     time.perf_counter() - t_start)


def _training_info(card: Any, train_set: PatchSet, val_set: PatchSet, cfg: TrainConfig,
                   history: List[Dict[str, Any]], best_epoch: int, world: int, dev: Any) -> Dict[str, Any]:
    import torch

    best = next((h for h in history if h["epoch"] == best_epoch), {})
    return {
        "train": {"patches": len(train_set), "patients": int(len(set(train_set.patients))), "classes": train_set.counts()},
        "validation": {"patches": len(val_set), "patients": int(len(set(val_set.patients))), "classes": val_set.counts()},
        "config": asdict(cfg), "epochs_run": len(history), "best_epoch": best_epoch,
        "best_val_loss": best.get("val_loss"), "best_val_auc": best.get("val_auc"),
        "world_size": world, "device": str(dev.type), "torch": torch.__version__,
        "seconds": round(sum(h["seconds"] for h in history), 1),
    }


# --------------------------------------------------------------------------------------------
# data from command-line arguments
# --------------------------------------------------------------------------------------------
SOURCES = ("phantom", "luna16", "lidc", "lidc-vois", "manifest", "patches")


def json_object_argument(text: str, option: str) -> Dict[str, Any]:
    """A command-line option's JSON object (e.g. architecture arguments), or a clear error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{option} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{option} must be a JSON object")
    return value


def parse_seeds(text: str) -> List[int]:
    """'0-31' or '1,2,5-7' -> list of ints."""
    seeds: List[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                seeds.extend(range(int(a), int(b) + 1))
            elif part.strip():
                seeds.append(int(part))
    except ValueError:
        raise InvalidInputError(f"--phantom-seeds: expected e.g. '0-31' or '1,2,5-7'; got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise InvalidInputError(f"--phantom-seeds: expected non-negative seeds; got {text!r}")
    return seeds


def add_data_arguments(p: argparse.ArgumentParser, default_seeds: str = "1000-1015") -> None:
    """The data-source options shared by ``train`` and ``evaluate``."""
    g = p.add_argument_group("data")
    g.add_argument("--source", choices=SOURCES, default="phantom",
                   help="phantom: synthetic chest CTs; luna16: a LUNA16 folder (subset*/*.mhd + "
                        "annotations.csv/candidates.csv); lidc: a LIDC-IDRI folder (patient folders with "
                        "DICOM + reader XML; benign vs malignant); lidc-vois: a LIDC VOI folder (nodules.csv, "
                        "image/, nodule_mask/: real nodules with reader masks); manifest: a CSV "
                        "(image,label[,patient,x,y,z,space]); patches: a .npz patch cache (default: phantom)")
    g.add_argument("--path", help="the LUNA16/LIDC/VOI folder, manifest CSV or patch cache (not for phantom)")
    g.add_argument("--backgrounds", help="lidc-vois: a CSV (image,split) of real CTs whose lungs hold the "
                                         "placed nodules and give the background patches; split is train, "
                                         "validation, test or bands (see README)")
    g.add_argument("--placements", type=int, default=None,
                   help="lidc-vois: patches per nodule, each in another background place (default 4 for "
                        "malignancy, 3 for nodule)")
    g.add_argument("--negatives-per-region", type=int, default=100,
                   help="lidc-vois --task nodule: background patches per kind per background region (default 100)")
    g.add_argument("--with-phantoms", metavar="SEEDS", default="",
                   help="lidc-vois --task nodule: also phantom patches of these seeds (e.g. '0-79'), split by seed")
    g.add_argument("--phantom-seeds", default=default_seeds,
                   help=f"phantom seeds, e.g. '0-63' or '1,2,5-7'; one patient each (default {default_seeds})")
    g.add_argument("--task", choices=("nodule", "malignancy"), default="nodule",
                   help="phantom and lidc-vois labels: nodule vs background, or benign vs malignant nodules "
                        "(default nodule)")
    g.add_argument("--positives-per-nodule", type=int, default=6,
                   help="phantom patches per nodule (default 6; also for --with-phantoms)")
    g.add_argument("--negatives-per-kind", type=int, default=4,
                   help="phantom background patches per kind per scan (default 4; also for --with-phantoms)")
    g.add_argument("--max-negatives-per-scan", type=int, default=20,
                   help="LUNA16 candidates of class 0 kept per scan (default 20)")
    g.add_argument("--classes", default="background,nodule",
                   help="class names for manifest/LUNA16 data, index order (default background,nodule)")
    g.add_argument("--cache", help="save/load the patches here (.npz) so a second run skips building them")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling, splits and training (default 0)")


def load_data(args: argparse.Namespace, card: Any) -> PatchSet:
    """The PatchSet the data arguments describe, cut at ``card``'s patch size and spacing."""
    if card.patch_size is None:
        raise DataError("this model is whole-volume (patch_size null); training and evaluation here "
                        "use patches: give the card a patch_size")
    size, spacing = list(card.patch_size), list(card.spacing_mm)
    cache = Path(args.cache) if getattr(args, "cache", None) else None
    if args.source == "patches" or (cache is not None and cache.is_file()):
        path = Path(args.path if args.source == "patches" else cache)  # type: ignore[arg-type]
        if not path.is_file():
            raise DataError(f"{path}: patch cache not found")
        data = PatchSet.load(path)
        if list(data.patch_size) != size or not np.allclose(data.spacing_mm, spacing):
            raise DataError(f"{path}: patches are {list(data.patch_size)} voxels at {list(data.spacing_mm)} mm "
                            f"but the model needs {size} at {spacing} mm; delete the cache to rebuild")
        return data
    rank, world, _ = _dist()
    if cache is not None and rank != 0:
        _barrier()  # rank 0 builds the cache; the others read it
        return PatchSet.load(cache)
    progress = rank == 0
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.source == "phantom":
        data = phantom_patches(parse_seeds(args.phantom_seeds), size, spacing, task=args.task,
                               positives_per_nodule=args.positives_per_nodule,
                               negatives_per_kind=args.negatives_per_kind, progress=progress)
    else:
        if not args.path:
            raise InvalidInputError(f"--source {args.source} needs --path")
        if args.source == "lidc":
            data = lidc_patches(args.path, size, spacing, progress=progress)
        elif args.source == "lidc-vois":
            data = _voi_data(args, size, spacing, progress)
        else:
            samples = (luna16_samples(args.path, args.max_negatives_per_scan, seed=args.seed)
                       if args.source == "luna16" else manifest_samples(args.path, classes))
            data = patches_from_samples(samples, classes, size, spacing, progress=progress)
    if cache is not None:
        data.save(cache)
        if world > 1:
            _barrier()
    return data


def _voi_data(args: argparse.Namespace, size: List[int], spacing: List[float], progress: bool) -> PatchSet:
    """The lidc-vois PatchSet: malignancy patches (split later by patient or fold), or nodule-vs-
    background patches with splits fixed by their background regions."""
    from .placement import SPLITS, load_backgrounds

    records = lidc_voi_records(args.path)
    if args.task == "malignancy":
        backgrounds = load_backgrounds(args.backgrounds, spacing, size) if args.backgrounds else None
        return lidc_voi_patches(records, size, spacing, task="malignancy", backgrounds=backgrounds,
                                placements=args.placements or 4, jitter_vox=2, seed=args.seed, progress=progress)
    if not args.backgrounds:
        raise InvalidInputError("--source lidc-vois --task nodule needs --backgrounds (real CTs whose lungs "
                                "hold the placed nodules and give the negatives)")
    # evaluate has no split options: it rebuilds a training run's split from the default fractions and --seed
    val, test = (args.val_fraction, args.test_fraction) if args.command == "train" else (0.15, 0.15)
    fractions = (1 - val - test, val, test)
    return lidc_voi_detection_patches(
        records, load_backgrounds(args.backgrounds, spacing, size, SPLITS), size, spacing, fractions=fractions,
        placements=args.placements or 3, negatives_per_kind=args.negatives_per_region,
        phantom_seeds=parse_seeds(args.with_phantoms) if args.with_phantoms else (),
        phantom_positives_per_nodule=args.positives_per_nodule, phantom_negatives_per_kind=args.negatives_per_kind,
        seed=args.seed, progress=progress)


def _describe_data(args: argparse.Namespace) -> str:
    if args.source == "lidc-vois":
        text = (f"real LIDC-IDRI nodules (VOIs with the readers' masks) from {args.path}, task {args.task}, "
                f"{args.placements or (4 if args.task == 'malignancy' else 3)} placement(s) per nodule")
        if args.backgrounds:
            text += f" into the lungs of the real CTs listed in {args.backgrounds}"
        if args.with_phantoms:
            text += f", plus synthetic chest CT phantoms (seeds {args.with_phantoms})"
        return text
    if args.source == "phantom":
        return (f"synthetic chest CT phantoms (LungGradCAMLib.phantom.chest_ct), seeds {args.phantom_seeds}, "
                f"one patient each; task {args.task}; {args.positives_per_nodule} jittered patches per nodule, "
                f"{args.negatives_per_kind} background patches per kind per scan")
    return f"{args.source} data from {args.path}"


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def add_cli(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``lunggradcam train``."""
    p = subparsers.add_parser(
        "train", help="train a 3D CNN (single process, or multi-GPU/multi-node under torchrun)",
        description="Train a 3D CNN classifier on labelled CT patches and write best/last checkpoints "
                    "(.safetensors + model card .json), log.jsonl, and a held-out evaluation "
                    "(report.json, roc.png, loss.png). Patients never cross splits. Run under "
                    "`torchrun --nproc_per_node N -m LungGradCAMLib.cli train ...` for DDP.")
    add_data_arguments(p, default_seeds="0-63")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="gradcam3d_cnn", help="gradcam3d_cnn, small3d_cnn or resnet18_3d")
    m.add_argument("--arch-kwargs", default="{}", help='architecture arguments as JSON, e.g. \'{"width": 8}\'')
    m.add_argument("--patch-size", type=int, nargs=3, default=[32, 32, 32], metavar=("K", "J", "I"),
                   help="patch size in voxels (default 32 32 32)")
    m.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5], metavar=("I", "J", "K"),
                   help="voxel spacing in mm (default 1.5 1.5 1.5)")
    m.add_argument("--hu-window", type=float, nargs=2, default=[-1000.0, 400.0], metavar=("LOW", "HIGH"),
                   help="HU window (default -1000 400)")
    m.add_argument("--normalisation", choices=("minmax", "zscore"), default="minmax")
    m.add_argument("--activation", choices=("softmax", "sigmoid"), default="softmax",
                   help="softmax + cross-entropy, or sigmoid + binary cross-entropy")
    m.add_argument("--cam-class", help="class the CAM explains by default (default: the last class)")
    m.add_argument("--target-layer", help="Grad-CAM layer (default: the architecture's)")
    m.add_argument("--name", default="model", help="model name written in the card")
    m.add_argument("--version", default="1.0.0", help="model version written in the card")
    o = p.add_argument_group("training")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--epochs", type=int, default=30)
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs (default 8)")
    o.add_argument("--no-augment", action="store_true", help="switch off 3D augmentation")
    o.add_argument("--no-amp", action="store_true", help="switch off mixed precision on CUDA")
    o.add_argument("--folds", type=int, default=0,
                   help="k-fold patient-wise cross-validation instead of one split (k models, CIs across folds)")
    o.add_argument("--val-fraction", type=float, default=0.15, help="patients for validation (default 0.15)")
    o.add_argument("--test-fraction", type=float, default=0.15, help="patients held out for testing (default 0.15)")
    o.add_argument("--resume", action="store_true", help="continue from --out/resume.pt")
    o.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    o.add_argument("--device", help="cpu, cuda, ... (default: cuda:LOCAL_RANK if available)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=_run_cli)


def _card_from_args(args: argparse.Namespace, classes: List[str]) -> Any:
    from ..core.errors import ModelError
    from ..engine.models import ARCHITECTURES, ModelCard, build_model

    kwargs = json_object_argument(args.arch_kwargs, "--arch-kwargs")
    kwargs.setdefault("num_classes", len(classes))
    build_model(args.arch, **kwargs)  # unknown architecture/arguments fail here, before any data work
    card = ModelCard(
        architecture=args.arch, kwargs=kwargs, class_names=classes, cam_class=args.cam_class or classes[-1],
        target_layer=args.target_layer or ARCHITECTURES[args.arch].cam_layer, patch_size=list(args.patch_size),
        spacing_mm=list(args.spacing), hu_window=list(args.hu_window), normalisation=args.normalisation,
        activation=args.activation, name=args.name, version=args.version,
    )
    try:
        return card.validate("--arch/--cam-class/...")
    except ModelError as exc:
        raise InvalidInputError(str(exc)) from None


def _run_cli(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation.evaluate import cross_validation_report, evaluate_model, write_report
    from ..engine.models import load_model, save_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.source == "phantom":
        classes = ["benign", "malignant"] if args.task == "malignancy" else ["background", "nodule"]
    elif args.source == "lidc" or (args.source == "lidc-vois" and args.task == "malignancy"):
        classes = ["benign", "malignant"]
    elif args.source == "lidc-vois":
        classes = ["background", "nodule"]
    else:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    card = _card_from_args(args, classes)
    card.training = {"data": _describe_data(args),
                     "command": "lunggradcam " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    card.description = f"{card.architecture} {card.kwargs} {' vs '.join(classes)} patch classifier"
    if classes == ["benign", "malignant"]:  # judges one nodule: explained on a region, never a whole scan
        card.input = "roi"
    if args.source == "phantom":
        card.intended_use = ("Trained on synthetic chest CT phantoms only: for demonstration and testing, "
                             "not for clinical use. Train on real data with `lunggradcam train` for research.")
    elif card.input == "roi":
        card.intended_use = ("Research only, not for clinical use. Takes a region around ONE lung nodule (an "
                             "ROI centred on it), not a whole scan, and scores how malignant-looking it is.")
    data = load_data(args, card)
    rank, _, _ = _dist()
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                      augment=not args.no_augment, amp=not args.no_amp, seed=args.seed)
    out = Path(args.out)
    if data.splits is not None:
        if args.folds:
            raise InvalidInputError("this data fixes its train/validation/test split (background regions); "
                                    "--folds cannot re-split it")
        splits = [("", data.split_index("train"), data.split_index("validation"), data.split_index("test"))]
    elif args.folds:
        splits = []
        for k, (rest, test) in enumerate(patient_kfold(data.patients, args.folds, seed=args.seed)):
            tr, va = patient_split(data.patients[rest], (1 - args.val_fraction, args.val_fraction), seed=args.seed + k)
            splits.append((f"fold{k + 1}", rest[tr], rest[va], test))
    else:
        tr, va, te = patient_split(data.patients, (1 - args.val_fraction - args.test_fraction,
                                                   args.val_fraction, args.test_fraction), seed=args.seed)
        splits = [("", tr, va, te)]
    reports = []
    for name, tr, va, te in splits:
        folder = out / name if name else out
        fold_card = copy.deepcopy(card)
        fold_card.training["split"] = {"train_patients": sorted(set(data.patients[tr])),
                                       "validation_patients": sorted(set(data.patients[va])),
                                       "test_patients": sorted(set(data.patients[te]))}
        result = fit(data.subset(tr), data.subset(va), fold_card, folder, cfg, resume=args.resume,
                     progress=not args.no_progress, device=args.device)
        if rank == 0:
            loaded = load_model(result.best_path, device="cpu")
            test = data.subset(te)
            report = evaluate_model(loaded, test, seed=args.seed)
            report["data"] = {"patches": len(test), "patients": int(len(set(test.patients))), "classes": test.counts()}
            best = loaded.card
            best.metrics = {"held_out_test": {"data": report["data"], "ci_method": report["ci_method"]},
                            **{k: v for k, v in report["metrics"].items()}}
            save_model(loaded.module, best, result.best_path)
            write_report(report, folder, result.history, title=best.name)
            reports.append(report)
            print(json.dumps({"fold": name or "holdout", "best_epoch": result.best_epoch,
                              **{k: round(v["value"], 4) for k, v in report["metrics"].items()}}))
    if rank == 0 and args.folds:
        write_text(out / "cv_report.json", json.dumps(cross_validation_report(reports), indent=2) + "\n")
    _barrier()
    return 0
