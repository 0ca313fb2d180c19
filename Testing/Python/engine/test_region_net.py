"""The region model as an ensemble (``region_net``): members at two scales, test-time flips, their
outputs and CAMs averaged, image features fused; loaded and explained through the ordinary
``load_model``/``explain`` path; trained by cross-validation and reproduced by ``evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LungGradCAMLib import phantom
from LungGradCAMLib.engine.cam import compute_cam
from LungGradCAMLib.engine.models import ModelCard, build_model, load_model, save_model
from LungGradCAMLib.engine.models.features import image_features
from LungGradCAMLib.pipeline import explain

from helpers import NODULE_RAS, chest_with_nodule

MEMBER = {"width": 4, "cam_pools": 2, "head": "attention", "evidence_channels": 4}


def _net(**kwargs):
    torch.manual_seed(kwargs.pop("seed", 0))
    net = build_model("region_net", **{"member": MEMBER, **kwargs}).eval()
    with torch.no_grad():  # untrained batch norms would make every member nearly the same
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def test_flips_are_undone_exactly():
    """With all 8 mirror images a mirrored input gives the same output: each image's evidence is
    mirrored back before it is averaged, on both scales (a crop and a pooled view)."""
    net = _net(views=[[16, 1], [32, 2]], flips=8)
    x = torch.rand(2, 1, 32, 32, 32)
    out = net(x)
    for dims in ((4,), (3,), (2,), (2, 3, 4)):
        assert torch.allclose(net(x.flip(dims)), out, atol=1e-5), dims


def test_an_ensemble_averages_its_members_outputs_and_cams():
    ensemble = _net(views=[[16, 1]], members=2, flips=2, seed=1)
    singles = []
    for m in range(2):
        single = build_model("region_net", member=MEMBER, views=[[16, 1]], members=1, flips=2).eval()
        single.members[0].load_state_dict(ensemble.members[m].state_dict())
        singles.append(single)
    x = torch.rand(3, 1, 24, 24, 24)
    with torch.no_grad():
        assert torch.allclose(ensemble(x), (singles[0](x) + singles[1](x)) / 2, atol=1e-5)
    # LayerCAM at the tap: the members' maps side by side, so the ensemble's map is their mean
    cams = [compute_cam(m, x, method="layercam", layer="tap", target=1, normalize=False) for m in [ensemble] + singles]
    assert torch.allclose(cams[0], (cams[1] + cams[2]) / 2, atol=1e-5 * float(cams[0].max()))
    assert float(cams[0].max()) > 0


def test_a_crop_views_evidence_is_in_its_place():
    """The central-crop member's CAM lies inside the crop: the tap's grid covers the whole patch."""
    net = _net(views=[[16, 1]])
    cam = compute_cam(net, torch.rand(1, 1, 32, 32, 32), method="layercam", layer="tap", target=1, upsample=False)
    assert cam.shape == (1, 16, 16, 16)  # the patch at 2 voxels per cell
    inside = torch.zeros_like(cam, dtype=torch.bool)
    inside[:, 4:12, 4:12, 4:12] = True
    assert float(cam[~inside].abs().max()) == 0 and float(cam[inside].max()) > 0


def test_the_fusion_is_a_logistic_regression_of_views_and_features():
    net = _net(views=[[16, 1], [32, 2]], features=["radial_extent"])
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        net.fusion.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.0]]))
        net.fusion.bias.fill_(0.25)
        out = net(x)
        per_view = [(m(x[:, :, 8:24, 8:24, 8:24]) if v == 0 else None) for v, m in enumerate(net.members[:1])]
        z0 = per_view[0][:, 1] - per_view[0][:, 0]
        pooled = torch.nn.functional.avg_pool3d(x, 2)
        z1 = net.members[1](pooled)[:, 1] - net.members[1](pooled)[:, 0]
        t = 0.25 + 0.5 * z0 - 1.0 * z1 + 2.0 * net.standardised_features(x)[:, 0]
    assert torch.allclose(out[:, 1] - out[:, 0], t, atol=1e-5)
    with pytest.raises(Exception, match="unknown image feature"):
        build_model("region_net", member=MEMBER, features=["diameter_mm"])


def test_image_features_measure_the_central_nodule_not_the_vessel_beside_it():
    """A 10 mm ball of +40 HU in -850 HU lung with a 1-voxel vessel running through it: the shells
    around the centre are solid out to the ball's radius (the vessel fills no shell), the mean HU
    is the ball's."""
    k, j, i = np.indices((48, 48, 48)) - 23.5
    distance = np.sqrt(k**2 + j**2 + i**2)
    ball = distance <= 5.0
    hu = np.where(ball, 40.0, -850.0)
    hu[24, 24, :] = 0.0  # a thin vessel through the patch
    x = torch.from_numpy(hu).float()[None, None]
    radius, mean_hu = image_features(x, 1.0, ["radial_extent"])[0].numpy()
    assert radius == 5.0
    assert mean_hu == pytest.approx(hu[distance < 5.0].mean() / 1000, abs=1e-6)  # 40 HU less the vessel's line
    assert image_features(x, 0.5, ["radial_extent"])[0, 0] == 2.5  # the same shells at 0.5 mm voxels
    profile = image_features(x, 1.0, ["density_profile"])[0].numpy()
    assert profile[0] == 1.0 and profile[1] < 1.0 and np.all(np.diff(profile) < 0)
    empty = image_features(torch.full((1, 1, 48, 48, 48), -850.0), 1.0, ["radial_extent", "density_profile"])
    assert empty[0, 0] == 0 and empty[0, 1] == pytest.approx(-0.85) and torch.all(empty[0, 2:] == 0)


