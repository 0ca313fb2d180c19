"""Architectures, model cards, saving and (hostile-file-proof) loading."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

from LungGradCAMLib.core.errors import CamError, ModelError
from LungGradCAMLib.engine.models import ARCHITECTURES, ModelCard, available_models, build_model, load_model, save_model
from LungGradCAMLib.engine.models.networks import SEGMENTERS

SMALL_KWARGS = {
    "gradcam3d_cnn": {"width": 4},
    "small3d_cnn": {"channels": [4, 8, 8], "hidden": [16, 8]},
    "resnet18_3d": {"base_width": 4, "stem_stride": 1, "stem_pool": False},
    "region_net": {"member": {"width": 4, "cam_pools": 2, "head": "attention"}, "views": [[16, 1]]},
    "unet3d": {"width": 2, "depth": 2, "num_classes": 2},
}


def _card(arch="gradcam3d_cnn", **over) -> ModelCard:
    fields = dict(
        architecture=arch,
        kwargs=dict(SMALL_KWARGS[arch]),
        class_names=["background", "nodule"],
        cam_class="nodule",
        target_layer=ARCHITECTURES[arch].cam_layer,
        patch_size=[16, 16, 16],
        spacing_mm=[1.5, 1.5, 1.5],
        name="tiny",
        output="mask" if arch in SEGMENTERS else "classes",
    )
    fields.update(over)
    return ModelCard(**fields)


def _saved(tmp_path, arch="gradcam3d_cnn", seed=0):
    torch.manual_seed(seed)
    card = _card(arch)
    module = build_model(arch, **card.kwargs)
    path = save_model(module, card, tmp_path / "tiny.safetensors")
    return module, path


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_forward_and_cam_layer(arch):
    module = build_model(arch, **SMALL_KWARGS[arch]).eval()
    seen = {}
    module.get_submodule(module.cam_layer).register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    out = module(torch.randn(2, 1, 16, 24, 32))
    # a segmenter gives logits per voxel, on the input's grid (any size: padded inside, cropped back)
    assert out.shape == ((2, 2, 16, 24, 32) if arch in SEGMENTERS else (2, 2))
    # the CAM layer keeps a spatial grid (not collapsed to one voxel) for 16-32 voxel patches
    assert len(seen["shape"]) == 5 and min(seen["shape"][2:]) >= 2


def test_gradcam3d_cnn_paper_widths():
    module = build_model("gradcam3d_cnn")
    convs = [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs == [32, 64, 128, 128, 256, 512]
    kernels = [m.kernel_size for m in module.modules() if isinstance(m, torch.nn.Conv3d)]
    assert kernels[-2:] == [(1, 1, 1), (1, 1, 1)]
    # whole-volume input works (paper: 64 x 512 x 512; smaller here to stay fast)
    assert module.eval()(torch.zeros(1, 1, 16, 64, 64)).shape == (1, 2)


def test_gradcam3d_cnn_with_two_pools_before_the_cam_layer():
    """cam_pools=2: the same layers and weights, no pool before convolutions 5 and 6, so the CAM
    layer keeps twice the resolution (6 cells a side on a 24-voxel patch instead of 3)."""
    shapes = {}
    for pools in (3, 2):
        module = build_model("gradcam3d_cnn", width=2, cam_pools=pools).eval()
        module.features.act6.register_forward_hook(lambda m, i, o, pools=pools: shapes.update({pools: o.shape[2:]}))
        assert module(torch.zeros(1, 1, 24, 24, 24)).shape == (1, 2)
    assert shapes == {3: (3, 3, 3), 2: (6, 6, 6)}
    coarse, fine = (build_model("gradcam3d_cnn", width=2, cam_pools=p) for p in (3, 2))
    assert coarse.state_dict().keys() == fine.state_dict().keys()
    with pytest.raises(ModelError, match="cam_pools"):
        build_model("gradcam3d_cnn", cam_pools=1)


@pytest.mark.parametrize("arch", ["gradcam3d_cnn", "small3d_cnn"])
def test_every_voxel_reaches_the_output(arch):
    # 24 is not a multiple of 16: a floor-mode pool would drop the last voxels of each axis
    torch.manual_seed(0)  # a random initialisation can leave a zero input's gradient all zero (dead ReLUs)
    module = build_model(arch, **SMALL_KWARGS[arch]).eval()
    x = torch.zeros(1, 1, 24, 24, 24, requires_grad=True)
    module(x)[0, 1].backward()
    reached = x.grad[0, 0].abs() > 0
    assert reached[-1].any() and reached[:, -1].any() and reached[:, :, -1].any()


def test_build_model_errors():
    with pytest.raises(ModelError, match="unknown architecture 'nope'"):
        build_model("nope")
    with pytest.raises(ModelError, match="no argument"):
        build_model("gradcam3d_cnn", depth=3)
    with pytest.raises(ModelError, match="cannot build"):
        build_model("small3d_cnn", channels=[1, 2])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_save_load_roundtrip(tmp_path, arch):
    module, path = _saved(tmp_path, arch)
    card_json = json.loads(path.with_suffix(".json").read_text())
    assert card_json["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_model(path, device="cpu")
    assert not loaded.module.training and loaded.card.architecture == arch
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(module.eval()(x), loaded.module(x), atol=1e-6)
    assert loaded.target_layer is loaded.module.get_submodule(ARCHITECTURES[arch].cam_layer)
    # the card path works too
    assert load_model(path.with_suffix(".json")).card == loaded.card


def test_load_by_name_from_models_dir(tmp_path, monkeypatch):
    _saved(tmp_path)
    monkeypatch.setenv("LUNGGRADCAM_MODELS", str(tmp_path))
    assert available_models() == ["tiny"]
    assert load_model("tiny").card.name == "tiny"
    with pytest.raises(ModelError, match="unknown model 'other'.*tiny"):
        load_model("other")


def test_torch_state_dict_loads_weights_only(tmp_path):
    module, path = _saved(tmp_path)
    pt = tmp_path / "tiny.pt"
    torch.save(module.state_dict(), pt)
    card = ModelCard.load(path.with_suffix(".json"))
    card.sha256 = hashlib.sha256(pt.read_bytes()).hexdigest()
    path.unlink()  # so the .pt is the weights beside tiny.json
    card.save(tmp_path / "tiny.json")
    assert load_model(pt).card.sha256 == card.sha256


def test_checksum_mismatch_and_missing_card(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_model(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="model card not found"):
        load_model(path)


def test_shape_mismatch(tmp_path):
    _, path = _saved(tmp_path)
    card = ModelCard.load(path.with_suffix(".json"))
    card.kwargs["width"] = 8  # the weights were saved at width 4
    card.save(path.with_suffix(".json"))
    with pytest.raises(ModelError, match="do not match gradcam3d_cnn"):
        load_model(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "vit_huge"}, "unknown architecture"),
        ({"cam_class": "malignant"}, "cam_class"),
        ({"patch_size": [4096, 4096, 4096]}, "patch_size"),
        ({"hu_window": [400, -1000]}, "hu_window"),
        ({"normalisation": "magic"}, "normalisation"),
        ({"clahe": "4d"}, "clahe"),
        ({"surprise": 1}, "unknown model card field"),
        ({"class_names": ["a", "b", "c"], "cam_class": "a"}, "2 outputs but the card names 3 classes"),
        ({"target_layer": "features.nope"}, "is not a layer of gradcam3d_cnn"),
        ({"output": "mask"}, "does not give the card's output 'mask'"),
        ({"output": "logits"}, "'output' must be one of"),
    ],
)
def test_bad_cards_refused(tmp_path, change, message):
    _, path = _saved(tmp_path)
    card_path = path.with_suffix(".json")
    data = json.loads(card_path.read_text())
    data.update(change)
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        load_model(path)


def test_huge_declared_model_refused_before_allocation(tmp_path):
    _, path = _saved(tmp_path)
    card_path = path.with_suffix(".json")
    data = json.loads(card_path.read_text())
    data["kwargs"]["width"] = 10**6  # ~1e14 parameters: would need petabytes if allocated
    card_path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="refusing to allocate"):
        load_model(path)


class _Payload:
    """Unpickling this object creates (opens for writing) the file ``target``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "suffix, writer",
    [
        (".pt", lambda obj, path: torch.save(obj, path)),
        (".pth", lambda obj, path: path.write_bytes(pickle.dumps(obj))),
        (".safetensors", lambda obj, path: path.write_bytes(pickle.dumps(obj))),
    ],
)
def test_pickle_payload_never_runs(tmp_path, suffix, writer):
    # prove the payload is live: plain pickle does create the file
    control = tmp_path / "control"
    with open(tmp_path / "probe.pkl", "wb") as f:
        pickle.dump(_Payload(control), f)
    with open(tmp_path / "probe.pkl", "rb") as f:
        pickle.load(f).close()
    assert control.exists()

    target = tmp_path / "pwned"
    hostile = tmp_path / f"hostile{suffix}"
    writer({"conv.weight": _Payload(target)}, hostile)
    # a card that matches the file exactly, so only the loader's refusal stands in the way
    card = _card()
    card.sha256 = hashlib.sha256(hostile.read_bytes()).hexdigest()
    card.save(hostile.with_suffix(".json"))
    with pytest.raises(ModelError, match="refused to load|not a valid safetensors"):
        load_model(hostile)
    assert not target.exists()


