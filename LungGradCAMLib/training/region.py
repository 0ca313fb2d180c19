"""The region model as an ensemble (:class:`~LungGradCAMLib.engine.models.networks.RegionNet`):
what ``lunggradcam train --arch region_net --folds K`` runs.

1. The patients are split once: a test part (``test_fraction``), never trained or tuned on, and
   the rest, split by patient into ``folds`` cross-validation folds.
2. For each view (scale) of the card's ``region_net`` and each fold, one member network is
   trained (:func:`train.fit`: the fold's other patients, a ``val_fraction`` of them for early
   stopping) as a one-member, one-view region model of its own (``viewV/foldK/best.*``).
3. Each member scores its fold's held-out patients (out of fold) and the test patients, with the
   card's test-time flips: per view, the logit difference (malignant - benign).
4. With image ``features``, the fusion (a class-balanced logistic regression of the views' logit
   differences and the features, :func:`fit_fusion`) is fitted on all out-of-fold outputs; for
   the reported cross-validation each fold's scores come from a fusion fitted on the other folds
   only. Without, the model averages its members' logits.
5. The bundled model: one ``region_net`` holding every member (views x folds), the flips and the
   fusion, saved as one safetensors file with its card, then scored on the test patients with
   :func:`evaluate.evaluate_model` (exactly what ``lunggradcam evaluate`` computes).

The card's metrics: the held-out test (with the diameter-only baseline and the size bands), the
cross-validation pooled over patients (out-of-fold, the same baseline with each fold's own cut-off)
and its ablations (each view alone; with features, the networks without them).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.atomic import write_text
from ..core.errors import DataError, InvalidInputError
from ..engine.models import ModelCard, build_model, load_model, save_model
from ..evaluation.evaluate import (
    CARD_CUT,
    diameter_threshold,
    evaluate_model,
    has_diameters,
    scores_report,
    write_report,
)
from .data import PatchSet, patient_kfold, patient_split
from .train import TrainConfig, card_metrics, fit

log = logging.getLogger(__name__)


def fit_fusion(z: np.ndarray, y: np.ndarray, penalty: float = 1.0) -> Tuple[np.ndarray, float]:
    """A class-balanced, L2-penalised logistic regression of ``y`` (0/1) on standardised inputs
    ``z`` (N, d): (weights (d,), bias). Balanced, as the networks are trained with class
    weights, so that probability 0.5 stays the balanced operating point."""
    from scipy.optimize import minimize

    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    if y.min() == y.max():
        raise DataError("the fusion needs out-of-fold outputs of both classes")
    weight = np.where(y == 1, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))

    def objective(theta: np.ndarray) -> Tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        t = z @ w + b
        p = 1.0 / (1.0 + np.exp(-t))
        loss = np.sum(weight * (np.logaddexp(0.0, t) - y * t)) + 0.5 * penalty * w @ w
        r = weight * (p - y)
        return loss, np.append(z.T @ r + penalty * w, r.sum())

    result = minimize(objective, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B")
    return result.x[:-1], float(result.x[-1])


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-t))


@dataclass
class RegionResult:
    """Where the bundled model went, and its reports."""

    path: Path
    test_report: Dict[str, Any]
    cv_report: Dict[str, Any]


def _member_card(card: ModelCard, view: Sequence[int]) -> ModelCard:
    """The card of one member: a one-member, one-view ``region_net`` without flips or features."""
    member = copy.deepcopy(card)
    member.kwargs = {**card.kwargs, "views": [list(view)], "members": 1, "flips": 1, "features": []}
    member.metrics, member.sha256 = {}, ""
    return member


def _view_scores(
    module: torch.nn.Module, card: ModelCard, patches: np.ndarray, flips: int, batch_size: int = 16
) -> np.ndarray:
    """The logit differences (malignant - benign) (N,) of a one-member ``region_net`` ``module``
    on HU ``patches``, with ``flips`` test-time mirror images."""
    from ..engine.preprocess import apply_card_preprocessing

    net = build_model(card.architecture, **{**module_kwargs(module), "flips": flips})
    net.load_state_dict(module.state_dict())
    net.eval()
    z = []
    with torch.inference_mode():
        for start in range(0, len(patches), batch_size):
            x = apply_card_preprocessing(
                torch.from_numpy(patches[start : start + batch_size]).float().unsqueeze(1), card
            )
            out = net(x)
            z.append((out[:, 1] - out[:, 0]).numpy())
    return np.concatenate(z)


def _image_features(card: ModelCard, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, n) the card's image features of HU ``patches``, as the bundled model computes them
    (from its normalised input)."""
    from ..engine.models.features import feature_names, image_features
    from ..engine.preprocess import apply_card_preprocessing

    names = list(card.kwargs.get("features", []))
    lo, hi = card.kwargs.get("hu_window", card.hu_window)
    out = [np.zeros((len(patches), len(feature_names(names))))]
    if names:
        out = []
        with torch.inference_mode():
            for start in range(0, len(patches), batch_size):
                x = apply_card_preprocessing(
                    torch.from_numpy(patches[start : start + batch_size]).float().unsqueeze(1), card
                )
                out.append(image_features(x * (hi - lo) + lo, float(card.kwargs.get("voxel_mm", 1.0)), names).numpy())
    return np.concatenate(out)