def test_an_ensemble_region_model_loads_and_explains_through_the_public_api(tmp_path):
    net = _net(views=[[16, 1], [32, 2]], members=2, flips=2, features=["density_profile"], voxel_mm=2.0)
    card = ModelCard(
        "region_net",
        dict(net.init_kwargs),
        ["benign", "malignant"],
        "malignant",
        "tap",
        patch_size=[32, 32, 32],
        spacing_mm=[2.0, 2.0, 2.0],
        name="tiny-ensemble",
        input="roi",
        cam_method="layercam",
    )
    path = save_model(net, card, tmp_path / "ensemble.safetensors")
    loaded = load_model(path, device="cpu")
    assert len(loaded.module.members) == 4 and loaded.target_layer is loaded.module.tap
    chest = chest_with_nodule(14.0, shape=(40, 96, 96), spacing_mm=(3.6, 3.6, 6.0))
    exp = explain(chest.volume, model=str(path), device="cpu", roi=(NODULE_RAS, 40.0))
    assert exp.method == "layercam" and exp.layer == "tap" and exp.n_patches == 1
    assert sum(exp.probabilities.values()) == pytest.approx(1.0)
    assert exp.cam.array.max() > 0 and exp.cam.shape == chest.volume.shape


@pytest.mark.slow
def test_train_bundles_cross_validation_members_and_evaluate_reproduces_the_card(tmp_path, capsys):
    """``train --arch region_net --folds K``: members per view and fold, the fusion fitted out of
    fold, one bundled file whose held-out figures ``evaluate`` reproduces exactly."""
    from LungGradCAMLib.cli import main
    from LungGradCAMLib.io.volume_files import write_volume

    from helpers import write_voi_folder

    root = tmp_path
    write_voi_folder(root / "vois", [(f"P{n}", 1, "Malign" if n % 2 else "Benign", 2 + n % 4) for n in range(12)])
    chest = phantom.chest_ct(seed=2, shape=(48, 96, 96), spacing_mm=(3.6, 3.6, 5.0))
    write_volume(chest.volume, root / "chest.nrrd")
    (root / "backgrounds.csv").write_text("image,split\nchest.nrrd,bands\n")
    kwargs = {"member": MEMBER, "views": [[8, 1], [16, 2]], "flips": 2, "features": ["radial_extent"]}
    assert (
        main(
            [
                "train",
                "--source",
                "lidc-vois",
                "--path",
                str(root / "vois"),
                "--task",
                "malignancy",
                "--backgrounds",
                str(root / "backgrounds.csv"),
                "--placements",
                "2",
                "--patch-size",
                "16",
                "16",
                "16",
                "--spacing",
                "2",
                "2",
                "2",
                "--arch",
                "region_net",
                "--arch-kwargs",
                json.dumps(kwargs),
                "--mask-loss",
                "1",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--no-progress",
                "--device",
                "cpu",
                "--folds",
                "3",
                "--test-fraction",
                "0.25",
                "--name",
                "tiny-region",
                "--out",
                str(root / "out"),
            ]
        )
        == 0
    )
    card = ModelCard.load(root / "out" / "region.json")
    ensemble = card.training["ensemble"]
    assert card.kwargs["members"] == 3 and ensemble["members"] == 6 and card.input == "roi"
    assert card.training["config"]["mask_loss"] == 1.0  # the members' training, for the retraining test
    assert len(ensemble["fusion"]["weights"]) == 2 + 2
    folds = [set(p) for p in ensemble["fold_patients"].values()]
    test = set(card.training["split"]["test_patients"])
    assert not test & set().union(*folds) and sum(len(f) for f in folds) == len(set().union(*folds))
    for v in (1, 2):
        for k in (1, 2, 3):
            member = ModelCard.load(root / "out" / f"view{v}" / f"fold{k}" / "best.json")
            assert not set(member.training["split"]["train_patients"]) & (
                test | set(member.training["split"]["test_patients"])
            )
    cv = card.metrics["cross_validation"]
    assert {"model", "view1_alone", "view2_alone", "networks_without_features"} <= set(cv)
    assert "diameter_baseline" in cv["model"] and len(cv["model"]["size_bands"]) == 4
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(root / "out" / "region.safetensors"),
                "--out",
                str(root / "eval"),
                "--device",
                "cpu",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    report = json.loads((root / "eval" / "report.json").read_text())
    strict = json.loads(json.dumps(report).replace("NaN", "null"))
    assert {k: strict["metrics"][k] for k in card.metrics if k in strict["metrics"]} == {
        k: card.metrics[k] for k in strict["metrics"]
    }
    assert strict["diameter_baseline"] == card.metrics["diameter_baseline"]


