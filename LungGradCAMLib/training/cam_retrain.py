"""The heat-map retraining test: does the classifier's decision live where the heat map says?

Guan & Loew's second experiment ("A Sneak Attack on Segmentation of Medical Images Using Deep
Neural Network Classifiers"), in 3D. On one patient-wise train/validation split:

1. ``original``: train the card's architecture from scratch on the patches (:func:`train.fit`) and
   measure its validation accuracy (:func:`evaluate.evaluate_model`);
2. compute every patch's normalised CAM (:func:`cam.compute_cam`, per-patch min-max to [0, 1],
   upsampled to the patch) with that classifier;
3. retrain the SAME architecture from scratch, with the same settings and seed, on the inputs
   multiplied voxel-wise by (``cam``) their normalised CAM, (``truth``) their truth mask, and
   (``inverted``) one minus their truth mask, and measure each one's validation accuracy.

If the heat map holds what the classifier needs, ``cam`` stays near ``original``; ``truth`` says
how much the lesion alone carries, ``inverted`` how much the context alone carries (near chance
when only the lesion matters).

What is multiplied: the MODEL INPUT, i.e. the HU patch after the card's intensity preprocessing
(:func:`preprocess.apply_card_preprocessing`). For the usual ``minmax`` card with an HU window that
input lies in [0, 1] and 0 is the window's low end (-1000 HU for the default window: air), so a
masked-out voxel reads as air. The retrained models take these products directly: their cards
keep architecture, patch size and spacing and say ``normalisation: "none"`` with ``hu_window`` the
products' range, so fitting and evaluating them applies no second normalisation.

Patches without a lesion: a background patch's truth mask is empty, and multiplying by it would
blank the patch (an all-zero input is then trivially "background", and the inverted variant would
leave background patches untouched while every nodule patch gets a hole: both separable by the
mask alone). Instead each patch with an empty truth mask BORROWS the truth mask of a randomly
chosen (seeded) lesion patch of the same split (:func:`fill_empty_masks`): the masks of both
classes then have the same sizes and positions, so only the voxels they keep or remove can tell
the classes apart. The CAM variant uses every patch's own CAM of the card's ``cam_class`` (what
LungGradCAM shows), also for background patches; a CAM that is zero everywhere (Grad-CAM's ReLU
removed everything) blanks its patch, which is information the heat map carries, and the count of
such patches per class is reported.

Truth masks: for real LIDC nodules (``--source lidc-vois``) the readers' outlines the patches
carry (``PatchSet.masks``); for phantom patches (:func:`data.phantom_patches`)
:func:`phantom_patch_masks`, which rebuilds each seed's phantom and crops its nodule labelmap
exactly where each patch was cut. Models trained with an outline loss (``TrainConfig.mask_loss``,
an attention head) are retrained with it in all four variants, the outlines unchanged.
``lunggradcam evaluate --cam-retrain`` runs the whole test (on the model card's data by default)
and writes ``cam_retrain.json``.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..core.atomic import write_json
from ..core.errors import DataError, InvalidInputError
from ..engine.device import resolve_device
from ..engine.methods import DEFAULT_METHOD
from ..engine.models import LoadedModel, ModelCard, load_model
from ..evaluation.evaluate import evaluate_model
from .data import PatchSet, crop_patch, patient_split
from .train import FIT_FILES, TrainConfig, fit

log = logging.getLogger(__name__)

#: The four trainings, in the order they run.
VARIANTS = ("original", "cam", "truth", "inverted")
#: The files :func:`cam_retrain` writes, as paths in its folder.
CAM_RETRAIN_FILES = ("cam_retrain.json", *(f"{variant}/{name}" for variant in VARIANTS for name in FIT_FILES))
_PHANTOM_PATIENT = re.compile(r"^phantom-(\d+)$")


# --------------------------------------------------------------------------------------------
# truth masks
# --------------------------------------------------------------------------------------------
def phantom_patch_masks(patch_set: PatchSet) -> np.ndarray:
    """Truth masks (N, K, J, I) bool of patches cut by :func:`data.phantom_patches`: the voxels of
    any phantom nodule inside each patch (the nodule labelmap resampled to the patches' grid by
    nearest neighbour, as :func:`data.phantom_patches` does to keep nodules out of background
    patches). Background patches get empty masks.

    Each patient ``phantom-<seed>``'s phantom is rebuilt with the scanner setting that
    :func:`data.phantom_patches` draws for the seed, and every patch is cropped again at its
    ``centres`` (RAS mm) with :func:`data.crop_patch`; a recropped patch that differs from the
    stored one by more than 1 HU raises :class:`DataError` (the patches were not made that way).
    """
    from .. import phantom
    from ..core.volume import LabelMap, resample_to
    from .data import _phantom_geometry, _ras_to_kji, _to_int16, to_model_grid

    seeds = []
    for patient in patch_set.patients:
        match = _PHANTOM_PATIENT.match(str(patient))
        if match is None:
            raise DataError(
                f"patient {patient!r} is not a phantom ('phantom-<seed>'): truth masks can only be "
                "rebuilt for patches made by data.phantom_patches (--source phantom)"
            )
        seeds.append(int(match.group(1)))
    if not np.isfinite(patch_set.centres).all():
        raise DataError("the patches have no recorded centres; rebuild them with data.phantom_patches")
    seeds_arr = np.array(seeds)
    size = patch_set.patch_size
    masks = np.zeros(patch_set.patches.shape, dtype=bool)
    for seed in np.unique(seeds_arr):
        # the same generator and first draw as data.phantom_patches: the scanner setting of the seed
        shape, spacing, noise = _phantom_geometry(np.random.default_rng([int(seed), 20240605]))
        ph = phantom.chest_ct(seed=int(seed), shape=shape, spacing_mm=spacing, noise_hu=noise)
        grid = to_model_grid(ph.volume, patch_set.spacing_mm)
        nodules = resample_to(LabelMap.like(ph.volume, ph.nodule_labelmap > 0), grid).array
        index = np.flatnonzero(seeds_arr == seed)
        for n, kji in zip(index, _ras_to_kji(grid, patch_set.centres[index])):
            again = _to_int16([crop_patch(grid.array, kji, size)])[0]
            if np.abs(again.astype(np.int32) - patch_set.patches[n].astype(np.int32)).max() > 1:
                raise DataError(
                    f"patch {n} of phantom-{seed} does not match the phantom recropped at its centre: "
                    "were the patches made by data.phantom_patches at this spacing and version?"
                )
            masks[n] = crop_patch(nodules, kji, size, fill=0) > 0
    return masks


def fill_empty_masks(masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """A copy of ``masks`` (N, K, J, I) in which every empty mask is replaced by the mask of a
    patch with a non-empty one, drawn uniformly with ``seed`` (so masks of lesion and background
    patches share one distribution of sizes and positions; see the module doc)."""
    masks = np.asarray(masks)
    filled = masks.reshape(len(masks), -1).any(axis=1)
    if not filled.any():
        raise DataError("every truth mask is empty: the truth-mask variants need patches with lesions")
    out = masks.copy()
    empty = np.flatnonzero(~filled)
    donors = np.random.default_rng(seed).choice(np.flatnonzero(filled), size=len(empty))
    out[empty] = masks[donors]
    return out


# --------------------------------------------------------------------------------------------
# model inputs
# --------------------------------------------------------------------------------------------
def model_inputs(patches: np.ndarray, card: ModelCard, batch_size: int = 256) -> np.ndarray:
    """The model input (N, K, J, I) float32 of HU ``patches`` (N, K, J, I): the card's intensity
    preprocessing (for a ``minmax`` card with an HU window: [0, 1], 0 = the window's low end)."""
    from ..engine.preprocess import apply_card_preprocessing

    out = np.empty(patches.shape, dtype=np.float32)
    for start in range(0, len(patches), batch_size):
        chunk = patches[start : start + batch_size].astype(np.float32)
        out[start : start + batch_size] = apply_card_preprocessing(chunk, card)
    return out


def patch_cams(
    loaded: LoadedModel,
    inputs: np.ndarray,
    method: str = DEFAULT_METHOD,
    target: Optional[int] = None,
    batch_size: int = 32,
    layer: Optional[str] = None,
) -> np.ndarray:
    """Normalised CAMs (N, K, J, I) float32 in [0, 1] of ``loaded`` (a LoadedModel) for model
    ``inputs`` (N, K, J, I, already preprocessed), each min-max scaled on its own, upsampled to the
    patch; ``target``: the explained class index (default the card's ``cam_class``); ``layer``: the
    CAM layer(s) (default the card's ``target_layer``)."""
    import torch

    from ..engine.cam import compute_cam

    card = loaded.card
    index = card.cam_class_index if target is None else int(target)
    out = np.empty(inputs.shape, dtype=np.float32)
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))[:, None].to(loaded.device)
        cam = compute_cam(
            loaded.module, x, method=method, target=index, layer=layer or card.target_layer, activation=card.activation
        )
        out[start : start + batch_size] = cam.cpu().numpy()
    return out