def module_kwargs(module: torch.nn.Module) -> Dict[str, Any]:
    """The ``region_net`` arguments a one-member ``module`` was built with."""
    return dict(module.init_kwargs)


def train_region_model(
    data: PatchSet,
    card: ModelCard,
    out_dir: Any,
    config: Optional[TrainConfig] = None,
    *,
    folds: int = 5,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    progress: bool = True,
    device: Optional[str] = None,
) -> RegionResult:
    """Train and bundle the region model ``card`` describes (a ``region_net``: its member, views,
    flips and features) on ``data`` (benign/malignant patches of nodules with their outlines and
    diameters); see the module doc. Members already trained in ``out_dir`` (their ``oof.npz``)
    are reused, so an interrupted run continues, and a bundle newer than every member is kept
    (remove ``region.*`` to bundle again). Two processes may share the work (each member is
    claimed by one; one bundles, the other waits for it and returns no reports). Writes
    ``out_dir/region.safetensors`` + card, ``report.json`` (test), ``cv_report.json`` and their
    figures."""
    cfg = config or TrainConfig()
    if card.architecture != "region_net" or card.class_names != ["benign", "malignant"]:
        raise InvalidInputError(
            "--folds with --arch region_net trains a benign/malignant region ensemble; "
            f"got {card.architecture} with classes {card.class_names}"
        )
    if folds < 2:
        raise InvalidInputError(f"a region ensemble needs --folds >= 2; got {folds}")
    out = Path(out_dir)
    views = [tuple(v) for v in card.kwargs.get("views", [])]
    flips = int(card.kwargs.get("flips", 1))
    rest, test_index = patient_split(data.patients, (1 - test_fraction, test_fraction), seed=cfg.seed)
    test, pool = data.subset(test_index), data.subset(rest)
    y_pool = pool.labels.astype(np.int64)
    fold_of = np.full(len(pool), -1)
    z_oof = np.zeros((len(pool), len(views)))
    members: List[Dict[str, torch.Tensor]] = []
    jobs = [
        (v, view, k, train_part, held)
        for v, view in enumerate(views)
        for k, (train_part, held) in enumerate(patient_kfold(pool.patients, folds, seed=cfg.seed))
    ]
    for v, view, k, train_part, held in jobs:  # members another process trains are waited for below
        member_card = _member_card(card, view)
        folder = out / f"view{v + 1}" / f"fold{k + 1}"
        if (folder / "oof.npz").is_file() or not _claim(folder):
            continue
        try:
            tr, va = patient_split(pool.patients[train_part], (1 - val_fraction, val_fraction), seed=cfg.seed + k)
            fold_card = copy.deepcopy(member_card)
            fold_card.training["split"] = {
                "train_patients": sorted(set(pool.patients[train_part[tr]])),
                "validation_patients": sorted(set(pool.patients[train_part[va]])),
                "test_patients": sorted(set(pool.patients[held])),
            }
            result = fit(
                pool.subset(train_part[tr]),
                pool.subset(train_part[va]),
                fold_card,
                folder,
                cfg,
                resume=True,
                progress=progress,
                device=device,
            )
            loaded = load_model(result.best_path, device="cpu")
            z_held = _view_scores(loaded.module, card, pool.patches[held], flips)
            with open(folder / "oof.tmp.npz", "wb") as f:
                np.savez(f, held=held, z_held=z_held)
            (folder / "oof.tmp.npz").replace(folder / "oof.npz")
        finally:
            (folder / CLAIM).unlink(missing_ok=True)
    for v, view, k, train_part, held in jobs:
        fold_of[held] = k
        folder = out / f"view{v + 1}" / f"fold{k + 1}"
        cache = folder / "oof.npz"
        while not cache.is_file():  # trained by another process: wait for it
            if not (folder / CLAIM).is_file() and _claim(folder):
                (folder / CLAIM).unlink()
                if cache.is_file():  # finished just now
                    break
                raise DataError(f"{folder}: this member was not trained (its process stopped); run again")
            time.sleep(30)
        with np.load(cache) as saved:
            if not np.array_equal(saved["held"], held):
                raise DataError(f"{cache}: written for another split or data; remove {out} to start again")
            z_oof[held, v] = saved["z_held"]
        members.append(load_model(folder / "best.safetensors", device="cpu").module.members[0].state_dict())
    bundle = out / "region.json"
    newest = max((out / f"view{v + 1}" / f"fold{k + 1}" / "oof.npz").stat().st_mtime for v, _, k, _, _ in jobs)
    if bundle.is_file() and bundle.stat().st_mtime > newest:
        log.info("%s: bundled already from these members (remove region.* to bundle again)", out)
        return RegionResult(out / "region.safetensors", {}, {})
    if not _claim(out):
        log.info("%s: another process bundles the members; waiting for it", out)
        while (out / CLAIM).is_file():
            time.sleep(10)
        return RegionResult(out / "region.safetensors", {}, {})
    try:
        return _bundle(
            card, pool, test, y_pool, fold_of, z_oof, _image_features(card, pool.patches), members, folds, out, cfg
        )
    finally:
        (out / CLAIM).unlink(missing_ok=True)


