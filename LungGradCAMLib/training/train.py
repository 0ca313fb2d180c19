"""Training: :func:`fit` and :func:`train_and_evaluate` (what ``lunggradcam train`` runs).

Adam; class weights w_i = n_samples / (n_classes * n_i); 3D augmentation on the device
(:mod:`.augment`); early stopping and ReduceLROnPlateau on the validation loss; automatic mixed
precision on CUDA; best and last checkpoints (safetensors + model card) and ``resume.pt`` to
resume; a per-epoch JSON-lines log; a tqdm bar; deterministic seeds (the global random state is
restored afterwards). Under ``torchrun`` it trains with DistributedDataParallel (NCCL on GPUs,
gloo on CPUs) and a DistributedSampler; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.atomic import atomic_path, strict_json, write_json, write_text
from ..core.errors import DataError, InvalidInputError
from ..engine.cam import probabilities
from ..engine.device import resolve_device
from ..engine.distributed import all_sum, barrier, init_torchrun
from ..engine.models import ModelCard, build_model, load_model, save_model
from ..engine.preprocess import apply_card_preprocessing
from ..evaluation.evaluate import (
    CARD_CUT,
    REPORT_FILES,
    cross_validation_report,
    diameter_threshold,
    evaluate_model,
    has_diameters,
    roc_auc,
    scores_report,
    write_report,
)
from .augment import augment, enhance_vessels
from .data import PatchSet, patient_kfold, patient_split

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings. ``patience``: epochs without a validation-loss improvement before
    stopping; ``lr_patience``/``lr_factor``: ReduceLROnPlateau; ``augment``: 3D augmentation of
    training batches; ``contrast_hu``: with ``augment``, half the training patches get their
    tissue outside the lesion enhanced by up to this many HU (:func:`.augment.enhance_vessels`;
    0 = off); ``amp``: mixed precision (CUDA only); ``init``: a model (name or path) whose
    weights start the training instead of random ones (fine-tuning, e.g. a round of hard-negative
    mining that continues from the model that mined them; its tensors must match the card's
    architecture)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 8
    lr_patience: int = 3
    lr_factor: float = 0.5
    augment: bool = True
    contrast_hu: float = 0.0
    class_weights: bool = True
    amp: bool = True
    seed: int = 0
    workers: int = 0
    init: Optional[str] = None
    #: weight of the model's ``auxiliary_loss`` against the lesion outlines (``PatchSet.masks``),
    #: for models that have one (e.g. an attention head); 0: not used
    mask_loss: float = 0.0


@dataclass
class FitResult:
    """Where :func:`fit` wrote the best model, and the per-epoch history."""

    best_path: Path
    last_path: Path
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """w_i = n_samples / (n_classes * n_i); classes absent from ``labels`` get weight 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch's and numpy's global generators and make cuDNN deterministic for the block;
    afterwards every one of them is as it was (the caller's random streams go on unchanged)."""
    cpu, cuda = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    numpy_state = np.random.get_state()
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_state)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags


