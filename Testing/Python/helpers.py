"""What several test modules share: paths, the real-data folder, a read-only mount, tiny models,
test networks and inputs, Slicer DICOM databases, LIDC VOI folders and folder snapshots
(``from helpers import ...``)."""

from __future__ import annotations

import csv
import hashlib
import os
import sqlite3
import stat
from collections import OrderedDict
from contextlib import closing
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from LungGradCAMLib import phantom
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.engine.models import ModelCard, build_model, save_model
from LungGradCAMLib.io.volume_files import write_volume
from LungGradCAMLib.training.data import PatchSet

REPO = Path(__file__).resolve().parents[2]

#: Real CT data (../shared/data beside the checkout); tests using it skip when it is absent.
DATA_DIR = REPO.parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    """Path under the shared real-data folder, or skip the test when it is not there."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


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
    result = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", str(folder), *[str(c) for c in command]],
        **kwargs,
    )
    stderr = result.stderr if isinstance(result.stderr, str) else (result.stderr or b"").decode("utf-8", "replace")
    if result.returncode == NO_MOUNT or stderr.startswith("unshare:"):
        pytest.skip(f"no read-only mount can be made here: {stderr.strip()[-200:]}")
    return result


def snapshot(root: Path) -> Dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): file contents' SHA-256, link targets,
    other types; unreadable files (chmod 000) by size and modification time."""
    entries: Dict[str, tuple] = {}
    for folder, dirs, names in os.walk(root):
        for name in sorted(dirs + names):
            p = Path(folder) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                try:
                    entries[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
                except PermissionError:
                    entries[rel] = ("unreadable", st.st_size, st.st_mtime_ns)
            else:
                entries[rel] = ("type", stat.S_IFMT(st.st_mode))
    return entries


def small_chest(seed: int = 3) -> phantom.Phantom:
    """The small chest phantom that a run explains in seconds: 28 x 64 x 64 voxels (k, j, i) of
    4.5 x 4.5 x 8 mm; ``seed`` picks its anatomy, nodules and noise. The ``chest`` fixture
    (conftest.py) is seed 3's volume."""
    return phantom.chest_ct(seed=seed, shape=(28, 64, 64), spacing_mm=(4.5, 4.5, 8.0))


#: Where the phantoms with one nodule hold it (RAS mm): in the right lung, as the Slicer module's
#: self-test does.
NODULE_RAS = (60.0, 20.0, -150.0)


def chest_with_nodule(diameter_mm: float = 20.0, shape=(64, 192, 192), spacing_mm=(1.8, 1.8, 3.0)) -> phantom.Phantom:
    """A chest phantom (seed 3) whose only nodule, malignant, ``diameter_mm`` across, is centred on
    NODULE_RAS. ``shape`` in voxels (k, j, i), ``spacing_mm`` (i, j, k); by default the self-test's:
    a clinical resolution, inside what the bundled model was trained on (1.6-2 mm in-plane, 2-3 mm
    slices)."""
    nodule = phantom.NoduleSpec(center_ras=NODULE_RAS, diameter_mm=diameter_mm, malignant=True)
    return phantom.chest_ct(seed=3, shape=shape, spacing_mm=spacing_mm, nodules=[nodule])


def make_tiny_model(folder, name="tiny", patch=(16, 16, 16), spacing=(4.0, 4.0, 4.0), seed=0):
    """An untrained, narrow gradcam3d_cnn saved as a model file (fast enough for every test).

    Its head is set so that "nodule" = +mean of the last features and "background" = -mean: the
    CAM of "nodule" is then positive wherever the last layer responds (a random head may give an
    all-zero Grad-CAM, which would test nothing)."""
    import torch

    torch.manual_seed(seed)
    module = build_model("gradcam3d_cnn", width=2).eval()
    head = module.head[-1]
    with torch.no_grad():
        head.weight.copy_(torch.stack([-torch.ones(head.in_features), torch.ones(head.in_features)]) / head.in_features)
        head.bias.zero_()
    card = ModelCard(
        architecture="gradcam3d_cnn",
        kwargs={"width": 2},
        class_names=["background", "nodule"],
        cam_class="nodule",
        target_layer="features.act6",
        patch_size=None if patch is None else list(patch),
        spacing_mm=list(spacing),
        name=name,
        description="untrained test model",
    )
    return save_model(module, card, folder / f"{name}.safetensors")


def make_ctk_db(folder, dicom_dir):
    """A Slicer DICOM database in ``folder`` indexing the series under ``dicom_dir``: the user's
    command (``lunggradcam dicom-db``, :func:`~LungGradCAMLib.io.ctkdb_write.make_dicom_database`)."""
    from LungGradCAMLib.io.ctkdb_write import make_dicom_database

    return make_dicom_database(dicom_dir, folder).path


def make_database(folder: Path, files, version: Optional[str] = None) -> Path:
    """A Slicer DICOM database in ``folder`` indexing ``files`` (none: an empty one) with
    LungGradCAM's writer, its SchemaInfo version then set to ``version`` when given (another
    CTK schema, or a broken one)."""
    from LungGradCAMLib.io.ctkdb_write import create_dicom_database, make_dicom_database

    path = make_dicom_database(list(files), folder).path if files else create_dicom_database(folder)
    if version is not None:
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE SchemaInfo SET Version = ?", (version,))
    return path


STAMP = "2026-01-01 12:00:00"

#: pydicom 3 or newer; Slicer 5.8 and 5.10 bundle pydicom 2.4.4 (`make test-slicer58` runs on it).
PYDICOM_3 = int(pydicom.__version__.split(".")[0]) >= 3


def encoder_available(syntax) -> bool:
    """Whether this pydicom can encode ``syntax`` (pydicom 2 encodes RLE only)."""
    try:
        from pydicom.pixels import get_encoder  # pydicom >= 3
    except ImportError:
        from pydicom.encoders import get_encoder
    try:
        return get_encoder(syntax).is_available
    except NotImplementedError:
        return False


SHAPE = (8, 8, 8)


def make_net(
    classes: int = 3, inplace: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Sequential:
    """conv-ReLU-pool-BN-conv-ReLU-linear: the CAM layer (act2) is 6 x 4^3 and the linear head
    makes the gradient vary in space, so every method gives a different map."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv3d(1, 4, 3, padding=1)),
                ("act1", nn.ReLU(inplace=inplace)),
                ("pool1", nn.MaxPool3d(2)),
                ("bn1", nn.BatchNorm3d(4)),
                ("conv2", nn.Conv3d(4, 6, 3, padding=1)),
                ("act2", nn.ReLU(inplace=inplace)),
                ("flat", nn.Flatten()),
                ("fc", nn.Linear(6 * 4**3, classes)),
            ]
        )
    )
    with torch.no_grad():  # BN statistics that are not the identity
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
    return net.to(dtype).eval()


def make_input(n: int = 2, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1) + SHAPE, generator=g, dtype=dtype)


def write_voi_folder(root, rows):
    """A LIDC VOI folder: for each (patient, nodule, diagnosis, radius_vox) a 12x20x20 VOI at
    0.8 x 0.8 x 1.25 mm with a ball of +40 HU in -850 HU lung and its mask."""
    (root / "image").mkdir(parents=True)
    (root / "nodule_mask").mkdir()
    m = axis_aligned_matrix((0.8, 0.8, 1.25), (10.0, 20.0, -100.0))
    k, j, i = np.indices((12, 20, 20))
    with open(root / "nodules.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "nodule_id", "Diagnosis", "diameter_mm", "Malignancy_value"])
        for patient, nodule, diagnosis, r in rows:
            ball = ((k - 6) * 1.25) ** 2 + ((j - 10) * 0.8) ** 2 + ((i - 10) * 0.8) ** 2 <= (r * 0.8) ** 2
            hu = np.where(ball, 40, -850).astype(np.int16)
            name = f"{patient}_R_{nodule}.nii.gz"
            write_volume(Volume(hu, m), root / "image" / name)
            write_volume(Volume(ball.astype(np.int16), m), root / "nodule_mask" / name)
            w.writerow([patient, nodule, diagnosis, 2 * r * 0.8, 4 if diagnosis == "Malign" else 2])


#: The training tests' patches: 16^3 voxels of 2 mm, classes background and nodule.
SPHERES_SIZE = 16
SPHERES_CLASSES = ["background", "nodule"]


def spheres_patches(n_patients: int = 8, per_class: int = 4, seed: int = 0) -> PatchSet:
    """Noisy lung-like patches (about -800 HU): nodules are 20 HU balls near the centre,
    background holds a 20 HU tube (a vessel) through a random point along a random axis."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[:SPHERES_SIZE, :SPHERES_SIZE, :SPHERES_SIZE].astype(np.float32)
    patches, labels, patients = [], [], []
    for p in range(n_patients):
        for label in (0, 1) * per_class:
            x = rng.normal(-800, 60, (SPHERES_SIZE, SPHERES_SIZE, SPHERES_SIZE)).astype(np.float32)
            c = SPHERES_SIZE / 2 + rng.uniform(-2, 2, 3)
            if label:
                inside = (k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2 <= rng.uniform(2, 4) ** 2
            else:
                axis = rng.integers(3)
                d = [(g - cc) ** 2 for g, cc in zip((k, j, i), c)]
                inside = sum(v for a, v in enumerate(d) if a != axis) <= 1.5**2
            x[inside] = 20.0
            patches.append(x)
            labels.append(label)
            patients.append(f"p{p}")
    return PatchSet(np.rint(patches).astype(np.int16), labels, patients, SPHERES_CLASSES, (2.0, 2.0, 2.0))


def spheres_card(**kw) -> ModelCard:
    return ModelCard(
        "gradcam3d_cnn",
        {"width": 4, "num_classes": 2},
        SPHERES_CLASSES,
        "nodule",
        "features.act6",
        patch_size=[SPHERES_SIZE] * 3,
        spacing_mm=[2.0] * 3,
        name="spheres",
        **kw,
    )


#: `lunggradcam train` arguments for a cache of :func:`spheres_patches`.
TRAIN_ARGS = [
    "--source",
    "patches",
    "--patch-size",
    "16",
    "16",
    "16",
    "--spacing",
    "2",
    "2",
    "2",
    "--arch-kwargs",
    '{"width": 4}',
    "--batch-size",
    "16",
    "--no-progress",
]


def gapped_series_batch(tmp_path: Path, chest, tiny) -> "tuple[Path, list]":
    """A DICOM series of ``chest`` (a Volume) with slice 14 missing in ``tmp_path/dicom/gap``: the
    loader fills the gap, so no DICOM SEG can reference the slices. Returns the batch's output
    folder and the ``batch`` arguments over ``tmp_path/dicom`` with model ``tiny`` at threshold 0."""
    files = phantom.write_dicom_series(chest, tmp_path / "dicom" / "gap")
    files[14].unlink()
    out = tmp_path / "out"
    args = ["batch", str(tmp_path / "dicom"), "--out", str(out), "--model", str(tiny), "--device", "cpu"]
    return out, args + ["--threshold", "0"]
