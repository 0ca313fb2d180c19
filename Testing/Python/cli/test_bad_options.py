"""Options and paths the command line can check before the work: exit 2 at once, one message,
nothing written (bad devices and numbers, over-long names, model files it cannot use, an output
folder it cannot write)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from LungGradCAMLib.core.volume import Volume
from LungGradCAMLib.engine.models import build_model
from LungGradCAMLib.io.volume_files import write_volume

from bad_inputs import AXIAL, model_variant, run_cli
from helpers import REPO, run_on_read_only_mount
from helpers import snapshot as _snapshot


def _two_channel_model(tmp: Path, tiny: Path) -> Path:
    from safetensors.torch import save

    module = build_model("gradcam3d_cnn", width=2, in_channels=2)
    weights = save({k: v.contiguous() for k, v in module.state_dict().items()})
    return model_variant(tmp, tiny, lambda c: {**c, "kwargs": {"width": 2, "in_channels": 2}}, weights)


BAD_OPTIONS = {
    # name: (make(tmp, ct, tiny) -> (ct, out, model, extra args, env), message)
    "device_meta": (lambda t, ct, m: (ct, t / "out", m, ["--device", "meta"], {}), "unknown device 'meta'"),
    "device_xpu": (lambda t, ct, m: (ct, t / "out", m, ["--device", "xpu"], {}), "unknown device 'xpu'"),
    "batch_size_0": (lambda t, ct, m: (ct, t / "out", m, ["--batch-size", "0"], {}), "give a positive whole number"),
    "batch_size_negative": (
        lambda t, ct, m: (ct, t / "out", m, ["--batch-size", "-3"], {}),
        "give a positive whole number",
    ),
    "roi_of_nan_size": (lambda t, ct, m: (ct, t / "out", m, ["--roi", "0,0,0,nan"], {}), "finite"),
    "out_is_a_file": (lambda t, ct, m: (ct, t / "report.txt", m, [], {}), "report.txt is a file, not a folder"),
    "out_name_over_255_bytes": (lambda t, ct, m: (ct, t / ("x" * 300) / "out", m, [], {}), "more than the 255"),
    "input_name_over_255_bytes": (
        lambda t, ct, m: (t / ("y" * 300 + ".nrrd"), t / "out", m, [], {}),
        "more than the 255",
    ),
    "model_with_two_input_channels": (
        lambda t, ct, m: (ct, t / "out", _two_channel_model(t, m), [], {}),
        "takes 2 input channels",
    ),
    "model_card_nested_200000_deep": (
        lambda t, ct, m: (ct, t / "out", model_variant(t, m, lambda c: "[" * 200_000 + "]" * 200_000), [], {}),
        "nested too deeply",
    ),
    "model_over_the_size_limit": (
        lambda t, ct, m: (ct, t / "out", model_variant(t, m, lambda c: c), [], {"LUNGGRADCAM_MAX_MODEL_BYTES": "1000"}),
        "over the model size limit .* refusing to allocate",
    ),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_options_and_paths_exit_2_at_once(name, tmp_path, chest, tiny, capsys, monkeypatch):
    make, text = BAD_OPTIONS[name]
    (tmp_path / "report.txt").write_text("the user's notes\n")
    ct, out, model, extra, env = make(tmp_path, write_volume(chest, tmp_path / "ct.nrrd"), tiny)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _snapshot(tmp_path)
    assert run_cli(ct, out, model, *extra) == 2
    err = capsys.readouterr().err
    assert re.search(text, err) and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before


@contextlib.contextmanager
def _unwritable(folder: Path, how: str):
    """``folder`` made unwritable: "immutable" (chattr +i), "permissions" (chmod, not for root)."""
    folder.mkdir()
    if how == "permissions":
        if os.geteuid() == 0:
            pytest.skip("root writes whatever the permissions say (see immutable, read_only_mount)")
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a file system that has it)")
    try:
        yield folder
    finally:
        if how == "permissions":
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def _not_a_chest(tmp: Path) -> Path:
    """A CT the run would refuse only after reading it: an unwritable --out must be named first."""
    return write_volume(Volume(np.zeros((8, 16, 16), np.float32), AXIAL), tmp / "zeros.nrrd")


@pytest.mark.parametrize("how", ["immutable", "permissions"])
def test_unwritable_out_fails_before_the_work(how, tmp_path, tiny, capsys):
    ct = _not_a_chest(tmp_path)
    with _unwritable(tmp_path / "locked", how) as locked:
        assert run_cli(ct, locked / "out", tiny) == 2
        err = capsys.readouterr().err
        assert f"{locked / 'out'}: cannot write there" in err and "Traceback" not in err, err
        assert not (locked / "out").exists()


def test_out_on_a_read_only_mount_fails_before_the_work(tmp_path, tiny):
    ct = _not_a_chest(tmp_path)
    (tmp_path / "ro").mkdir()
    result = run_on_read_only_mount(
        tmp_path / "ro",
        [
            sys.executable,
            "-m",
            "LungGradCAMLib.cli",
            "run",
            ct,
            "--out",
            tmp_path / "ro" / "out",
            "--model",
            tiny,
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot write there (Read-only file system)" in result.stderr and "Traceback" not in result.stderr