def _loss_function(card: ModelCard, weights: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The class-weighted loss of ``card``'s activation: cross-entropy (softmax), or one-vs-rest
    binary cross-entropy with each sample weighted by its class weight (sigmoid)."""
    n_classes = len(card.class_names)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = logits.float()
        if card.activation == "softmax":
            return F.cross_entropy(logits, y, weight=weights, reduction=reduction)
        per = F.binary_cross_entropy_with_logits(logits, F.one_hot(y, n_classes).float(), reduction="none").mean(1)
        per = per * weights[y]
        return per.sum() if reduction == "sum" else per.sum() / weights[y].sum()

    return loss_fn


def _check_sets(train_set: PatchSet, val_set: PatchSet, card: ModelCard) -> None:
    if train_set.class_names != card.class_names or val_set.class_names != card.class_names:
        raise DataError(f"data classes {train_set.class_names} differ from the card's {card.class_names}")
    if card.patch_size is not None and list(train_set.patch_size) != list(card.patch_size):
        raise DataError(f"patches are {train_set.patch_size} voxels but the card says {card.patch_size}")
    if len(train_set) == 0 or len(val_set) == 0:
        raise DataError("training and validation sets must not be empty")


#: The files :func:`fit` writes into its folder.
FIT_FILES = ("best.safetensors", "best.json", "last.safetensors", "last.json", "resume.pt", "log.jsonl")


def fit(
    train_set: PatchSet,
    val_set: PatchSet,
    card: ModelCard,
    out_dir: Any,
    config: Optional[TrainConfig] = None,
    resume: bool = False,
    progress: bool = True,
    device: Optional[str] = None,
) -> FitResult:
    """Train ``card``'s architecture on ``train_set`` and keep the weights with the lowest
    validation loss on ``val_set``.

    Writes into ``out_dir`` (rank 0 only): ``best.safetensors``/``best.json`` (model + card,
    ``card.training`` filled in), ``last.safetensors``/``last.json``, ``resume.pt`` (weights,
    optimiser, scheduler, counters; read back with ``weights_only=True``) and ``log.jsonl`` (one
    JSON object per epoch: epoch, train_loss, val_loss, val_auc, val_accuracy, lr, seconds).
    ``resume=True`` continues from ``resume.pt``. Works unchanged under ``torchrun``. The global
    random generators and cuDNN flags it sets are restored when it returns (:func:`deterministic`).
    """
    cfg = config or TrainConfig()
    _check_sets(train_set, val_set, card)
    with deterministic(cfg.seed):
        return _fit(train_set, val_set, card, Path(out_dir), cfg, resume, progress, device)


def _fit(
    train_set: PatchSet,
    val_set: PatchSet,
    card: ModelCard,
    out: Path,
    cfg: TrainConfig,
    resume: bool,
    progress: bool,
    device: Optional[str],
) -> FitResult:
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    rank, world, _ = init_torchrun()
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    module = build_model(card.architecture, **card.kwargs).to(dev)
    if cfg.init:
        _initialise(module, cfg.init)
    net = module
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)
    n_classes = len(card.class_names)
    weights = torch.tensor(
        class_weights(train_set.labels, n_classes) if cfg.class_weights else np.ones(n_classes),
        dtype=torch.float32,
        device=dev,
    )
    loss_fn = _loss_function(card, weights)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    amp = cfg.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    use_scaler = amp and amp_dtype == torch.float16
    # torch.amp.GradScaler("cuda") replaced torch.cuda.amp.GradScaler in torch 2.3
    scaler = (
        torch.amp.GradScaler("cuda", enabled=use_scaler)
        if hasattr(torch.amp, "GradScaler")
        else torch.cuda.amp.GradScaler(enabled=use_scaler)
    )

    start_epoch, best_loss, bad_epochs, best_epoch, history = 1, math.inf, 0, 0, []
    resume_path = out / "resume.pt"
    fingerprint = json.dumps(
        {
            "architecture": card.architecture,
            "kwargs": card.kwargs,
            "classes": card.class_names,
            "n_train": len(train_set),
        },
        sort_keys=True,
    )
    if resume and resume_path.is_file():
        state = torch.load(resume_path, map_location=dev, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise InvalidInputError(
                f"{resume_path}: was written for another model or data set; use a new --out folder or drop --resume"
            )
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best_loss = int(state["epoch"]) + 1, float(state["best_loss"])
        bad_epochs, best_epoch = int(state["bad_epochs"]), int(state["best_epoch"])
        history = json.loads(state["history"])
        log.info("resuming after epoch %d", start_epoch - 1)

    use_masks = cfg.mask_loss > 0
    if use_masks and (train_set.masks is None or not hasattr(module, "auxiliary_loss")):
        raise InvalidInputError(
            "the outline loss (mask_loss) needs patches with lesion outlines and a model "
            "with an auxiliary loss (e.g. gradcam3d_cnn with head 'attention')"
        )
    contrast = cfg.augment and cfg.contrast_hu > 0
    # the lesions' voxels, bit-packed: the outline loss's target, and what the contrast enhancement leaves as it is
    packed = train_set.masks is not None and (use_masks or contrast)
    train_ds = TensorDataset(
        torch.from_numpy(train_set.patches),
        torch.from_numpy(train_set.labels),
        *([torch.from_numpy(np.packbits(train_set.masks, axis=-1))] if packed else []),
    )
    # validation: each rank takes every world-th sample; losses and scores are gathered
    val_index = np.arange(rank, len(val_set), world)
    val_ds = TensorDataset(
        torch.from_numpy(val_set.patches[val_index]),
        torch.from_numpy(val_set.labels[val_index]),
        torch.from_numpy(val_index),
    )

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
            sampler = torch.utils.data.RandomSampler(
                train_ds, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            )
        loader = DataLoader(
            train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=False
        )
        net.train()
        total, count = 0.0, 0
        batches = loader
        if progress and rank == 0:
            from tqdm import tqdm

            batches = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
        for xb, yb, *mb in batches:
            lesion = (
                torch.from_numpy(np.unpackbits(mb[0].numpy(), axis=-1, count=train_set.patch_size[-1])).bool()
                if packed
                else (yb == card.cam_class_index).view(-1, 1, 1, 1)
            )  # no outlines: a positive's whole patch
            if contrast:
                xb = enhance_vessels(xb.float(), lesion, gen, cfg.contrast_hu)
            x = prepare(xb)
            masks = lesion.to(dev, torch.float32).unsqueeze(1) if use_masks else None
            if cfg.augment:
                x = augment(x, gen, masks=masks)
                if use_masks:
                    x, masks = x
            y = yb.to(dev)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                loss = loss_fn(net(x), y)
                if use_masks:
                    loss = loss + cfg.mask_loss * module.auxiliary_loss(masks)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        train_loss_sum, train_n = all_sum([total, count], dev)

        val_loss, score = _validate(
            module,
            val_ds,
            val_set,
            val_index,
            card,
            cfg.batch_size,
            prepare,
            loss_fn,
            weights,
            amp,
            amp_dtype,
            world,
            dev,
        )
        truth = (val_set.labels == card.cam_class_index).astype(np.int64)
        sched.step(val_loss)
        improved = val_loss < best_loss - 1e-6
        if improved:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
        else:
            bad_epochs += 1
        record = {
            "epoch": epoch,
            "train_loss": train_loss_sum / max(train_n, 1),
            "val_loss": val_loss,
            "val_auc": roc_auc(truth, score),
            "val_accuracy": float(np.mean((score >= 0.5) == truth)),
            "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
            "best": improved,
        }
        history.append(record)
        if rank == 0:
            info = _training_info(card, train_set, val_set, cfg, history, best_epoch, world, dev)
            _checkpoint(out, module, card, info, improved, epoch)
            with atomic_path(resume_path) as tmp:
                torch.save(
                    {
                        "model": module.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch,
                        "best_loss": best_loss,
                        "bad_epochs": bad_epochs,
                        "best_epoch": best_epoch,
                        "history": json.dumps(history),
                        "fingerprint": fingerprint,
                    },
                    tmp,
                )
            write_text(out / "log.jsonl", "".join(strict_json(h) + "\n" for h in history))
            if progress:
                print(
                    strict_json({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()}),
                    file=sys.stderr,
                    flush=True,
                )
        barrier()
    return FitResult(
        out / "best.safetensors", out / "last.safetensors", history, best_epoch, time.perf_counter() - t_start
    )


def _initialise(module: torch.nn.Module, init: str) -> None:
    """Copy the weights of model ``init`` (a name or path) into ``module``; tensors that differ in
    name or shape -> :class:`InvalidInputError` naming them."""
    source = load_model(init, device="cpu").module.state_dict()
    target = module.state_dict()
    wrong = sorted(k for k in target if k not in source or source[k].shape != target[k].shape)
    if wrong or set(source) - set(target):
        raise InvalidInputError(
            f"--init {init}: its weights do not fit this architecture (differing tensors: "
            f"{', '.join(wrong or sorted(set(source) - set(target)))}); give a model of the same "
            "architecture and widths"
        )
    module.load_state_dict({k: v.to(target[k].device, target[k].dtype) for k, v in source.items()})


def _validate(
    module: torch.nn.Module,
    val_ds: Any,
    val_set: PatchSet,
    val_index: np.ndarray,
    card: ModelCard,
    batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    weights: torch.Tensor,
    amp: bool,
    amp_dtype: torch.dtype,
    world: int,
    dev: torch.device,
) -> Tuple[float, np.ndarray]:
    """The weighted-mean validation loss over all ranks (the normaliser is the summed sample
    weights) and every validation patch's probability of the card's CAM class."""
    from torch.utils.data import DataLoader

    module.eval()
    val_sum, scores, seen = 0.0, [], []
    with torch.inference_mode():
        for xb, yb, ib in DataLoader(val_ds, batch_size=batch_size):
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                logits = module(prepare(xb)).float()
            val_sum += float(loss_fn(logits, yb.to(dev), reduction="sum"))
            scores.append(probabilities(logits, card.activation)[:, card.cam_class_index].cpu().numpy())
            seen.append(ib.numpy())
    val_w = float(weights[torch.from_numpy(val_set.labels[val_index]).to(dev)].sum())
    val_loss_sum, val_norm = all_sum([val_sum, val_w], dev)
    score = np.zeros(len(val_set))
    idx = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    score[idx] = np.concatenate(scores) if scores else 0.0
    score = np.array(all_sum(score.tolist(), dev)) if world > 1 else score
    return val_loss_sum / max(val_norm, 1e-12), score


def _checkpoint(
    out: Path, module: torch.nn.Module, card: ModelCard, info: Dict[str, Any], improved: bool, epoch: int
) -> None:
    """``best`` (when the epoch ``improved``) and ``last`` weights with their cards."""
    out.mkdir(parents=True, exist_ok=True)
    if improved:
        best_card = copy.deepcopy(card)
        best_card.training = {**card.training, **info}
        save_model(module, best_card, out / "best.safetensors")
    last_card = copy.deepcopy(card)
    last_card.training = {**card.training, **info, "epoch": epoch}
    save_model(module, last_card, out / "last.safetensors")


def _training_info(
    card: ModelCard,
    train_set: PatchSet,
    val_set: PatchSet,
    cfg: TrainConfig,
    history: List[Dict[str, Any]],
    best_epoch: int,
    world: int,
    dev: Any,
) -> Dict[str, Any]:
    best = next((h for h in history if h["epoch"] == best_epoch), {})
    return {
        "train": {
            "patches": len(train_set),
            "patients": int(len(set(train_set.patients))),
            "classes": train_set.counts(),
        },
        "validation": {
            "patches": len(val_set),
            "patients": int(len(set(val_set.patients))),
            "classes": val_set.counts(),
        },
        "config": asdict(cfg),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_loss": best.get("val_loss"),
        "best_val_auc": best.get("val_auc"),
        "world_size": world,
        "device": str(dev.type),
        "torch": torch.__version__,
        "seconds": round(sum(h["seconds"] for h in history), 1),
    }


# --------------------------------------------------------------------------------------------
# training and held-out evaluation, one split or k folds
# --------------------------------------------------------------------------------------------
@dataclass
class FoldResult:
    """One trained model of :func:`train_and_evaluate`: its fold name ("" for one split), the fit,
    and (rank 0) the report of its held-out test patients."""

    name: str
    fit: FitResult
    report: Optional[Dict[str, Any]] = None
    test_index: Optional[np.ndarray] = None
    diameter_threshold_mm: Optional[float] = None


def _splits(
    data: PatchSet, folds: int, val_fraction: float, test_fraction: float, seed: int
) -> List[Tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    if data.splits is not None:
        if folds:
            raise InvalidInputError(
                "this data fixes its train/validation/test split (background regions); --folds cannot re-split it"
            )
        return [("", data.split_index("train"), data.split_index("validation"), data.split_index("test"))]
    if folds:
        splits = []
        for k, (rest, test) in enumerate(patient_kfold(data.patients, folds, seed=seed)):
            tr, va = patient_split(data.patients[rest], (1 - val_fraction, val_fraction), seed=seed + k)
            splits.append((f"fold{k + 1}", rest[tr], rest[va], test))
        return splits
    tr, va, te = patient_split(
        data.patients, (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed=seed
    )
    return [("", tr, va, te)]


#: The files :func:`train_and_evaluate` writes, as paths in its folder (``fold*/``: one per fold).
TRAIN_FILES = (*FIT_FILES, *REPORT_FILES, "cv_report.json", *(f"fold*/{name}" for name in (*FIT_FILES, *REPORT_FILES)))


def train_and_evaluate(
    data: PatchSet,
    card: ModelCard,
    out_dir: Any,
    config: Optional[TrainConfig] = None,
    *,
    folds: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    resume: bool = False,
    progress: bool = True,
    device: Optional[str] = None,
) -> List[FoldResult]:
    """Split ``data`` by patient (its own fixed split, ``folds``-fold cross-validation, or one
    train/validation/test split), :func:`fit` ``card`` on each, and on rank 0 evaluate each best
    model on its test patients: the card's metrics, ``report.json``/``roc.png``/``loss.png`` in
    its folder (``out_dir`` or ``out_dir/foldK``) and, with folds, ``out_dir/cv_report.json``."""
    cfg = config or TrainConfig()
    out = Path(out_dir)
    rank, _, _ = init_torchrun()
    results = []
    for name, tr, va, te in _splits(data, folds, val_fraction, test_fraction, cfg.seed):
        folder = out / name if name else out
        fold_card = copy.deepcopy(card)
        fold_card.training["split"] = {
            "train_patients": sorted(set(data.patients[tr])),
            "validation_patients": sorted(set(data.patients[va])),
            "test_patients": sorted(set(data.patients[te])),
        }
        result = FoldResult(
            name,
            fit(
                data.subset(tr),
                data.subset(va),
                fold_card,
                folder,
                cfg,
                resume=resume,
                progress=progress,
                device=device,
            ),
        )
        if rank == 0:
            loaded = load_model(result.fit.best_path, device="cpu")
            test = data.subset(te)
            cut = _diameter_cut(data.subset(tr), card)
            report = evaluate_model(loaded, test, seed=cfg.seed, diameter_threshold_mm=cut)
            if cut is not None and "diameter_baseline" in report:
                report["diameter_baseline"]["threshold_from"] = CARD_CUT
            report["data"] = {"patches": len(test), "patients": int(len(set(test.patients))), "classes": test.counts()}
            best = loaded.card
            best.metrics = card_metrics(report)
            save_model(loaded.module, best, result.fit.best_path)
            write_report(
                report,
                folder,
                result.fit.history,
                title=f"{best.name} {best.version}" + (f", {name}" if name else ", held-out test"),
            )
            result.report = report
            result.test_index = te
            result.diameter_threshold_mm = cut
        results.append(result)
    if rank == 0 and folds:
        write_json(out / "cv_report.json", cv_report(data, results, cfg.seed))
    barrier()
    return results


def _diameter_cut(train_set: PatchSet, card: ModelCard) -> Optional[float]:
    """The diameter baseline's cut-off fitted on the training patients, where they have diameters."""
    if not has_diameters(train_set):
        return None
    y = (train_set.labels == card.cam_class_index).astype(np.int64)
    return diameter_threshold(y, train_set.diameters) if y.min() != y.max() else None


def card_metrics(report: Dict[str, Any]) -> Dict[str, Any]:
    """What a model card keeps of an evaluation report: the held-out data and CI method, each
    metric, and where the data has diameters the diameter-only baseline and the size bands."""
    metrics = {"held_out_test": {"data": report.get("data"), "ci_method": report["ci_method"]}, **report["metrics"]}
    for key in ("diameter_baseline", "size_bands"):
        if key in report:
            metrics[key] = report[key]
    return metrics


def cv_report(data: PatchSet, results: List[FoldResult], seed: int = 0) -> Dict[str, Any]:
    """The cross-validation summary: each metric's mean and t-interval over the folds
    (:func:`cross_validation_report`) and ``pooled``: the out-of-fold scores of every patient
    pooled into one report whose CIs resample patients (with the diameter baseline, each fold's
    own cut-off, and the size bands, where the data has diameters)."""
    summary = cross_validation_report([r.report for r in results])
    index = np.concatenate([r.test_index for r in results])
    pooled = data.subset(index)
    positive = results[0].report["positive_class"]
    scores = np.concatenate([r.report["scores"] for r in results])
    y = (pooled.labels == pooled.class_names.index(positive)).astype(np.int64)
    cuts = (
        np.concatenate([np.full(len(r.test_index), r.diameter_threshold_mm) for r in results])
        if all(r.diameter_threshold_mm is not None for r in results)
        else None
    )
    report = scores_report(
        y,
        scores,
        pooled,
        n_boot=1000,
        seed=seed,
        positive_class=positive,
        diameter_threshold_mm=cuts,
        threshold_from="each fold's own, fitted on its training patients (Youden index)",
    )
    report["data"] = {"patches": len(pooled), "patients": int(len(set(pooled.patients))), "classes": pooled.counts()}
    report["what"] = "out-of-fold scores of all folds pooled; 95% CIs: bootstrap over patients"
    summary["pooled"] = report
    return summary