def _input_card(card: ModelCard, inputs: Sequence[np.ndarray]) -> ModelCard:
    """The card of a model that takes already-preprocessed ``inputs`` as they are."""
    lo = math.floor(min(float(a.min()) for a in inputs))
    hi = max(math.ceil(max(float(a.max()) for a in inputs)), lo + 1)
    out = copy.deepcopy(card)
    out.normalisation, out.hu_window = "none", [float(lo), float(hi)]
    out.gamma = out.clahe = out.sobel = None
    out.training, out.metrics, out.sha256 = dict(card.training), {}, ""
    return out


# --------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------
@dataclass
class RetrainResult:
    """What :func:`cam_retrain` measured. ``accuracy``: variant -> validation accuracy (threshold
    0.5 on the card's ``cam_class`` probability); ``reports``: variant -> the full
    :func:`evaluate.evaluation_report` (every metric with its 95% CI); ``chance``: the accuracy of
    always predicting the validation set's majority class."""

    accuracy: Dict[str, float]
    reports: Dict[str, Dict[str, Any]]
    chance: float
    data: Dict[str, Any]
    settings: Dict[str, Any]
    cam_blank: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        summary = {
            v: {m: self.reports[v]["metrics"][m] for m in ("accuracy", "roc_auc", "sensitivity", "specificity")}
            for v in self.reports
        }
        return {
            "accuracy": self.accuracy,
            "chance_accuracy": self.chance,
            "metrics": summary,
            "cam_blank_patches": self.cam_blank,
            "data": self.data,
            "settings": self.settings,
            "reports": self.reports,
        }


