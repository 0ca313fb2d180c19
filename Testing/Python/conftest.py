"""Shared pytest fixtures: deterministic phantoms and a region model (helpers.py holds the shared functions)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_phantom():
    """A larger chest phantom (seed 0, 48 x 96 x 96 voxels of 3 x 3 x 5 mm) with its truth (nodules,
    tissues), for tests that need nodules a model grid resolves; ``chest`` where a CT is enough."""
    from LungGradCAMLib import phantom

    return phantom.chest_ct(seed=0, shape=(48, 96, 96), spacing_mm=(3.0, 3.0, 5.0))


@pytest.fixture(scope="session")
def nodule_chest():
    """The Slicer module self-test's phantom: one 20 mm malignant nodule at helpers.NODULE_RAS, at a
    clinical resolution (64 x 192 x 192 voxels of 1.8 x 1.8 x 3 mm)."""
    from helpers import chest_with_nodule

    return chest_with_nodule()


@pytest.fixture(scope="session")
def region_model(tmp_path_factory):
    """An untrained narrow gradcam3d_cnn whose card says it judges a region (benign vs malignant)."""
    import torch

    from LungGradCAMLib.engine.models import ModelCard, build_model, save_model

    torch.manual_seed(0)
    module = build_model("gradcam3d_cnn", width=2).eval()
    head = module.head[-1]
    with torch.no_grad():  # "malignant" = +mean of the last features: a CAM that is not all zero
        head.weight.copy_(torch.stack([-torch.ones(head.in_features), torch.ones(head.in_features)]) / head.in_features)
        head.bias.zero_()
    card = ModelCard(
        architecture="gradcam3d_cnn",
        kwargs={"width": 2},
        class_names=["benign", "malignant"],
        cam_class="malignant",
        target_layer="features.act6",
        patch_size=[16, 16, 16],
        spacing_mm=[2.0, 2.0, 2.0],
        name="tiny-region",
        input="roi",
    )
    return save_model(module, card, tmp_path_factory.mktemp("models") / "tiny-region.safetensors")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A whole-volume tiny model (one pass over the CT at 8 mm): fast on CPU."""
    from helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model"), name="whole", patch=None, spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="session")
def chest():
    """The small chest phantom's CT (helpers.small_chest, seed 3) that a run explains in seconds."""
    from helpers import small_chest

    return small_chest(seed=3).volume
