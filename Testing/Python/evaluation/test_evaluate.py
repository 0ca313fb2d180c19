"""Classification metrics, confidence intervals, figures and ``lunggradcam evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LungGradCAMLib.cli import main as cli_main
from LungGradCAMLib.core.errors import DataError, InvalidInputError
from LungGradCAMLib.engine.models import ModelCard, build_model, load_model, save_model
from LungGradCAMLib.evaluation import evaluate as ev
from LungGradCAMLib.training.data import PatchSet

PNG = b"\x89PNG\r\n\x1a\n"


def test_roc_auc_hand_computed_and_ties():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 1 + 2 = 3 of 4
    assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert ev.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(ev.roc_auc([1, 1], [0.2, 0.3]))
    with pytest.raises(InvalidInputError, match="0 \\(negative\\) and 1"):
        ev.roc_auc([0, 2], [0.1, 0.2])


def test_roc_auc_matches_monai_and_curve_area():
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: plenty of ties
    ours = ev.roc_auc(y, s)
    theirs = float(monai_metrics.compute_roc_auc(torch.tensor(s), torch.tensor(y)))
    assert ours == pytest.approx(theirs, abs=1e-9)
    fpr, tpr, thr = ev.roc_curve(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(thr[1:]) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(ours, abs=1e-9)


def test_binary_metrics_hand_computed():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    s = [0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4, 0.55]
    m = ev.binary_metrics(y, s)  # tp 3, fn 1, fp 1, tn 3
    assert ev.confusion(y, np.array(s) >= 0.5) == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert m["accuracy"] == pytest.approx(6 / 8) and m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4) and m["f1"] == pytest.approx(0.75)
    assert np.isnan(ev.binary_metrics([0, 0], [0.1, 0.2])["precision"])


def test_bootstrap_ci_properties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    s = rng.normal(y, 1.0)
    point = ev.binary_metrics(y, s)
    ci = ev.bootstrap_ci(y, s, n_boot=300, seed=3)
    assert ci == ev.bootstrap_ci(y, s, n_boot=300, seed=3)  # deterministic per seed
    for name, (lo, hi) in ci.items():
        assert lo <= point[name] <= hi, name
    small = ev.bootstrap_ci(y[:40], s[:40], n_boot=300, seed=3)
    assert np.diff(small["roc_auc"]) > np.diff(ci["roc_auc"])  # less data, wider interval
    # resampling 4 patients (clusters) gives wider intervals than resampling 400 samples
    patients = np.repeat(["a", "b", "c", "d"], 100)
    clustered = ev.bootstrap_ci(y, s + (patients == "a") * 2.0, groups=patients, n_boot=300, seed=3)
    plain = ev.bootstrap_ci(y, s + (patients == "a") * 2.0, n_boot=300, seed=3)
    assert np.diff(clustered["accuracy"]) > np.diff(plain["accuracy"])


def test_diameter_baseline_column_beside_the_model():
    # 8 nodules of 4 patients; the rule "malignant when diameter >= 8 mm": tp 3, fn 1, fp 0, tn 4
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    d = np.array([12.0, 9.0, 8.0, 5.0, 7.5, 6.0, 4.0, 3.0])
    model = np.array([0.9, 0.8, 0.6, 0.55, 0.7, 0.3, 0.2, 0.1])
    patients = np.repeat(["a", "b", "c", "d"], 2)
    assert ev.diameter_threshold(y, d) == 8.0  # Youden: 3/4 - 0 at 8 mm beats every other cut-off
    out = ev.baseline_reports(y, model, d, 8.0, groups=patients, n_boot=200, seed=5)
    base = out["diameter_baseline"]
    assert base["threshold_mm"] == 8.0
    m = {k: v["value"] for k, v in base["metrics"].items()}
    assert m["accuracy"] == pytest.approx(7 / 8) and m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(1.0) and m["precision"] == pytest.approx(1.0)
    # ranked by the diameter itself: 12, 9 and 8 beat all four benign nodules, 5 beats two
    assert m["roc_auc"] == pytest.approx(ev.roc_auc(y, d)) == pytest.approx(14 / 16)
    # the same patient resamples as the model's own report with the same seed: a "model" that IS
    # the diameter gets exactly the baseline's AUC interval
    twin = ev.evaluation_report(y, d / 100, groups=patients, n_boot=200, seed=5)
    assert twin["metrics"]["roc_auc"]["ci95"] == base["metrics"]["roc_auc"]["ci95"]
    # per-sample cut-offs (each fold its own): the rule applies each sample's
    per_sample = ev.baseline_reports(y, model, d, np.array([9.0] * 4 + [7.0] * 4), groups=patients, n_boot=50)
    per = per_sample["diameter_baseline"]["metrics"]
    assert per["sensitivity"]["value"] == pytest.approx(2 / 4) and per["specificity"]["value"] == pytest.approx(3 / 4)
    bands = {b["band"]: b for b in out["size_bands"]}
    assert list(bands) == ["< 6 mm", "6-10 mm", "10-20 mm", ">= 20 mm"]
    assert bands["< 6 mm"]["n"] == 3 and bands["6-10 mm"]["n"] == 4 and bands[">= 20 mm"]["n"] == 0
    # within 6-10 mm: malignant 9, 8 vs benign 7.5, 6: the diameter wins all 4 pairs, the model 3
    assert bands["6-10 mm"]["diameter_roc_auc"]["value"] == pytest.approx(1.0)
    assert bands["6-10 mm"]["model_roc_auc"]["value"] == pytest.approx(0.75)
    assert np.isnan(bands["10-20 mm"]["model_roc_auc"]["value"])  # one class only


def test_evaluate_model_adds_the_baseline_for_nodules_with_diameters(tmp_path):
    path, ps = _tiny_model_and_data(tmp_path)
    loaded = load_model(path)
    assert "diameter_baseline" not in ev.evaluate_model(loaded, ps, n_boot=20)  # no diameters: no baseline
    ps.diameters = np.linspace(3.0, 25.0, len(ps))
    report = ev.evaluate_model(loaded, ps, n_boot=20)
    base = report["diameter_baseline"]
    assert "fitted on the evaluated data itself" in base["threshold_from"]
    assert base["threshold_mm"] == ev.diameter_threshold(ps.labels, ps.diameters)
    assert set(base["metrics"]) == set(report["metrics"]) and len(report["size_bands"]) == 4
    loaded.card.metrics = {"diameter_baseline": {"threshold_mm": 7.5}}
    report = ev.evaluate_model(loaded, ps, n_boot=20)
    assert (
        report["diameter_baseline"]["threshold_mm"] == 7.5
        and report["diameter_baseline"]["threshold_from"] == ev.CARD_CUT
    )


def test_fold_ci_t_interval():
    r = ev.fold_ci([0.8, 0.9, 1.0])
    half = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert r["mean"] == pytest.approx(0.9) and r["ci95"] == pytest.approx([0.9 - half, 0.9 + half])


def test_report_figures(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    report = ev.evaluation_report(y, rng.random(60), n_boot=50, groups=np.arange(60) // 3)
    assert report["n_patients"] == 20 and set(report["metrics"]) == set(ev.METRICS)
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_auc": 0.5 + e / 10} for e in range(1, 4)]
    paths = ev.write_report(report, tmp_path / "out", history, title="t")
    assert json.loads(paths["report"].read_text())["confusion"] == report["confusion"]
    for key in ("roc", "loss"):
        assert paths[key].read_bytes()[:8] == PNG
    cv = ev.cross_validation_report([report, report])
    assert cv["metrics"]["roc_auc"]["mean"] == pytest.approx(report["metrics"]["roc_auc"]["value"])
    with pytest.raises(DataError, match="no training history"):
        ev.save_loss_curves_png([], tmp_path / "x.png")


def test_loss_figure_keeps_the_auc_off_the_loss_axis():
    """loss.png: the losses on a loss axis, the validation AUC in a panel of its own (0 to 1)."""
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_auc": 0.5 + e / 10} for e in range(1, 4)]
    loss, auc = ev.loss_curves_figure(history, title="nodule-v2 2.0.0, held-out test").axes
    assert [line.get_label() for line in loss.get_lines()] == ["training loss", "validation loss"]
    assert loss.get_ylabel() == "loss" and auc.get_ylabel() == "ROC AUC" and auc.get_ylim() == (0, 1.01)
    np.testing.assert_allclose(auc.get_lines()[0].get_ydata(), [0.6, 0.7, 0.8])
    only_loss = ev.loss_curves_figure([{"epoch": 1, "train_loss": 0.7}])
    assert len(only_loss.axes) == 1


def _tiny_model_and_data(tmp_path):
    torch.manual_seed(0)
    card = ModelCard(
        "gradcam3d_cnn",
        {"width": 4},
        ["background", "nodule"],
        "nodule",
        "features.act6",
        patch_size=[16, 16, 16],
        spacing_mm=[2.0, 2.0, 2.0],
        name="tiny",
    )
    path = save_model(build_model("gradcam3d_cnn", width=4), card, tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(0)
    patches = rng.normal(-700, 200, (20, 16, 16, 16)).astype(np.int16)
    ps = PatchSet(
        patches, np.arange(20) % 2, np.repeat(np.arange(5).astype(str), 4), ["background", "nodule"], (2.0, 2.0, 2.0)
    )
    return path, ps


def test_evaluate_model_and_cli(tmp_path, capsys):
    path, ps = _tiny_model_and_data(tmp_path)
    loaded = load_model(path)
    probs = ev.predict(loaded, ps, batch_size=7)
    assert probs.shape == (20, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    report = ev.evaluate_model(loaded, ps, n_boot=20)
    assert report["n"] == 20 and report["n_patients"] == 5 and report["positive_class"] == "nodule"
    with pytest.raises(DataError, match="differ from the model's"):
        ev.evaluate_model(loaded, PatchSet(ps.patches, ps.labels, ps.patients, ["a", "b"], ps.spacing_mm))

    cache = ps.save(tmp_path / "p.npz")
    out = tmp_path / "eval"
    assert (
        cli_main(
            [
                "evaluate",
                "--model",
                str(path),
                "--source",
                "patches",
                "--path",
                str(cache),
                "--out",
                str(out),
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    assert json.loads((out / "report.json").read_text())["model"]["name"] == "tiny"
    assert (out / "roc.png").read_bytes()[:8] == PNG
    assert (
        cli_main(
            [
                "evaluate",
                "--model",
                str(path),
                "--source",
                "patches",
                "--path",
                str(tmp_path / "missing.npz"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "missing.npz: patch cache not found" in capsys.readouterr().err