def test_the_heat_map_retraining_test_runs_on_real_nodule_outlines(tmp_path, capsys):
    """``evaluate --cam-retrain`` on a region model whose card names LIDC VOIs: the card's data, the
    readers' outlines as the truth masks, one member of its architecture, its outline loss."""
    from LungGradCAMLib.cli import main

    from helpers import write_voi_folder

    write_voi_folder(tmp_path / "vois", [(f"P{n}", 1, "Malign" if n % 2 else "Benign", 2 + n % 4) for n in range(8)])
    net = _net(views=[[8, 1], [16, 2]], members=2, flips=2)
    spec = {"source": "lidc-vois", "path": str(tmp_path / "vois"), "task": "malignancy", "placements": 2}
    card = ModelCard(
        "region_net",
        dict(net.init_kwargs),
        ["benign", "malignant"],
        "malignant",
        "tap",
        patch_size=[16, 16, 16],
        spacing_mm=[2.0, 2.0, 2.0],
        name="tiny-ensemble",
        input="roi",
        cam_method="layercam",
        training={"data_spec": spec, "config": {"mask_loss": 1.0}},
    )
    path = save_model(net, card, tmp_path / "ensemble.safetensors")
    out = tmp_path / "retrain"
    assert (
        main(
            [
                "evaluate",
                "--cam-retrain",
                "--model",
                str(path),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--retrain-arch-kwargs",
                '{"members": 1, "views": [[8, 1]], "flips": 1}',
                "--retrain-epochs",
                "1",
                "--val-fraction",
                "0.5",
                "--bootstrap",
                "20",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    saved = json.loads((out / "cam_retrain.json").read_text())
    assert set(saved["accuracy"]) == {"original", "cam", "truth", "inverted"}
    assert saved["settings"]["cam_method"] == "layercam" and saved["settings"]["kwargs"]["members"] == 1
    assert saved["settings"]["train_config"]["mask_loss"] == 1.0
    assert saved["data"]["train"]["patches"] + saved["data"]["validation"]["patches"] == 16
    for variant in ("original", "cam", "truth", "inverted"):
        assert ModelCard.load(out / variant / "best.json").kwargs["views"] == [[8, 1]]
