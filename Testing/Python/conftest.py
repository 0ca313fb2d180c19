"""Shared pytest fixtures: the real data folder and deterministic phantoms."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Real CT data (../shared/data beside the checkout); tests using it skip when it is absent.
DATA_DIR = REPO.parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    """Path under the shared real-data folder, or skip the test when it is not there."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def small_phantom():
    """A small deterministic chest phantom (seed 0) with default nodules, shared by tests."""
    from LungGradCAMLib import phantom

    return phantom.chest_ct(seed=0, shape=(48, 96, 96), spacing_mm=(3.0, 3.0, 5.0))


#: Exit status of :func:`run_on_read_only_mount` when no read-only mount can be made here.
NO_MOUNT = 97


def run_on_read_only_mount(folder: Path, command: list, **kwargs):
    """Run ``command`` (subprocess.run ``kwargs``) where ``folder`` is a read-only bind mount: in a
    private mount namespace (``unshare``), so that even root cannot write there and nothing
    outside the command sees it. Skips the test where no such mount can be made."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    script = f'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit {NO_MOUNT}; shift; exec "$@"'
    result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", str(folder),
                             *[str(c) for c in command]], **kwargs)
    stderr = result.stderr if isinstance(result.stderr, str) else (result.stderr or b"").decode("utf-8", "replace")
    if result.returncode == NO_MOUNT or stderr.startswith("unshare:"):
        pytest.skip(f"no read-only mount can be made here: {stderr.strip()[-200:]}")
    return result


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
    card = ModelCard(architecture="gradcam3d_cnn", kwargs={"width": 2}, class_names=["benign", "malignant"],
                     cam_class="malignant", target_layer="features.act6", patch_size=[16, 16, 16],
                     spacing_mm=[2.0, 2.0, 2.0], name="tiny-region", input="roi")
    return save_model(module, card, tmp_path_factory.mktemp("models") / "tiny-region.safetensors")
