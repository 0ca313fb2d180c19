"""Classification metrics with confidence intervals, ROC and loss-curve figures, and a model's
evaluation on labelled patches (what ``lunggradcam evaluate`` reports).

Binary metrics treat one class as positive (the model card's ``cam_class`` by default):
accuracy, precision, recall (= sensitivity), specificity, F1 and ROC AUC, each with a 95%
bootstrap confidence interval (resampling patients when patient IDs are given, since patches of
one patient are not independent), and across cross-validation folds a t-interval of the fold
values. These functions are the project's one implementation of classification metrics.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.atomic import atomic_path, write_json
from ..core.errors import DataError, InvalidInputError

METRICS = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "roc_auc")


def _check(y_true: Any, y_score: Any) -> Tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise InvalidInputError(f"y_true and y_score must be non-empty and the same length; got {y.size} and {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise InvalidInputError("y_true must hold 0 (negative) and 1 (positive) only")
    if not np.isfinite(s).all():
        raise InvalidInputError("y_score holds NaN or infinite values")
    return y, s


def roc_auc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count half); NaN when only
    one class is present."""
    from scipy.stats import rankdata

    y, s = _check(y_true, y_score)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true: Any, y_score: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds decreasing from +inf;
    one point per distinct score."""
    y, s = _check(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    return (np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, s[last]])


def confusion(y_true: Any, y_pred: Any) -> Dict[str, int]:
    """Counts tn, fp, fn, tp of binary predictions."""
    y, p = _check(y_true, y_pred)
    p = p.astype(np.int64)
    return {
        "tn": int(np.sum((y == 0) & (p == 0))),
        "fp": int(np.sum((y == 0) & (p == 1))),
        "fn": int(np.sum((y == 1) & (p == 0))),
        "tp": int(np.sum((y == 1) & (p == 1))),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def binary_metrics(y_true: Any, y_score: Any, threshold: float = 0.5) -> Dict[str, float]:
    """Point estimates of :data:`METRICS` for positive-class scores ``y_score`` (probabilities),
    predicting positive when score >= ``threshold``. Undefined ratios are NaN."""
    y, s = _check(y_true, y_score)
    c = confusion(y, (s >= threshold).astype(np.int64))
    tp, tn, fp, fn = c["tp"], c["tn"], c["fp"], c["fn"]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(y, s),
    }


def bootstrap_ci(
    y_true: Any,
    y_score: Any,
    threshold: float = 0.5,
    groups: Optional[Sequence[Any]] = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Dict[str, List[float]]:
    """Percentile bootstrap ``confidence`` intervals ``[low, high]`` of :func:`binary_metrics`.

    With ``groups`` (patient IDs) whole patients are resampled (cluster bootstrap); otherwise
    samples. Replicates where a metric is undefined (e.g. no positives drawn) are skipped.
    """
    y, s = _check(y_true, y_score)
    rng = np.random.default_rng(seed)
    members = None
    if groups is not None:
        g = np.asarray(groups).astype(str)
        if g.size != y.size:
            raise InvalidInputError(f"groups has {g.size} entries for {y.size} samples")
        members = [np.flatnonzero(g == u) for u in np.unique(g)]
    values: Dict[str, List[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot):
        if members is None:
            idx = rng.integers(0, y.size, y.size)
        else:
            idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        for name, v in binary_metrics(y[idx], s[idx], threshold).items():
            if math.isfinite(v):
                values[name].append(v)
    alpha = (1 - confidence) / 2
    return {
        m: ([float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if v else [float("nan")] * 2)
        for m, v in values.items()
    }


def fold_ci(values: Sequence[float], confidence: float = 0.95) -> Dict[str, Any]:
    """Mean, standard deviation and Student-t ``confidence`` interval of per-fold values."""
    from scipy import stats

    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": [float("nan")] * 2, "folds": list(values)}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1) * std / math.sqrt(v.size)) if v.size > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "folds": [float(x) for x in values]}


def evaluation_report(
    y_true: Any,
    y_score: Any,
    threshold: float = 0.5,
    groups: Optional[Sequence[Any]] = None,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str = "positive",
) -> Dict[str, Any]:
    """A JSON-able report: each metric as ``{"value", "ci95"}``, the confusion matrix, the ROC
    curve points, counts, and how the CIs were made."""
    y, s = _check(y_true, y_score)
    point = binary_metrics(y, s, threshold)
    ci = bootstrap_ci(y, s, threshold, groups, n_boot=n_boot, seed=seed)
    fpr, tpr, thr = roc_curve(y, s)
    return {
        "positive_class": positive_class,
        "threshold": threshold,
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int(y.size - y.sum()),
        "n_patients": int(len(set(np.asarray(groups).astype(str)))) if groups is not None else None,
        "metrics": {m: {"value": point[m], "ci95": ci[m]} for m in METRICS},
        "confusion": confusion(y, (s >= threshold).astype(np.int64)),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [float(t) for t in thr]},
        "ci_method": f"percentile bootstrap, {n_boot} replicates, resampling "
        + ("patients" if groups is not None else "samples")
        + f", seed {seed}",
    }


#: Where the diameter baseline's cut-off of a model card comes from.
CARD_CUT = "the model card's: fitted on its training patients (Youden index)"
#: The nodule size bands (readers' diameter, mm; [low, high)) in which size alone cannot decide.
SIZE_BANDS_MM = ((0.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, math.inf))


def diameter_threshold(y_true: Any, diameters: Any) -> float:
    """The diameter (mm) at or above which the diameter-only rule calls a nodule positive: the
    cut-off with the highest Youden index (sensitivity + specificity - 1) on ``diameters``, the
    balanced operating point, as the class-weighted models are trained for."""
    y, d = _check(y_true, diameters)
    if y.min() == y.max():
        raise DataError("the diameter baseline's threshold needs nodules of both classes")
    fpr, tpr, thresholds = roc_curve(y, d)
    return float(thresholds[1:][int(np.argmax((tpr - fpr)[1:]))])


def _band_label(low: float, high: float) -> str:
    return f"< {high:g} mm" if low == 0 else (f">= {low:g} mm" if math.isinf(high) else f"{low:g}-{high:g} mm")


def baseline_reports(
    y_true: Any,
    y_score: Any,
    diameters: Any,
    threshold_mm: Any,
    threshold: float = 0.5,
    groups: Optional[Sequence[Any]] = None,
    n_boot: int = 1000,
    seed: int = 0,
    threshold_from: str = "",
) -> Dict[str, Any]:
    """The diameter-only baseline beside a model, on the same samples with the same CIs:
    ``diameter_baseline`` (the rule "positive when the readers' diameter >= ``threshold_mm``"
    (one cut-off, or one per sample, e.g. each cross-validation fold's own) scored with every
    metric of :data:`METRICS`, its ROC AUC ranking by the diameter itself; the bootstrap draws
    the same patient resamples as the model's report with the same ``seed``) and ``size_bands``
    (ROC AUC of the model and of the diameter within each of :data:`SIZE_BANDS_MM`, with
    bootstrap CIs; NaN where a band holds one class only)."""
    y, s = _check(y_true, y_score)
    _, d = _check(y_true, diameters)
    g = None if groups is None else np.asarray(groups).astype(str)
    calls = (d >= np.asarray(threshold_mm, dtype=np.float64)).astype(np.float64)
    point = {**binary_metrics(y, calls, 0.5), "roc_auc": roc_auc(y, d)}
    ci = {
        **bootstrap_ci(y, calls, 0.5, g, n_boot=n_boot, seed=seed),
        "roc_auc": bootstrap_ci(y, d, 0.5, g, n_boot=n_boot, seed=seed)["roc_auc"],
    }
    cut = np.unique(np.asarray(threshold_mm, dtype=np.float64))
    baseline = {
        "what": "the readers' diameter_mm alone, no model: positive when diameter >= threshold_mm",
        "threshold_mm": float(cut[0]) if cut.size == 1 else [float(c) for c in cut],
        "threshold_from": threshold_from,
        "metrics": {m: {"value": point[m], "ci95": ci[m]} for m in METRICS},
    }
    bands = []
    for low, high in SIZE_BANDS_MM:
        inside = (d >= low) & (d < high)
        row: Dict[str, Any] = {
            "band": _band_label(low, high),
            "low_mm": low,
            "high_mm": None if math.isinf(high) else high,
            "n": int(inside.sum()),
            "n_positive": int(y[inside].sum()),
        }
        for name, score in (("model", s), ("diameter", d)):
            if inside.any():
                auc = roc_auc(y[inside], score[inside])
                lo_hi = bootstrap_ci(
                    y[inside], score[inside], threshold, None if g is None else g[inside], n_boot=n_boot, seed=seed
                )["roc_auc"]
            else:
                auc, lo_hi = float("nan"), [float("nan")] * 2
            row[f"{name}_roc_auc"] = {"value": auc, "ci95": lo_hi}
        bands.append(row)
    return {"diameter_baseline": baseline, "size_bands": bands}


def cross_validation_report(fold_reports: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Combine per-fold :func:`evaluation_report` dicts: each metric's mean and t-interval across
    folds, plus the summed confusion matrix."""
    metrics = {m: fold_ci([r["metrics"][m]["value"] for r in fold_reports]) for m in METRICS}
    conf = {k: int(sum(r["confusion"][k] for r in fold_reports)) for k in ("tn", "fp", "fn", "tp")}
    return {
        "folds": len(fold_reports),
        "metrics": metrics,
        "confusion": conf,
        "ci_method": "Student t interval of the per-fold values",
    }


# --------------------------------------------------------------------------------------------
# figures (matplotlib Figure objects with the Agg canvas: no pyplot state, no display needed)
# --------------------------------------------------------------------------------------------
def _save_figure(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def save_roc_png(report: Dict[str, Any], path: Any, title: str = "ROC") -> Path:
    """Plot a report's ROC curve (with its AUC and CI) to a PNG file."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    auc = report["metrics"]["roc_auc"]
    ax.plot(
        report["roc"]["fpr"],
        report["roc"]["tpr"],
        lw=2,
        label=f"AUC {auc['value']:.3f} (95% CI {auc['ci95'][0]:.3f}-{auc['ci95'][1]:.3f})",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def loss_curves_figure(history: Sequence[Dict[str, Any]], title: str = "training") -> Any:
    """A matplotlib Figure of per-epoch ``train_loss`` / ``val_loss`` and, when logged, the
    validation ROC AUC in a panel of its own (its axis 0 to 1: never on the loss axis)."""
    from matplotlib.figure import Figure

    if not history:
        raise DataError("no training history to plot (the log is empty)")
    epochs = [h["epoch"] for h in history]
    with_auc = any("val_auc" in h for h in history)
    fig = Figure(figsize=(10 if with_auc else 6, 4))
    fig.suptitle(title)
    ax = fig.add_subplot(1, 2 if with_auc else 1, 1)
    for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        if any(key in h for h in history):
            ax.plot(epochs, [_number(h.get(key)) for h in history], marker="o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.legend(loc="upper right", fontsize=8)
    if with_auc:
        auc = fig.add_subplot(1, 2, 2)
        auc.plot(
            epochs,
            [_number(h.get("val_auc")) for h in history],
            color="green",
            marker="o",
            ms=3,
            label="validation ROC AUC",
        )
        auc.axhline(0.5, ls="--", color="grey", lw=1, label="chance")
        auc.set(xlabel="epoch", ylabel="ROC AUC", title="validation ROC AUC", ylim=(0, 1.01))
        auc.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def save_loss_curves_png(history: Sequence[Dict[str, Any]], path: Any, title: str = "training") -> Path:
    """:func:`loss_curves_figure` as a PNG file."""
    return _save_figure(loss_curves_figure(history, title), Path(path))


def _number(value: Any) -> float:
    """A logged number; NaN for a missing or undefined one (strict JSON writes it as null)."""
    return float("nan") if value is None else float(value)


def read_log(path: Any) -> List[Dict[str, Any]]:
    """The per-epoch records of a training JSON-lines log."""
    path = Path(path)
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON-lines training log ({exc})") from None


# --------------------------------------------------------------------------------------------
# models on patch sets
# --------------------------------------------------------------------------------------------
def predict(loaded: Any, patches: Any, batch_size: int = 16) -> np.ndarray:
    """Probabilities (N, classes) of a :class:`~LungGradCAMLib.engine.models.LoadedModel` on HU patches
    ``patches`` (N, K, J, I) (a numpy array or a PatchSet), preprocessed as its card says."""
    import torch

    array = getattr(patches, "patches", patches)
    out = []
    with torch.inference_mode():
        for start in range(0, len(array), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size])).to(loaded.device)
            x = loaded.prepare(x.float().unsqueeze(1))
            out.append(loaded.probabilities(loaded.module(x)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(loaded.card.class_names)), np.float32)


def has_diameters(patch_set: Any) -> bool:
    """Whether every patch of ``patch_set`` has the readers' nodule diameter (malignancy data)."""
    d = getattr(patch_set, "diameters", None)
    return d is not None and len(d) > 0 and bool(np.isfinite(d).all())


def card_diameter_threshold(card: Any) -> Optional[float]:
    """The diameter baseline's threshold (mm) a model card records (fitted on its training
    patients), or None."""
    value = ((card.metrics or {}).get("diameter_baseline") or {}).get("threshold_mm")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def evaluate_model(
    loaded: Any,
    patch_set: Any,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    diameter_threshold_mm: Optional[float] = None,
) -> Dict[str, Any]:
    """:func:`evaluation_report` of a loaded model on a PatchSet, positive = the card's
    ``cam_class``; the PatchSet's classes must be the card's. When every patch has the readers'
    diameter (malignancy data), the report also holds :func:`baseline_reports`: the diameter-only
    rule at ``diameter_threshold_mm`` (default: the card's, fitted on its training patients; else
    fitted on this data, which favours the baseline, and the report says so)."""
    card = loaded.card
    if list(patch_set.class_names) != list(card.class_names):
        raise DataError(f"the data's classes {patch_set.class_names} differ from the model's {card.class_names}")
    probs = predict(loaded, patch_set, batch_size)
    pos = card.cam_class_index
    y = (patch_set.labels == pos).astype(np.int64)
    cut, origin = diameter_threshold_mm, "given"
    if cut is None:
        cut, origin = card_diameter_threshold(card), CARD_CUT
    if cut is None and has_diameters(patch_set) and y.min() != y.max():
        cut, origin = diameter_threshold(y, patch_set.diameters), "fitted on the evaluated data itself (optimistic)"
    return scores_report(y, probs[:, pos], patch_set, threshold, n_boot, seed, card.cam_class, cut, origin)


def scores_report(
    y: np.ndarray,
    scores: np.ndarray,
    patch_set: Any,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str = "positive",
    diameter_threshold_mm: Any = None,
    threshold_from: str = "",
) -> Dict[str, Any]:
    """:func:`evaluation_report` of positive-class ``scores`` against ``y`` (0/1) on ``patch_set``'s
    patches (its patients are resampled), with :func:`baseline_reports` when every patch has the
    readers' diameter and a ``diameter_threshold_mm`` is given, and the per-patch ``scores``."""
    report = evaluation_report(
        y, scores, threshold, patch_set.patients, n_boot=n_boot, seed=seed, positive_class=positive_class
    )
    if has_diameters(patch_set) and diameter_threshold_mm is not None and y.min() != y.max():
        report.update(
            baseline_reports(
                y,
                scores,
                patch_set.diameters,
                diameter_threshold_mm,
                threshold,
                patch_set.patients,
                n_boot=n_boot,
                seed=seed,
                threshold_from=threshold_from,
            )
        )
    report["scores"] = [float(v) for v in scores]
    return report


#: The files :func:`write_report` writes (an output folder's marker may name only these).
REPORT_FILES = ("report.json", "roc.png", "loss.png")


def write_report(
    report: Dict[str, Any], out_dir: Any, history: Optional[Sequence[Dict[str, Any]]] = None, title: str = ""
) -> Dict[str, Path]:
    """Write ``report.json``, ``roc.png`` (and ``loss.png`` from ``history``) into ``out_dir``
    (:data:`REPORT_FILES`); ``lunggradcam evaluate`` and ``train`` own the folder it is in."""
    out = Path(out_dir)
    paths = {"report": write_json(out / "report.json", report)}  # strict JSON: an undefined metric is null
    if "roc" in report:
        paths["roc"] = save_roc_png(report, out / "roc.png", title=f"ROC {title}".strip())
    if history:
        paths["loss"] = save_loss_curves_png(history, out / "loss.png", title=title or "training")
    return paths


def group_bootstrap(
    groups: Sequence[Any],
    statistic: Callable[[np.ndarray], Any],
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> np.ndarray:
    """Percentile bootstrap ``confidence`` interval of ``statistic(index)`` (a number or an array
    of numbers, of the samples at ``index``) resampling whole groups (e.g. patients) with
    replacement: an array (2, ...) of the low and high ends; NaN replicates are left out."""
    g = np.asarray(groups).astype(str)
    members = [np.flatnonzero(g == u) for u in np.unique(g)]
    if not members:
        raise InvalidInputError("group_bootstrap needs at least one sample")
    rng = np.random.default_rng(seed)
    draws = [
        np.asarray(
            statistic(np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])),
            dtype=np.float64,
        )
        for _ in range(n_boot)
    ]
    alpha = (1 - confidence) / 2
    with warnings.catch_warnings():  # a statistic that is NaN in every replicate has a NaN interval
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(np.stack(draws), [alpha, 1 - alpha], axis=0)
