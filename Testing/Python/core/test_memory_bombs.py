"""Memory bombs: small files (CT and model) that declare huge work, refused before allocating, with
the limit and how to change it (core/limits.py); and a real run that fits under the same limit."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import SimpleITK as sitk

from LungGradCAMLib.core.volume import Volume
from LungGradCAMLib.engine.models import ModelCard, build_model
from LungGradCAMLib.io.volume_files import write_volume

from bad_inputs import AXIAL, dicom_series, model_variant, random_hu
from dicom_damage import edit
from helpers import REPO

# --------------------------------------------------------------------------------------------
# memory bombs: small files that declare huge work. Run in a child process whose address space
# is limited (RLIMIT_AS), so that a regression fails there instead of taking the machine.
# --------------------------------------------------------------------------------------------
#: Bytes of address space the child may add to what it has mapped after its imports: the
#: control run needs about 0.3 GB; every bomb declares at least 1 GB. glibc reserves 64 MiB of
#: address space per thread's malloc arena (reserved, not used memory), so the child runs with
#: MALLOC_ARENA_MAX=2: otherwise the count of threads torch and the writers start decides the test.
HEADROOM = 500_000_000
LIMITED = """
import contextlib, io, json, resource, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot, numpy, pydicom, scipy.ndimage, SimpleITK, skimage.measure, torch
from LungGradCAMLib.engine import cam, lung, models, sliding
from LungGradCAMLib import cli, pipeline
from LungGradCAMLib.pipeline import segment
from LungGradCAMLib.io import render
pages = int(open("/proc/self/statm").read().split()[0])
limit = pages * resource.getpagesize() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for name, args in json.loads(sys.argv[2]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except BaseException as exc:  # MemoryError, SystemExit, ...: what a regression raises
            code = f"{type(exc).__name__}: {exc}"
    print(json.dumps({name: {"code": code, "stderr": err.getvalue()[-3000:]}}), flush=True)
"""


def _gzip_zeros(prefix: bytes, n_zeros: int, chunk: int = 1 << 24) -> bytes:
    """A valid gzip file of ``prefix`` then ``n_zeros`` zero bytes (a multiple of ``chunk``),
    made without compressing them all: after a full flush, every chunk of zeros compresses to the
    same bytes."""
    import struct
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    for _ in range(n_zeros // chunk):
        crc = zlib.crc32(bytes(chunk), crc)
    return (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        + head
        + block * (n_zeros // chunk)
        + c.flush()
        + struct.pack("<II", crc, (len(prefix) + n_zeros) & 0xFFFFFFFF)
    )


def _bomb_nrrd_dev_zero(tmp: Path, tiny: Path, chest: Volume):
    """A 200-byte detached header whose data file is /dev/zero, declaring a billion voxels."""
    (tmp / "sub").mkdir()
    path = tmp / "sub" / "ct.nhdr"
    path.write_text(
        "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1000 1000 1000\nspacings: 1 1 1\n"
        "encoding: raw\ndata file: /dev/zero\n\n"
    )
    return [str(path), "--model", str(tiny)], "not beside the header"


def _bomb_nrrd_gzip(tmp: Path, tiny: Path, chest: Volume):
    """A 1 MB gzip NRRD of a billion zero voxels."""
    header = b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1024 1024 1024\nspacings: 1 1 1\nencoding: gzip\n\n"
    path = tmp / "ct.nrrd"
    path.write_bytes(header + _gzip_zeros(b"", 1 << 30))
    return [str(path), "--model", str(tiny)], r"needs 2\.15 GB of memory, more than the memory this process can get"


def _bomb_nifti_gzip(tmp: Path, tiny: Path, chest: Volume):
    """A 1 MB .nii.gz of a billion zero voxels: a valid NIfTI header, its dimensions made 1024^3."""
    import struct

    sitk.WriteImage(sitk.Image([1, 1, 1], sitk.sitkUInt8), str(tmp / "one.nii"))
    header = bytearray((tmp / "one.nii").read_bytes()[:352])
    header[42:48] = struct.pack("<3h", 1024, 1024, 1024)
    path = tmp / "ct.nii.gz"
    path.write_bytes(_gzip_zeros(bytes(header), 1 << 30))
    return [str(path), "--model", str(tiny)], r"needs 2\.15 GB of memory"


def _bomb_dicom_jpegls(tmp: Path, tiny: Path, chest: Volume):
    """Three tiny JPEG-LS files whose headers declare 20000 x 20000 pixels each."""
    files = dicom_series(tmp / "dicom", shape=(3, 16, 16), compression="jpeg-ls")
    for f in files:
        edit(f, lambda ds: (setattr(ds, "Rows", 20000), setattr(ds, "Columns", 20000)))
    return [str(tmp / "dicom"), "--model", str(tiny)], r"series .*\(1200000000 voxels\) needs .* GB of memory"


def _bomb_model_deflate(tmp: Path, tiny: Path, chest: Volume):
    """A torch model file (a zip) whose first tensor's entry unpacks to 512 MiB of zeros, 3 MB on disk."""
    import zipfile

    import torch

    card = ModelCard.load(tiny.with_suffix(".json"))
    card.kwargs = {"width": 24}
    torch.save(build_model("gradcam3d_cnn", width=24).state_dict(), tmp / "plain.pt")
    path = tmp / "bomb.pt"
    with (
        zipfile.ZipFile(tmp / "plain.pt") as src,
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst,
    ):
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                with dst.open(info.filename, "w", force_zip64=True) as f:
                    for _ in range(32):
                        f.write(bytes(1 << 24))
            else:
                dst.writestr(info.filename, data)
    card.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    card.save(path.with_suffix(".json"))
    ct = write_volume(Volume(random_hu((8, 16, 16)), AXIAL), tmp / "ct.nrrd")
    return [str(ct), "--model", str(path)], r"unpack to 5388\d+ bytes, more than the \d+ the card's network can hold"


def _bomb_card(change: Dict[str, Any], expected: str):
    """The tiny model with a card asking for a grid or patch far larger than memory."""

    def make(tmp: Path, tiny: Path, chest: Volume):
        model = model_variant(tmp, tiny, lambda c: {**c, **change})
        return [str(write_volume(chest, tmp / "ct.nrrd")), "--model", str(model)], expected

    return make


#: name: make(folder, the tiny model, the chest CT) -> (``run``'s input and options, the message)
BOMBS = {
    "nrrd_data_file_dev_zero": _bomb_nrrd_dev_zero,
    "nrrd_gzip_billion_voxels": _bomb_nrrd_gzip,
    "nifti_gzip_billion_voxels": _bomb_nifti_gzip,
    "dicom_jpegls_20000_square": _bomb_dicom_jpegls,
    "model_deflate_512MiB_tensor": _bomb_model_deflate,
    "card_patch_512_cubed": _bomb_card(
        {"patch_size": [512, 512, 512]},
        r"one \[512, 512, 512\]-voxel patch through gradcam3d_cnn needs .* GB of memory",
    ),
    "card_spacing_0_27_mm": _bomb_card(
        {"spacing_mm": [0.27, 0.27, 0.27]}, r"explaining this CT .*\(830, 1067, 1067\) on the model's .* needs .* GB"
    ),
}


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory, tiny, chest):
    """Every bomb, and a control run that must succeed, through ``lunggradcam run`` in one child
    process with RLIMIT_AS = its mapped size after the imports + HEADROOM."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS is enforced on Linux")
    runs = {}
    for name, make in BOMBS.items():
        tmp = tmp_path_factory.mktemp(name)
        args, expected = make(tmp, tiny, chest)
        runs[name] = (["run", args[0], "--out", str(tmp / "out"), *args[1:], "--device", "cpu"], expected, tmp)
    control = tmp_path_factory.mktemp("control")
    runs["control"] = (
        [
            "run",
            str(write_volume(chest, control / "ct.nrrd")),
            "--out",
            str(control / "out"),
            "--model",
            str(tiny),
            "--device",
            "cpu",
        ],
        "",
        control,
    )
    result = subprocess.run(
        [sys.executable, "-c", LIMITED, str(HEADROOM), json.dumps({name: args for name, (args, _, _) in runs.items()})],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "MALLOC_ARENA_MAX": "2"},
    )
    done = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            done.update(json.loads(line))
    return runs, done, result


@pytest.mark.slow
def test_the_memory_limit_lets_a_real_run_through(bomb_results):
    runs, done, result = bomb_results
    assert "control" in done, f"the child died (status {result.returncode}): {result.stderr[-3000:]}"
    assert done["control"]["code"] == 0, done["control"]["stderr"]
    assert (runs["control"][2] / "out" / "report.json").is_file()


@pytest.mark.parametrize("name", list(BOMBS))
def test_memory_bombs_are_refused_before_allocating(name, bomb_results):
    runs, done, result = bomb_results
    assert name in done, f"the child died at or before {name} (status {result.returncode}): {result.stderr[-3000:]}"
    code, err = done[name]["code"], done[name]["stderr"]
    assert code == 2 and "Traceback" not in err, (code, err)
    assert re.search(runs[name][1], err), err
    # the limit and how to change it (a model's file is bounded by its card's network instead)
    assert re.search("LUNGGRADCAM_MAX_BYTES|not beside the header|the card's network can hold", err), err
    assert not (runs[name][2] / "out").exists()