def cam_retrain(
    data: PatchSet,
    masks: np.ndarray,
    card: ModelCard,
    out_dir: Any,
    *,
    config: Optional[TrainConfig] = None,
    val_fraction: float = 0.3,
    method: str = DEFAULT_METHOD,
    mask_dilation: int = 0,
    device: Optional[str] = None,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = False,
) -> RetrainResult:
    """Guan & Loew's heat-map retraining test on ``data`` (HU patches) with truth ``masks``
    (N, K, J, I, non-zero = lesion; empty for background patches), training ``card``'s
    architecture (a :class:`~LungGradCAMLib.engine.models.ModelCard`; its preprocessing, patch size and
    classes) four times with :func:`train.fit` and ``config`` (a
    :class:`~LungGradCAMLib.training.train.TrainConfig`, the same for all four).

    Patients are split with :func:`data.patient_split` into train and validation (``val_fraction``
    of the patients, ``seed``). ``mask_dilation`` (voxels, 26-connected) grows every truth mask
    first, e.g. to take a lesion's blurred rim with it (the inverted variant then cannot see the
    lesion's outline). Each variant's checkpoints go to ``out_dir/<variant>/``; the result
    is also written to ``out_dir/cam_retrain.json``. See the module doc for what is multiplied and
    how background patches are masked.
    """
    masks = np.asarray(masks)
    if masks.shape != data.patches.shape:
        raise InvalidInputError(f"masks {masks.shape} must have the patches' shape {data.patches.shape} (N, K, J, I)")
    if mask_dilation < 0:
        raise InvalidInputError(f"mask_dilation must be >= 0 voxels; got {mask_dilation}")
    if not 0 < val_fraction < 1:
        raise InvalidInputError(f"val_fraction must be between 0 and 1; got {val_fraction}")
    if len(card.class_names) != 2:
        raise InvalidInputError(
            f"the retraining test needs a two-class model; {card.name or card.architecture} "
            f"has classes {card.class_names}"
        )
    cfg = config or TrainConfig(seed=seed)
    device = str(resolve_device(device))
    out = Path(out_dir)
    train_idx, val_idx = patient_split(data.patients, (1 - val_fraction, val_fraction), seed=seed)
    train_set, val_set = data.subset(train_idx), data.subset(val_idx)
    for name, part in (("training", train_set), ("validation", val_set)):
        if len(set(part.labels.tolist())) < 2:
            raise DataError(f"the {name} split holds one class only ({part.counts()}); use more patients")
    masks = masks != 0
    if mask_dilation:
        from scipy import ndimage

        ball = ndimage.generate_binary_structure(3, 3)
        masks = np.stack([ndimage.binary_dilation(m, ball, iterations=mask_dilation) if m.any() else m for m in masks])
    truth = {"train": fill_empty_masks(masks[train_idx], seed), "val": fill_empty_masks(masks[val_idx], seed + 1)}

    reports: Dict[str, Dict[str, Any]] = {}

    def train_and_score(variant: str, tr: PatchSet, va: PatchSet, variant_card: ModelCard) -> LoadedModel:
        log.info("cam_retrain: training %s", variant)
        result = fit(tr, va, variant_card, out / variant, cfg, progress=progress, device=device)
        loaded = load_model(result.best_path, device=device)
        reports[variant] = evaluate_model(loaded, va, n_boot=n_boot, seed=seed)
        reports[variant]["best_epoch"] = result.best_epoch
        return loaded

    original = train_and_score("original", train_set, val_set, card)
    x_train, x_val = model_inputs(train_set.patches, card), model_inputs(val_set.patches, card)
    cam_train, cam_val = patch_cams(original, x_train, method), patch_cams(original, x_val, method)
    multipliers = {
        "cam": (cam_train, cam_val),
        "truth": (truth["train"], truth["val"]),
        "inverted": (~truth["train"], ~truth["val"]),
    }
    for variant in VARIANTS[1:]:
        m_train, m_val = multipliers[variant]
        products = (x_train * m_train, x_val * m_val)
        tr, va = (
            PatchSet(
                p.astype(np.float32),
                s.labels,
                s.patients,
                list(s.class_names),
                s.spacing_mm,
                s.kinds,
                s.centres,
                s.masks,
            )
            for p, s in zip(products, (train_set, val_set))
        )
        variant_card = _input_card(card, products)
        variant_card.training["cam_retrain"] = (
            f"inputs multiplied by the {variant} map (LungGradCAMLib.training.cam_retrain)"
        )
        train_and_score(variant, tr, va, variant_card)

    blank = np.concatenate([cam_train, cam_val]).reshape(len(data), -1).max(axis=1) == 0
    labels = np.concatenate([train_set.labels, val_set.labels])
    result = RetrainResult(
        accuracy={v: float(reports[v]["metrics"]["accuracy"]["value"]) for v in VARIANTS},
        reports=reports,
        chance=float(max(np.mean(val_set.labels == c) for c in range(len(card.class_names)))),
        data={
            "train": {
                "patches": len(train_set),
                "patients": len(set(train_set.patients)),
                "classes": train_set.counts(),
            },
            "validation": {
                "patches": len(val_set),
                "patients": len(set(val_set.patients)),
                "classes": val_set.counts(),
            },
            "patch_size_kji": list(data.patch_size),
            "spacing_mm_ijk": list(data.spacing_mm),
        },
        settings={
            "architecture": card.architecture,
            "kwargs": card.kwargs,
            "cam_method": method,
            "cam_class": card.cam_class,
            "val_fraction": val_fraction,
            "seed": seed,
            "mask_dilation_vox": mask_dilation,
            "train_config": asdict(cfg),
            "multiplied": "the model input after the card's preprocessing "
            f"({card.normalisation}, window {card.hu_window} HU), 0 = the window's low end",
            "empty_masks": "background patches borrow the truth mask of a random lesion patch of their split",
        },
        cam_blank={c: int(np.sum(blank & (labels == i))) for i, c in enumerate(card.class_names)},
    )
    write_json(out / "cam_retrain.json", result.to_dict())
    return result
