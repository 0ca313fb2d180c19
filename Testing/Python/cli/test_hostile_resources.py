"""Running out of something: a full disk, a file size limit, a memory limit, a model card that asks
for an impossible network. Each ends in one message and exit status 2, never a traceback, and a
run that fails leaves its output folder as it was.

The full disk is a small tmpfs mounted in a private user and mount namespace (``unshare``; no
root needed, skipped where the kernel does not allow it); the file size limit is
``RLIMIT_FSIZE`` (``ulimit -f``), under which every write past the limit fails with EFBIG; the
memory limit is ``RLIMIT_AS`` (``ulimit -v``). All three run the real writers and the real engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from LungGradCAMLib.cli import main
from LungGradCAMLib.engine.models import ModelCard, build_model, save_model
from LungGradCAMLib.io.volume_files import write_volume

from helpers import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resource limits and tmpfs: Linux")


@pytest.fixture(scope="module")
def ct(tmp_path_factory, chest) -> Path:
    return write_volume(chest, tmp_path_factory.mktemp("ct") / "ct.nrrd")


def _one_message(err: str, text: str) -> None:
    """``err`` is the one error line of the command (progress lines aside), holding ``text``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lunggradcam run: error: ") and text in lines[0], err


# --------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------
#: Run inside the tmpfs's namespace: a first run fills --out, then the disk is filled up to
#: ``share`` of what that run wrote, and a second run must fail with one message, leaving the
#: first run's files as they were. Prints JSON.
FULL_DISK = r"""
import hashlib, json, shutil, subprocess, sys
from pathlib import Path
disk, ct, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
out = disk / "out"

def run(threshold):
    return subprocess.run([sys.executable, "-m", "LungGradCAMLib.cli", "run", ct, "--out", str(out), "--model",
                           model, "--device", "cpu", "--threshold", threshold], capture_output=True, text=True)

def snapshot():
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(out.rglob("*"))}

first = run("0.3")
size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
before, results = snapshot(), []
for share in (0.05, 0.3, 0.6, 0.9):
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * max(0, free - int(share * size)))
    second = run("0.29")  # about the first run's outputs (on the absolute scale a higher level may leave no region)
    results.append({"share": share, "free": shutil.disk_usage(disk).free, "code": second.returncode,
                    "err": second.stderr, "same": snapshot() == before})
print(json.dumps({"first": first.returncode, "first_err": first.stderr[-2000:], "size": size, "results": results}))
"""


def test_a_full_disk_ends_in_one_message_and_keeps_the_old_outputs(tmp_path, ct, tiny):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = 'mount -t tmpfs -o size=4m tmpfs "$1" || exit 97; shift; exec "$@"'
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            str(disk),
            sys.executable,
            "-c",
            FULL_DISK,
            str(disk),
            str(ct),
            str(tiny),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode == 97 or done.stderr.startswith("unshare:"):
        pytest.skip(f"no tmpfs can be mounted here without root: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["first"] == 0, report["first_err"]
    for result in report["results"]:  # every share of free space: one message, the old outputs intact
        assert result["code"] == 2 and result["same"], result
        _one_message(result["err"], "cannot write the outputs")


def _limited_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize("limit", [2_000, 60_000])  # the first stops ITK's NRRD writer, the second the PNG
def test_a_file_size_limit_ends_in_one_message_and_keeps_the_old_outputs(limit, tmp_path, ct, tiny):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "LungGradCAMLib.cli",
        "run",
        str(ct),
        "--out",
        str(out),
        "--model",
        str(tiny),
        "--device",
        "cpu",
        "--threshold",
    ]
    assert subprocess.run(command + ["0.3"], cwd=REPO, capture_output=True, timeout=600).returncode == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert max(p.stat().st_size for p in out.iterdir()) > limit  # a file of the run is bigger than the limit
    done = subprocess.run(
        command + ["0.5"], cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=_limited_file_size(limit)
    )
    assert done.returncode == 2, done.stderr[-3000:]
    _one_message(done.stderr, "cannot write the outputs")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before


# --------------------------------------------------------------------------------------------
# a memory limit
# --------------------------------------------------------------------------------------------
#: ``lunggradcam`` under ``ulimit -v``: torch and the package imported first, then the address
#: space limited to what they use plus ``room`` bytes.
UNDER_ULIMIT_V = r"""
import resource, sys
import torch
import LungGradCAMLib.pipeline
from LungGradCAMLib.cli import main
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + int(float(sys.argv[1])), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def big_patch_model(tmp_path_factory) -> Path:
    """A gradcam3d_cnn (width 8) whose card asks for 160^3-voxel patches at 1.5 mm: on the CPU one
    patch's heat map needs about 1 GB."""
    torch.manual_seed(0)
    card = ModelCard(
        architecture="gradcam3d_cnn",
        kwargs={"width": 8},
        class_names=["background", "nodule"],
        cam_class="nodule",
        target_layer="features.act6",
        patch_size=[160] * 3,
        spacing_mm=[1.5] * 3,
        name="big-patch",
    )
    return save_model(
        build_model("gradcam3d_cnn", width=8).eval(), card, tmp_path_factory.mktemp("big") / "big-patch.safetensors"
    )


@pytest.mark.parametrize(
    "override, text",
    [
        (None, "more than the memory this process can get"),  # the estimate refuses the run before it starts
        ("1e12", "out of memory while"),  # the estimate overruled: the allocator's failure, as one message
    ],
)
def test_a_memory_limit_ends_in_one_message(override, text, tmp_path, ct, big_patch_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LUNGGRADCAM_MAX_BYTES", None)
    if override:
        env["LUNGGRADCAM_MAX_BYTES"] = override
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            UNDER_ULIMIT_V,
            "8e8",
            "run",
            str(ct),
            "--out",
            str(out),
            "--model",
            str(big_patch_model),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    _one_message(done.stderr, text)
    assert not out.exists()


def test_a_card_asking_for_an_impossible_network_gets_one_line(tmp_path, ct, tiny, capsys):
    """A width of 10^40: torch's message goes on with a C++ stack of 16 lines; only its first is shown."""
    model = tmp_path / "huge.safetensors"
    model.write_bytes(tiny.read_bytes())
    card = json.loads(tiny.with_suffix(".json").read_text())
    card["kwargs"]["width"] = 10**40
    model.with_suffix(".json").write_text(json.dumps(card))
    assert main(["run", str(ct), "--out", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]) == 2
    _one_message(capsys.readouterr().err, "cannot build 'gradcam3d_cnn'")
