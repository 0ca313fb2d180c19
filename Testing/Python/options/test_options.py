"""ExplainOptions, the one type of an explanation's settings, and the command line that builds it:
every value a user types is checked as it is parsed, before a model or a CT is read."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from LungGradCAMLib.cli import build_parser, main
from LungGradCAMLib.cli.common import options_from_args
from LungGradCAMLib.core.errors import InvalidInputError
from LungGradCAMLib.options import METHODS, ExplainOptions, parse_roi, parse_threshold


def test_options_are_normalised():
    o = ExplainOptions(
        threshold="0.25", stride="8,8,4", device="AUTO", batch_size=0, target="", layer="", roi="-55.5, -85.6, -116, 40"
    )
    assert (o.threshold, o.stride, o.device, o.batch_size, o.target, o.layer) == (
        0.25,
        (8, 8, 4),
        None,
        None,
        None,
        None,
    )
    assert o.roi == ((-55.5, -85.6, -116.0), (40.0, 40.0, 40.0))
    assert ExplainOptions(stride=6).stride == (6, 6, 6) and ExplainOptions(stride=0).stride is None
    assert ExplainOptions(device="cuda:1").device == "cuda:1"
    assert parse_threshold("P99") == "p99" and parse_threshold(" otsu ") == "otsu" and parse_threshold(1) == 1.0
    assert parse_threshold(("percentile", 99.5)) == "p99.5"
    assert parse_roi("1,2,3,4,5,6") == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = True
    assert ExplainOptions(roi=mask).roi is mask


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("threshold", "0.5x", "threshold '0.5x' is not understood"),
        ("threshold", 1.5, "threshold"),
        ("threshold", "p101", "threshold"),
        ("threshold", True, "threshold"),
        ("stride", "0", "stride"),
        ("stride", "8,8", "stride"),
        ("stride", 2.5, "stride"),
        ("stride", -1, "stride"),
        ("device", "gpu", "unknown device 'gpu'"),
        ("batch_size", -2, "batch size"),
        ("batch_size", 2.5, "batch size"),
        ("method", "guided_backprop", "unknown CAM method"),
        ("mode", "everything", "unknown mode"),
        ("roi", "1,2", "X,Y,Z,SIZE"),
        ("roi", ((0, 0, 0), -4), "size positive"),
        ("roi", np.zeros((4, 4, 4), bool), "non-empty"),
        ("model", "", "model"),
        ("amp", "yes", "amp must be True or False"),
        ("target", 1.5, "target"),
    ],
)
def test_wrong_values_are_refused_with_what_to_give(field, value, message):
    with pytest.raises(InvalidInputError, match=message):
        ExplainOptions(**{field: value})


def test_mode_roi_needs_a_roi_and_replace_checks_again():
    with pytest.raises(InvalidInputError, match="mode 'roi' needs a roi"):
        ExplainOptions(mode="roi")
    with pytest.raises(InvalidInputError, match="threshold"):
        dataclasses.replace(ExplainOptions(), threshold="high")


def test_recorded_options_are_json_and_leave_out_runtime_choices():
    o = ExplainOptions(roi=((1, 2, 3), 40), stride=8, device="cpu", batch_size=4, target=np.int64(1))
    record = json.loads(json.dumps(o.to_dict()))
    assert record["roi"] == [[1.0, 2.0, 3.0], [40.0, 40.0, 40.0]] and record["stride"] == [8, 8, 8]
    assert record["target"] == 1 and record["model"] == "default"
    assert set(record) - set(o.result_options()) == {"device", "batch_size"}
    assert ExplainOptions(device="cpu").result_options() == ExplainOptions(batch_size=16).result_options()


def _args(*argv):
    return build_parser().parse_args(["run", "ct.nrrd", "--out", "o", *argv])


def test_the_command_line_has_every_option_of_the_panel():
    args = _args(
        "--method",
        "guided-backprop",
        "--target",
        "background",
        "--layer",
        "features.act5",
        "--mode",
        "sliding",
        "--threshold",
        "p99",
        "--no-restrict-to-lungs",
        "--no-chest-check",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--stride",
        "8",
        "--amp",
        "--format",
        "nii.gz",
    )
    o = options_from_args(args)
    assert (
        o.method,
        o.target,
        o.layer,
        o.mode,
        o.threshold,
        o.restrict_to_lungs,
        o.chest_check,
        o.device,
        o.batch_size,
        o.stride,
        o.amp,
    ) == ("guided-backprop", "background", "features.act5", "sliding", "p99", False, False, "cpu", 4, (8, 8, 8), True)
    assert args.volume_format == "nii.gz"
    # every field of ExplainOptions has its option (model .. amp); none is silently left out
    assert set(f.name for f in dataclasses.fields(ExplainOptions)) == set(o.to_dict())


def test_negative_ras_coordinates_in_roi(tmp_path, capsys):
    """`--roi -55.5,-85.6,-116,40` (argparse took the value for an option before)."""
    from LungGradCAMLib.cli import _join_negative_values

    argv = _join_negative_values(["run", "ct.nrrd", "--out", "o", "--roi", "-55.5,-85.6,-116,40", "-v"])
    assert options_from_args(build_parser().parse_args(argv)).roi == ((-55.5, -85.6, -116.0), (40.0,) * 3)
    assert _args("--roi=-1,2,3,4").roi == ((-1.0, 2.0, 3.0), (4.0, 4.0, 4.0))


def test_help_lists_every_method_and_prints_percent_signs_once(capsys):
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(m in text for m in METHODS) and "guided-backprop" in text
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "95%" in out and "%%" not in out


def test_verbose_before_or_after_the_command():
    assert build_parser().parse_args(["-v", "info"]).verbose is True
    assert build_parser().parse_args(["info", "-v"]).verbose is True
    assert build_parser().parse_args(["info"]).verbose is False


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--threshold", "0.5x"], "argument --threshold: threshold '0.5x' is not understood"),
        (["--stride", "0"], "argument --stride"),
        (["--batch-size", "0"], "argument --batch-size"),
        (["--device", "gpu"], "argument --device: unknown device 'gpu'"),
        (["--method", "magic"], "argument --method: invalid choice: 'magic'"),
        (["--roi", "1,2"], "argument --roi"),
    ],
)
def test_wrong_options_stop_at_parse_time(tmp_path, capsys, argv, message):
    """Refused as parsed: one line naming the option, status 2, no traceback, nothing read or made."""
    assert main(["run", str(tmp_path / "missing.nrrd"), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "usage:" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_options_needing_the_model_are_checked_before_the_ct_is_read(tmp_path, capsys, chest):
    """A wrong target class or layer is refused before the CT is read: here the CT is a DICOM
    folder holding a damaged file, whose error would come first otherwise."""
    from LungGradCAMLib import phantom

    folder = tmp_path / "dicom"
    files = phantom.write_dicom_series(chest, folder)
    files[3].write_bytes(files[3].read_bytes()[:400])  # truncated
    for argv, message in (
        (["--target", "tumour"], "target class 'tumour' is not one of"),
        (["--layer", "features.nope"], "layer 'features.nope' is not a module"),
    ):
        assert main(["run", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu", *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["run", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert str(files[3].name) in capsys.readouterr().err  # with right options, the damaged file is reached


def test_series_and_dicom_seg_on_a_volume_file_are_refused(tmp_path, capsys, chest):
    from LungGradCAMLib.io.volume_files import write_volume

    ct = write_volume(chest, tmp_path / "ct.nii.gz")
    assert main(["run", str(ct), "--out", str(tmp_path / "o"), "--series", "1.2.3"]) == 2
    assert "leave out --series" in capsys.readouterr().err
    assert main(["run", str(ct), "--out", str(tmp_path / "o"), "--dicom-seg"]) == 2
    assert "--dicom-seg needs a DICOM input" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_several_series_error_names_the_command_line_option(tmp_path, capsys, chest):
    from LungGradCAMLib.io.dicom_write import write_dicom_series

    write_dicom_series(chest, tmp_path / "two" / "a", series_uid="1.2.826.0.1.3680043.10.1.1")
    write_dicom_series(chest, tmp_path / "two" / "b", series_uid="1.2.826.0.1.3680043.10.1.2")
    assert main(["run", str(tmp_path / "two"), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "2 CT series found" in err and "--series" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--shape", "300x512"], "argument --shape: '300x512': give three positive voxel counts"),
        (["bench", "--spacing", "0.7,0,1"], "argument --spacing"),
        (["bench", "--device", "tpu"], "argument --device"),
        (["demo", "--device", "gpu"], "argument --device"),
    ],
)
def test_other_commands_check_their_options_as_parsed(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
