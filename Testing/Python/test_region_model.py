"""Region models (card ``input: roi``, e.g. malignancy): explained on one patch centred on a region
the user gives, never over a whole scan: the library, the command line and the MRML layer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from LungGradCAMLib import phantom
from LungGradCAMLib.core.errors import InvalidInputError
from LungGradCAMLib.engine.models import ModelCard, build_model, load_model, save_model
from LungGradCAMLib.pipeline import explain

NODULE_RAS = (60.0, 20.0, -150.0)


@pytest.fixture(scope="module")
def region_model(tmp_path_factory):
    """An untrained narrow gradcam3d_cnn whose card says it judges a region (benign vs malignant)."""
    import torch

    torch.manual_seed(0)
    module = build_model("gradcam3d_cnn", width=2).eval()
    head = module.head[-1]
    with torch.no_grad():  # "malignant" = +mean of the last features: a CAM that is not all zero
        head.weight.copy_(torch.stack([-torch.ones(head.in_features), torch.ones(head.in_features)]) / head.in_features)
        head.bias.zero_()
    card = ModelCard(architecture="gradcam3d_cnn", kwargs={"width": 2}, class_names=["benign", "malignant"],
                     cam_class="malignant", target_layer="features.act6", patch_size=[16, 16, 16],
                     spacing_mm=[2.0, 2.0, 2.0], name="tiny-region", input="roi")
    return save_model(module, card, tmp_path_factory.mktemp("models") / "tiny-region.safetensors")


@pytest.fixture(scope="module")
def chest():
    nodule = phantom.NoduleSpec(center_ras=NODULE_RAS, diameter_mm=14.0, malignant=True)
    return phantom.chest_ct(seed=3, shape=(40, 96, 96), spacing_mm=(3.6, 3.6, 6.0), nodules=[nodule])


def test_a_region_model_refuses_a_whole_scan(chest, region_model):
    assert load_model(region_model).card.input == "roi"
    with pytest.raises(InvalidInputError, match="judges a region around ONE nodule"):
        explain(chest.volume, model=str(region_model), device="cpu")
    with pytest.raises(InvalidInputError, match="judges a region"):
        explain(chest.volume, model=str(region_model), device="cpu", mode="sliding", roi=(NODULE_RAS, 20.0))


def test_a_region_model_sees_one_patch_centred_on_the_region(chest, region_model):
    exp = explain(chest.volume, model=str(region_model), device="cpu", roi=(NODULE_RAS, 60.0))
    assert exp.extra["mode"] == "roi" and exp.extra["n_patches"] == 1  # a 60 mm ROI, still one 32 mm patch
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
    from LungGradCAMLib.core.volume import write_volume

    ct = write_volume(chest.volume, tmp_path / "ct.nrrd")
    assert main(["run", str(ct), "--out", str(tmp_path / "no-roi"), "--model", str(region_model),
                 "--device", "cpu"]) == 2
    assert "judges a region" in capsys.readouterr().err
    assert not (tmp_path / "no-roi" / "report.json").exists()
    roi = ",".join(str(v) for v in NODULE_RAS) + ",30"
    assert main(["run", str(ct), "--out", str(tmp_path / "roi"), "--model", str(region_model),
                 "--device", "cpu", f"--roi={roi}"]) == 0
    report = json.loads((tmp_path / "roi" / "report.json").read_text())
    assert report["model"]["input"] == "roi" and report["mode"] == "roi"