def test_prepare_follows_card(tmp_path):
    _, path = _saved(tmp_path)
    loaded = load_model(path)
    hu = torch.tensor([-2000.0, -1000.0, 300.0, 400.0, 3000.0]).reshape(1, 1, 1, 1, 5)
    expected = (hu.clamp(-1000, 400) + 1000) / 1400  # the card's default window, min-max
    assert torch.allclose(loaded.prepare(hu), expected)


def test_card_class_helpers():
    card = _card()
    assert card.class_index() == 1 and card.class_index("background") == 0 and card.class_index(0) == 0
    with pytest.raises(CamError, match="'tumour' is not one of"):
        card.class_index("tumour")
    assert card.probabilities_from_score(1, 0.8) == pytest.approx({"nodule": 0.8, "background": 0.2})
    assert card.summary()["cam_class"] == "nodule"


def test_model_cache_follows_the_file_and_keeps_four(tmp_path, monkeypatch):
    """cached_model loads a path once; a model replaced at the same path is loaded anew (its new
    weights, not the old ones); at most MODEL_CACHE_SIZE models are kept."""
    import os

    from LungGradCAMLib.engine import models

    from helpers import make_tiny_model

    monkeypatch.setattr(models, "_CACHE", type(models._CACHE)())
    path = make_tiny_model(tmp_path, seed=0)
    first = models.cached_model(str(path), "cpu")
    assert models.cached_model(str(path), "cpu") is first
    before = {k: v.clone() for k, v in first.module.state_dict().items()}
    stat = os.stat(path)
    make_tiny_model(tmp_path, seed=1)  # the same path, other weights (and card checksum)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    second = models.cached_model(str(path), "cpu")
    assert second is not first
    assert any(not torch.equal(before[k], v) for k, v in second.module.state_dict().items())
    assert second.card.sha256 == models.sha256_file(path)
    for n in range(models.MODEL_CACHE_SIZE + 1):
        models.cached_model(str(make_tiny_model(tmp_path, name=f"m{n}", seed=n)), "cpu")
    assert len(models._CACHE) == models.MODEL_CACHE_SIZE
