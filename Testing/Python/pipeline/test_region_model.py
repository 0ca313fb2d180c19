"""Region models (card ``input: roi``, e.g. malignancy): explained on one patch centred on a region
the user gives, never over a whole scan: the library, the command line and the MRML layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from LungGradCAMLib.core.errors import InvalidInputError
from LungGradCAMLib.engine.models import load_model
from LungGradCAMLib.pipeline import explain

from helpers import NODULE_RAS, chest_with_nodule


@pytest.fixture(scope="module")
def chest():
    return chest_with_nodule(14.0, shape=(40, 96, 96), spacing_mm=(3.6, 3.6, 6.0))


def test_a_region_model_refuses_a_whole_scan(chest, region_model):
    assert load_model(region_model).card.input == "roi"
    with pytest.raises(InvalidInputError, match="judges a region around ONE nodule"):
        explain(chest.volume, model=str(region_model), device="cpu")
    with pytest.raises(InvalidInputError, match="judges a region"):
        explain(chest.volume, model=str(region_model), device="cpu", mode="sliding", roi=(NODULE_RAS, 20.0))


def test_a_region_model_sees_one_patch_centred_on_the_region(chest, region_model):
    exp = explain(chest.volume, model=str(region_model), device="cpu", roi=(NODULE_RAS, 60.0))
    assert exp.mode == "roi" and exp.n_patches == 1  # a 60 mm ROI, still one 32 mm patch
    hot = np.argwhere(exp.cam.array > 0)
    assert len(hot)
    lo = exp.cam.ijk_to_ras_points(hot.min(axis=0)[::-1])[0]
    hi = exp.cam.ijk_to_ras_points(hot.max(axis=0)[::-1])[0]
    centre = (lo + hi) / 2
    assert np.all(np.abs(centre - NODULE_RAS) <= 4.0)  # the patch is centred on the region (one model voxel)
    assert np.all(np.abs(hi - lo) <= 32.0 + 2 * 3.6)  # and only one patch (16 x 2 mm) is covered
    assert set(exp.probabilities) == {"benign", "malignant"}


def test_the_cli_needs_roi_for_a_region_model(tmp_path, chest, region_model, capsys):
    from LungGradCAMLib.cli import main
    from LungGradCAMLib.io.volume_files import write_volume

    ct = write_volume(chest.volume, tmp_path / "ct.nrrd")
    assert (
        main(["run", str(ct), "--out", str(tmp_path / "no-roi"), "--model", str(region_model), "--device", "cpu"]) == 2
    )
    assert "judges a region" in capsys.readouterr().err
    assert not (tmp_path / "no-roi" / "report.json").exists()
    roi = ",".join(str(v) for v in NODULE_RAS) + ",30"
    assert (
        main(
            [
                "run",
                str(ct),
                "--out",
                str(tmp_path / "roi"),
                "--model",
                str(region_model),
                "--device",
                "cpu",
                f"--roi={roi}",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "roi" / "report.json").read_text())
    assert report["model"]["input"] == "roi" and report["mode"] == "roi"


def test_the_cli_asks_a_region_model_about_each_hot_region(tmp_path, chest, region_model, capsys):
    """--region-model: the whole-scan model finds the hot regions, the region model answers for each
    one (report, printed summary); a whole-scan model is refused as a region model before any work."""
    from LungGradCAMLib.cli import main
    from LungGradCAMLib.io.volume_files import write_volume

    ct = write_volume(chest.volume, tmp_path / "ct.nrrd")
    args = ["run", str(ct), "--device", "cpu", "--threshold", "0.3"]
    assert main(args + ["--out", str(tmp_path / "scan-as-region"), "--region-model", "default"]) == 2
    assert "takes a whole scan" in capsys.readouterr().err
    assert not (tmp_path / "scan-as-region").exists()

    assert main(args + ["--out", str(tmp_path / "both"), "--region-model", str(region_model)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "both" / "report.json").read_text())
    assert report["model"]["name"] == "default" and report["region_model"] == str(region_model)
    assert report["regions"], "the default model finds the phantom's nodule at 0.3"
    for region in report["regions"]:
        opinion = region["second_opinion"]
        assert opinion["model"] == "tiny-region" and opinion["target_class"] == "malignant"
        assert set(opinion["probabilities"]) == {"benign", "malignant"}
        assert opinion["probability"] == opinion["probabilities"]["malignant"]
        centre = ", ".join(f"{c:.1f}" for c in region["centroid_ras"])
        # one line per region: where, how big, how hot, its HU, and the region model's answer
        assert (
            f"  {region['name']}: {region['volume_ml']:.2f} ml, centre RAS ({centre}) mm, peak "
            f"{region['peak_cam']:.2f}, mean {region['mean_hu']:.0f} HU, tiny-region P(malignant) = "
            f"{opinion['probability']:.3f}"
        ) in printed
    assert "second_opinion" in report["timings_s"]


def test_the_bundled_malignancy_model_is_an_ensemble_explained_on_a_roi(chest):
    """lidc-malignancy: a region_net of 5 folds x 2 scales with 4 mirror images, whose LayerCAM at
    its tap averages every member's map, explained on a roi through the ordinary path."""
    loaded = load_model("lidc-malignancy")
    card = loaded.card
    assert card.input == "roi" and card.cam_method == "layercam" and card.architecture == "region_net"
    assert card.target_layer == "tap" and loaded.target_layer is loaded.module.tap
    assert len(loaded.module.members) == card.training["ensemble"]["members"] == 10
    assert card.kwargs["flips"] == 4 and card.kwargs["views"] == [[24, 1], [48, 2]]
    # the card says what it reaches against the diameter alone, on the same patients
    assert {"diameter_baseline", "size_bands", "cross_validation", "heat_map"} <= set(card.metrics)
    exp = explain(chest.volume, model="lidc-malignancy", device="cpu", roi=(NODULE_RAS, 30.0))
    assert exp.method == "layercam" and exp.n_patches == 1
    assert sum(exp.probabilities.values()) == pytest.approx(1.0) and exp.cam.array.max() > 0