#: The file a process holds in a member's folder while it trains it (its process ID inside).
CLAIM = "training.pid"


def _claim(folder: Path) -> bool:
    """Take ``folder`` for this process (a :data:`CLAIM` file made exclusively), or take over one
    whose process is gone; False when another live process holds it. Lets two ``lunggradcam train``
    processes share an ensemble's members (e.g. one per CPU core)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return False
            except (ProcessLookupError, ValueError, FileNotFoundError):
                path.unlink(missing_ok=True)  # its process is gone
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _bundle(
    card: ModelCard,
    pool: PatchSet,
    test: PatchSet,
    y_pool: np.ndarray,
    fold_of: np.ndarray,
    z_oof: np.ndarray,
    f_oof: np.ndarray,
    members: List[Dict[str, torch.Tensor]],
    folds: int,
    out: Path,
    cfg: TrainConfig,
) -> RegionResult:
    """Fit the fusion, build and save the ensemble, score it; the CV reports (see the module doc)."""
    features = list(card.kwargs.get("features", []))
    mean, std = f_oof.mean(axis=0), f_oof.std(axis=0) + 1e-6
    inputs = np.concatenate([z_oof, (f_oof - mean) / std], axis=1)
    networks = _sigmoid(z_oof.mean(axis=1))  # no features: the members' logits averaged
    scores, w, b = networks, np.zeros(0), 0.0
    if features:
        w, b = fit_fusion(inputs, y_pool)
        # cross-fitted: each fold's scores from a fusion fitted on the other folds' out-of-fold outputs
        scores = np.zeros(len(pool))
        for k in range(folds):
            w_k, b_k = fit_fusion(inputs[fold_of != k], y_pool[fold_of != k])
            scores[fold_of == k] = _sigmoid(inputs[fold_of == k] @ w_k + b_k)

    kwargs = {**card.kwargs, "members": folds}
    net = build_model("region_net", **kwargs)
    n_views = len(kwargs["views"])
    for i, state in enumerate(members):  # view-major, as RegionNet orders its members
        net.members[i].load_state_dict(state)
    if features:
        with torch.no_grad():
            net.fusion.weight.copy_(torch.tensor(w, dtype=torch.float32)[None])
            net.fusion.bias.fill_(b)
            net.feature_mean.copy_(torch.tensor(mean, dtype=torch.float32))
            net.feature_std.copy_(torch.tensor(std, dtype=torch.float32))
    bundled = copy.deepcopy(card)
    bundled.kwargs = kwargs
    bundled.training["split"] = {
        "train_patients": sorted(set(pool.patients)),
        "validation_patients": [],
        "test_patients": sorted(set(test.patients)),
    }
    bundled.training["config"] = asdict(cfg)  # each member's training, e.g. its outline loss
    bundled.training["ensemble"] = {
        "folds": folds,
        "views": kwargs["views"],
        "members": n_views * folds,
        "flips": kwargs.get("flips", 1),
        "fold_patients": {f"fold{k + 1}": sorted(set(pool.patients[fold_of == k])) for k in range(folds)},
        "features": features,
    }
    if features:
        bundled.training["ensemble"]["fusion"] = {
            "inputs": [f"view{v + 1} logit difference" for v in range(n_views)] + _feature_names(features),
            "weights": [float(x) for x in w],
            "bias": b,
            "fitted_on": "all out-of-fold outputs (class-balanced logistic regression)",
        }
    cut = diameter_threshold(y_pool, pool.diameters) if has_diameters(pool) else None
    bundled.metrics = {"diameter_baseline": {"threshold_mm": cut}} if cut is not None else {}
    path = save_model(net, bundled, out / "region.safetensors")

    loaded = load_model(path, device="cpu")
    test_report = evaluate_model(loaded, test, seed=cfg.seed, diameter_threshold_mm=cut)
    if "diameter_baseline" in test_report:
        test_report["diameter_baseline"]["threshold_from"] = CARD_CUT
    test_report["data"] = {"patches": len(test), "patients": int(len(set(test.patients))), "classes": test.counts()}
    cuts = None
    if cut is not None:
        per_fold = [diameter_threshold(y_pool[fold_of != k], pool.diameters[fold_of != k]) for k in range(folds)]
        cuts = np.asarray(per_fold)[fold_of]
    cv = {
        "what": f"patient-wise {folds}-fold cross-validation on the {len(set(pool.patients))} patients outside "
        "the test part; each patient scored by the members that never saw it (one per view), out-of-fold "
        "scores pooled; 95% CIs: bootstrap over patients",
        "model": _pooled(y_pool, scores, pool, cuts, cfg.seed),
    }
    for v in range(n_views):
        cv[f"view{v + 1}_alone"] = _pooled(y_pool, _sigmoid(z_oof[:, v]), pool, cuts, cfg.seed, baseline=False)
    if features:
        cv["networks_without_features"] = _pooled(y_pool, networks, pool, cuts, cfg.seed, baseline=False)
    loaded.card.metrics = {**card_metrics(test_report), "cross_validation": _card_cv(cv)}
    save_model(loaded.module, loaded.card, path)
    write_report(test_report, out, title=card.name)
    write_text(out / "cv_report.json", json.dumps(cv, indent=2, allow_nan=True) + "\n")
    return RegionResult(path, test_report, cv)


def _feature_names(features: Sequence[str]) -> List[str]:
    from ..engine.models.features import feature_names

    return feature_names(features)


def _pooled(
    y: np.ndarray, scores: np.ndarray, pool: PatchSet, cuts: Optional[np.ndarray], seed: int, baseline: bool = True
) -> Dict[str, Any]:
    report = scores_report(
        y,
        scores,
        pool,
        seed=seed,
        positive_class="malignant",
        diameter_threshold_mm=cuts if baseline else None,
        threshold_from="each fold's own, fitted on its other folds' patients (Youden index)",
    )
    report["data"] = {"patches": len(pool), "patients": int(len(set(pool.patients))), "classes": pool.counts()}
    report.pop("roc", None)
    return report


def _card_cv(cv: Dict[str, Any]) -> Dict[str, Any]:
    """What the card keeps of the cross-validation: metrics, baseline and bands of each row."""
    out: Dict[str, Any] = {"what": cv["what"]}
    for name, report in cv.items():
        if isinstance(report, dict):
            out[name] = {k: report[k] for k in ("data", "metrics", "diameter_baseline", "size_bands") if k in report}
    return out
