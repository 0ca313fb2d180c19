"""End to end: explain(), write_outputs(), the input kinds, and `lunggradcam run` on real files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import LungGradCAMLib as lgc
from LungGradCAMLib import pipeline
from LungGradCAMLib.cli import main
from LungGradCAMLib.core.errors import InvalidInputError, VolumeError
from LungGradCAMLib.core.volume import LPS_TO_RAS
from LungGradCAMLib.engine.device import resolve_device
from LungGradCAMLib.engine.models import available_models
from LungGradCAMLib.io.inputs import load_input

from helpers import data_path, make_ctk_db, make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def explanation(small_phantom, tiny_model):
    return lgc.explain(small_phantom.volume, model=str(tiny_model), device="cpu", batch_size=8)


def test_explain_geometry_and_contents(small_phantom, explanation):
    ct = small_phantom.volume
    cam = explanation.cam
    assert lgc.same_geometry(cam, ct)
    assert cam.array.dtype == np.float32
    assert 0.0 <= cam.array.min() and cam.array.max() <= 1.0 and cam.array.max() > 0.5
    assert set(explanation.probabilities) == {"background", "nodule"}
    assert sum(explanation.probabilities.values()) == pytest.approx(1.0)
    assert explanation.predicted_class == max(explanation.probabilities, key=explanation.probabilities.get)
    assert explanation.target_class == "nodule" and explanation.method == "gradcam"
    assert explanation.mode == "sliding" and explanation.n_patches > 0
    assert explanation.lung_mask.shape == ct.shape and explanation.lung_mask.any()
    assert lgc.same_geometry(explanation.score_map, ct)
    # the CAM lives where the sliding window ran: the lungs' bounding box (plus margin), not far outside
    k, j, i = np.nonzero(explanation.lung_mask)
    outside = np.ones(ct.shape, bool)
    outside[max(k.min() - 8, 0) : k.max() + 9, max(j.min() - 8, 0) : j.max() + 9, max(i.min() - 8, 0) : i.max() + 9] = (
        False
    )
    assert cam.array[outside].max(initial=0) == 0
    # each stage timed once, one after another, all inside the total
    stages = [explanation.timings[stage] for stage in ("load_model", "lung_mask", "resample", "cam", "resample_back")]
    assert min(stages) > 0 and sum(stages) <= explanation.timings["total"]


def test_cam_on_the_ct_grid_within_the_stated_tolerance_of_simpleitk(small_phantom):
    """The CAM's way home (separable trilinear, rounded to CAM_STEP) against what explain() did
    before: SimpleITK's trilinear Resample of the same model-grid map, then clipping. Stated
    tolerance: |difference| <= CAM_STEP / 2 + 1e-6 everywhere, and so a threshold puts a voxel on
    the other side only when SimpleITK's value lies within that distance of the threshold."""
    from scipy import ndimage

    ct = small_phantom.volume
    ct = ct.with_array(np.zeros(ct.shape, np.float32))
    space = lgc.resample(ct, (1.5, 1.7, 2.3))  # a model grid: 2x finer in-plane, coarser in k
    rng = np.random.default_rng(4)
    smooth = ndimage.gaussian_filter(rng.random(space.shape), 2.0)
    smooth = ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)
    box = ((3, space.shape[0] - 4), (5, space.shape[1] - 9), (0, space.shape[2] - 2))  # the window's box
    outside = np.ones(space.shape, bool)
    outside[tuple(slice(a, b) for a, b in box)] = False
    smooth[outside] = 0.0  # as the sliding window leaves it
    coarse = space.with_array(smooth)
    cam = pipeline.cam_on_ct_grid(coarse, ct, box)
    assert lgc.same_geometry(cam, ct) and cam.array.dtype == np.float32
    # only the CT voxels within reach of the box are computed: the same values as all of them
    everywhere = pipeline.on_ct_grid(coarse, ct)
    np.testing.assert_allclose(pipeline.on_ct_grid(coarse, ct, box).array, everywhere.array, rtol=0, atol=1e-6)
    assert (everywhere.array == 0).any() and (everywhere.array > 0).mean() > 0.5
    assert np.array_equal(cam.array, np.round(cam.array / pipeline.CAM_STEP) * pipeline.CAM_STEP)
    before = sitk.GetArrayFromImage(
        sitk.Resample(coarse.to_sitk(), ct.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    before = np.clip(before, 0.0, 1.0)
    tolerance = pipeline.CAM_STEP / 2 + 1e-6
    assert np.abs(cam.array - before).max() <= tolerance
    for level in (0.3, 0.5, 0.7):
        flipped = (cam.array >= level) != (before >= level)
        assert np.all(np.abs(before[flipped] - level) <= tolerance)


def test_explain_roi_and_whole_modes(small_phantom, tiny_model, tmp_path):
    ct = small_phantom.volume
    nodule = small_phantom.nodules[0]
    roi = lgc.explain(ct, model=str(tiny_model), roi=(nodule.center_ras, 40.0), device="cpu")
    assert roi.mode == "roi"
    hot = np.argwhere(roi.cam.array > 0)
    ras = ct.ijk_to_ras_points(hot[:, ::-1])
    # everything the roi run touched lies within the roi box (half size + one patch of 64 mm)
    assert np.all(np.abs(ras - np.asarray(nodule.center_ras)) <= 20 + 64 + 1e-6)

    whole = make_tiny_model(tmp_path, name="whole", patch=None, spacing=(6.0, 6.0, 6.0))
    exp = lgc.explain(ct, model=str(whole), device="cpu")
    assert exp.mode == "whole" and exp.n_patches == 1
    assert lgc.same_geometry(exp.cam, ct)


def test_explain_rejects_bad_input(small_phantom, tiny_model):
    ct = small_phantom.volume
    with pytest.raises(InvalidInputError, match="unknown mode"):
        lgc.explain(ct, model=str(tiny_model), mode="everything", device="cpu")
    with pytest.raises(InvalidInputError, match="unknown CAM method"):
        lgc.explain(ct, model=str(tiny_model), method="magic", device="cpu")
    with pytest.raises(InvalidInputError, match="needs a LungGradCAMLib.Volume"):
        lgc.explain(ct.array, model=str(tiny_model), device="cpu")
    bad = ct.with_array(ct.array.copy())
    bad.array[0, 0, 0] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        lgc.explain(bad, model=str(tiny_model), device="cpu")
    with pytest.raises(InvalidInputError, match="lies outside the CT"):
        lgc.explain(ct, model=str(tiny_model), roi=((5000.0, 0.0, 0.0), 10.0), device="cpu")
    # a CUDA device that is not there: any CUDA without CUDA, one past the last with it
    import torch

    if torch.cuda.is_available():
        absent, message = f"cuda:{torch.cuda.device_count()}", "CUDA device"
    else:
        absent, message = "cuda", "CUDA is not available"
    with pytest.raises(InvalidInputError, match=message):
        lgc.explain(ct, model=str(tiny_model), device=absent)


def test_write_outputs_read_back(small_phantom, explanation, tmp_path):
    import slicerio

    seg = lgc.segment_cam(explanation, threshold=0.5)
    files = pipeline.write_outputs(explanation, seg, tmp_path / "out")
    assert {p.name for p in files.values()} == {
        "cam.nrrd",
        "segmentation.seg.nrrd",
        "lungs.seg.nrrd",
        "overlay.png",
        "report.json",
    }
    cam = lgc.read_volume(tmp_path / "out" / "cam.nrrd")
    assert lgc.same_geometry(cam, small_phantom.volume, atol_mm=1e-6)
    assert cam.array.dtype == np.float32  # Slicer shows the heat map in [0, 1], as before
    np.testing.assert_array_equal(cam.array, explanation.cam.array)
    # SimpleITK sees the same LPS geometry as the CT written by the same writer
    img = sitk.ReadImage(str(tmp_path / "out" / "cam.nrrd"))
    assert img.GetOrigin() == pytest.approx(small_phantom.volume.to_sitk().GetOrigin())
    s = slicerio.read_segmentation(str(tmp_path / "out" / "segmentation.seg.nrrd"))
    assert len(s["segments"]) == len(seg.regions)
    lungs = slicerio.read_segmentation(str(tmp_path / "out" / "lungs.seg.nrrd"))
    assert [x["name"] for x in lungs["segments"]] == ["lungs"]
    # both segmentations: the CT's whole grid (not cropped), the labels exactly as computed
    lps = LPS_TO_RAS @ small_phantom.volume.ijk_to_ras
    for read, labels in ((s, seg.labelmap.array), (lungs, explanation.lung_mask)):
        np.testing.assert_allclose(read["ijkToLPS"], lps, atol=1e-6)
        assert read["referenceImageExtentOffset"] == [0, 0, 0]
        np.testing.assert_array_equal(read["voxels"].transpose(2, 1, 0), labels)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["predicted_class"] == explanation.predicted_class
    assert report["probabilities"] == pytest.approx(explanation.probabilities)
    assert len(report["regions"]) == len(seg.regions)
    assert report["series_instance_uid"] == small_phantom.volume.meta.get("series_uid")
    assert "patient_name" not in json.dumps(report).lower()
    png = sitk.ReadImage(str(tmp_path / "out" / "overlay.png"))
    assert min(png.GetSize()) > 100
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_input_kinds_and_dicom_seg(small_phantom, tiny_model, tmp_path):
    """DICOM folder, Slicer database and NRRD give the same CT; --dicom-seg references the series."""
    ct = small_phantom.volume
    dicom_dir = tmp_path / "db" / "dicom"
    lgc.phantom.write_dicom_series(ct, dicom_dir, shuffle_names=True)
    from_dicom = load_input(dicom_dir)
    lgc.write_volume(ct, tmp_path / "ct.nrrd")
    from_nrrd = load_input(tmp_path / "ct.nrrd")
    assert lgc.same_geometry(from_dicom, from_nrrd, atol_mm=1e-4)
    np.testing.assert_allclose(from_dicom.array, np.round(from_nrrd.array), atol=1.0)

    # a Slicer database (CTK schema subset) that indexes the folder, with relative file names
    make_ctk_db(tmp_path / "db", dicom_dir)
    from_db = load_input(tmp_path / "db")
    np.testing.assert_array_equal(from_db.array, from_dicom.array)

    exp = lgc.explain(from_dicom, model=str(tiny_model), device="cpu", batch_size=8)
    seg = lgc.segment_cam(exp, threshold=0.3)
    assert seg.regions
    files = pipeline.write_outputs(exp, seg, tmp_path / "out", dicom_seg=True, overlay=False)
    ds = pydicom.dcmread(files["dicom_seg"])
    assert ds.Modality == "SEG"
    assert ds.StudyInstanceUID == from_dicom.meta["study_uid"]
    assert ds.FrameOfReferenceUID == from_dicom.meta["frame_of_reference_uid"]
    referenced = {
        item.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for item in s.ReferencedInstanceSequence
    }
    assert referenced == {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in sorted(dicom_dir.iterdir())
    }
    assert len(ds.SegmentSequence) == len(seg.regions)
    import highdicom as hd

    back = hd.seg.segread(files["dicom_seg"])
    assert back.number_of_segments == len(seg.regions)


def test_cli_run_and_errors(small_phantom, tiny_model, tmp_path, capsys):
    lgc.write_volume(small_phantom.volume, tmp_path / "ct.nrrd")
    src_bytes = (tmp_path / "ct.nrrd").read_bytes()
    code = main(
        [
            "run",
            str(tmp_path / "ct.nrrd"),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_model),
            "--device",
            "cpu",
            "--threshold",
            "p99",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "prediction:" in out and "report.json" in out
    assert (tmp_path / "out" / "report.json").is_file()
    assert (tmp_path / "ct.nrrd").read_bytes() == src_bytes  # the input is untouched

    # errors a user can cause: message, no traceback, exit status 2, nothing written
    for argv, message in [
        (["run", str(tmp_path / "missing.nrrd"), "--out", str(tmp_path / "o2")], "no such file"),
        (
            [
                "run",
                str(tmp_path / "ct.nrrd"),
                "--out",
                str(tmp_path / "o3"),
                "--model",
                str(tiny_model),
                "--roi",
                "1,2",
            ],
            "--roi",
        ),
        (["run", str(tmp_path / "ct.nrrd"), "--out", str(tmp_path / "o4"), "--model", "no-such-model"], "model"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / argv[3].split("/")[-1] / "report.json").exists()


def test_cost_estimate_before_the_cam_stage(small_phantom, tiny_model, tmp_path, capsys):
    """explain(on_estimate=...) gets the CAM stage's cost before it starts (Score-CAM: one masked
    pass per patch and channel of the CAM layer); returning False stops the run there; the CLI
    prints the estimate of a Score-CAM run before it starts."""
    from LungGradCAMLib.core.errors import CancelledError

    ct = small_phantom.volume
    estimates, batches = [], []
    exp = lgc.explain(
        ct,
        model=str(tiny_model),
        device="cpu",
        on_estimate=estimates.append,
        progress=lambda stage, done, total: stage == "cam" and batches.append(total),
    )
    (gradcam,) = estimates
    assert gradcam.method == "gradcam" and gradcam.patches == exp.n_patches == batches[-1]
    assert gradcam.passes == gradcam.patches and gradcam.seconds > 0 and gradcam.device == "cpu"
    loaded = pipeline.get_model(str(tiny_model), resolve_device("cpu"))
    score = pipeline.estimate_cost(loaded, "scorecam", gradcam.patches, gradcam.patch, resolve_device("cpu"), 2)
    assert score.channels == 32 and score.passes == gradcam.patches * 33  # gradcam3d_cnn width 2: 16 * 2
    assert score.seconds > gradcam.seconds and f"{score.passes:,} forward passes" in str(score)

    batches.clear()
    with pytest.raises(CancelledError, match="not started: scorecam"):
        lgc.explain(
            ct,
            model=str(tiny_model),
            method="scorecam",
            device="cpu",
            on_estimate=lambda e: False,
            progress=lambda stage, done, total: stage == "cam" and batches.append(done),
        )
    assert batches == []  # no patch was explained

    lgc.write_volume(ct, tmp_path / "ct.nrrd")
    assert (
        main(
            [
                "run",
                str(tmp_path / "ct.nrrd"),
                "--out",
                str(tmp_path / "out"),
                "--model",
                str(tiny_model),
                "--device",
                "cpu",
                "--method",
                "scorecam",
                "--roi",
                "0,0,0,40",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "estimated cost: scorecam:" in err and "forward passes" in err


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_with_the_bundled_model(tmp_path, capsys):
    """`lunggradcam demo`: phantom -> DICOM -> volume -> explanation -> outputs, and the bundled
    model's heat map lands on (or within a few mm of) a true nodule."""
    assert "default" in available_models()  # part of the package
    assert main(["demo", "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # first the honest line: what the heat map is, the model's intended use, how well it localises
    assert lines[0].startswith("About the heat map:") and "not for clinical use" in lines[0]
    assert "held-out test" in lines[0] and "false hot regions per scan" in lines[0]  # its card's real-nodule benchmark
    assert "prediction: nodule" in out and "the heat map's maximum is" in out
    # each hot region, and each true nodule found or missed
    report = json.loads((tmp_path / "result" / "report.json").read_text())
    for region in report["regions"]:
        assert f"     {region['name']}: {region['volume_ml']:.2f} ml, centre RAS (" in out
    phantom_ = lgc.phantom.chest_ct(seed=7)
    nodule_lines = [line.strip() for line in lines if line.strip().startswith("nodule ")]
    assert len(nodule_lines) == len(phantom_.nodules)
    found = sum(": found: heat-map region" in line for line in nodule_lines)
    assert found + sum(": missed (heat at most" in line for line in nodule_lines) == len(phantom_.nodules)
    assert f"{found} of {len(phantom_.nodules)} phantom nodules found by a hot region" in out and found >= 1
    # where the outputs are and how to open them in Slicer
    assert f"Outputs in {tmp_path.resolve()}" in out and "drag and drop" in out
    slicer_line = next(line for line in lines if line.startswith("  the phantom: "))
    for name in ("phantom.nrrd", "result/cam.nrrd", "result/segmentation.seg.nrrd"):
        assert str((tmp_path / name).resolve()) in slicer_line
    for name in (
        "montage.png",
        "phantom.nrrd",
        "nodules_truth.seg.nrrd",
        "result/cam.nrrd",
        "result/segmentation.seg.nrrd",
        "result/overlay.png",
        "result/report.json",
    ):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "dicom").iterdir())) == lgc.read_volume(tmp_path / "phantom.nrrd").shape[0]
    ct = lgc.read_volume(tmp_path / "phantom.nrrd")
    cam = lgc.read_volume(tmp_path / "result" / "cam.nrrd")
    assert cam.shape == ct.shape and np.allclose(cam.ijk_to_ras, ct.ijk_to_ras, atol=1e-3)
    report = json.loads((tmp_path / "result" / "report.json").read_text())
    assert report["predicted_class"] == "nodule" and report["regions"]
    truth = lgc.phantom.chest_ct(seed=7).nodule_labelmap > 0  # the demo's phantom (seed 7)
    assert lgc.metrics.peak_distance_mm(cam, cam.with_array(truth)) <= 10.0


def test_report_records_options_outcome_intended_use_and_wall_time(small_phantom, tiny_model, tmp_path):
    """The report states the options, the outcome and the model's intended use, and its total is
    the wall time of the run: every stage, loading and writing included."""
    import time

    from LungGradCAMLib.options import ExplainOptions

    lgc.write_volume(small_phantom.volume, tmp_path / "ct.nrrd")
    options = ExplainOptions(model=str(tiny_model), device="cpu", batch_size=8, threshold=0.3)
    reports = []
    started = time.perf_counter()
    exp, seg, files = pipeline.run_one(
        tmp_path / "ct.nrrd", tmp_path / "out", options, progress=lambda *r: reports.append(r)
    )
    wall = time.perf_counter() - started
    report = json.loads(files["report"].read_text())
    timings = report["timings_s"]
    assert set(timings) == {
        "load",
        "load_model",
        "lung_mask",
        "resample",
        "cam",
        "resample_back",
        "segment",
        "write",
        "total",
    }
    assert sum(v for k, v in timings.items() if k != "total") <= timings["total"] <= wall
    assert report["options"] == {**options.to_dict(), "threshold": 0.3}
    assert report["outcome"] == f"{len(seg.regions)} hot region{'s' if len(seg.regions) != 1 else ''}"
    assert report["intended_use"] == exp.model["intended_use"] and "clinical" in report["intended_use"]
    assert report["chest_check"]["ok"] and report["layer"] == "features.act6"
    assert report["files"] == sorted(p.name for k, p in files.items() if k != "report") + ["report.json"]
    # progress: every stage in order, each from 0 to done
    order = [s for n, (s, _, _) in enumerate(reports) if n == 0 or s != reports[n - 1][0]]
    assert order == ["load", "load_model", "lung_mask", "resample", "cam", "resample_back", "segment", "write"]
    assert all(
        reports[n][1] <= reports[n + 1][1] for n in range(len(reports) - 1) if reports[n][0] == reports[n + 1][0]
    )


def test_cli_options_of_the_panel_and_nifti_outputs(small_phantom, tiny_model, tmp_path, caplog):
    """target, layer, mode, stride, restrict-to-lungs and NIfTI outputs from the command line."""
    lgc.write_volume(small_phantom.volume, tmp_path / "ct.nrrd")
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                str(tmp_path / "ct.nrrd"),
                "--out",
                str(out),
                "--model",
                str(tiny_model),
                "--device",
                "cpu",
                "--target",
                "background",
                "--layer",
                "features.act5",
                "--mode",
                "sliding",
                "--stride",
                "8",
                "--no-restrict-to-lungs",
                "--threshold",
                "0.4",
                "--format",
                "nii.gz",
                "-v",
            ]
        )
        == 0
    )
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("LungGradCAMLib.pipeline")]
    assert any(m.startswith("computing the heat map: ") for m in logged)  # -v: each stage and its time
    assert logging.getLogger("LungGradCAMLib").getEffectiveLevel() == logging.INFO
    report = json.loads((out / "report.json").read_text())
    assert report["target_class"] == "background" and report["layer"] == "features.act5"
    assert report["options"]["stride"] == [8, 8, 8] and report["options"]["restrict_to_lungs"] is False
    assert sorted(p.name for p in out.iterdir()) == [
        ".lunggradcam.json",
        "cam.nii.gz",
        "lungs.nii.gz",
        "overlay.png",
        "report.json",
        "segmentation.nii.gz",
    ]
    cam = lgc.read_volume(out / "cam.nii.gz")
    labels = lgc.read_volume(out / "segmentation.nii.gz")
    assert lgc.same_geometry(cam, small_phantom.volume, atol_mm=1e-4) and lgc.same_geometry(labels, cam, atol_mm=1e-4)
    assert sorted(int(v) for v in np.unique(labels.array) if v) == [r["label"] for r in report["regions"]]
    assert lgc.read_volume(out / "lungs.nii.gz").array.max() == 1


def test_no_region_above_the_threshold_is_an_outcome(small_phantom, tiny_model, tmp_path):
    """A heat map with nothing above the threshold: a complete run whose report, DICOM SEG note
    and summary say so."""
    import torch

    from LungGradCAMLib.engine.models import load_model
    from LungGradCAMLib.options import ExplainOptions

    blind = load_model(tiny_model, device="cpu")
    with torch.no_grad():
        blind.module.head[-1].weight.zero_()  # no evidence anywhere: the heat map is all zeros
    dicom = tmp_path / "dicom"
    lgc.phantom.write_dicom_series(small_phantom.volume, dicom)
    exp, seg, files = pipeline.run_one(
        dicom, tmp_path / "out", ExplainOptions(model=blind, device="cpu"), dicom_seg=True
    )
    report = json.loads(files["report"].read_text())
    assert seg.regions == [] and report["outcome"] == "no region above threshold 0.50 (highest heat 0.00)"
    assert report["dicom_seg"] == "not written: no region above threshold"
    assert "dicom_seg" not in files and {"overlay", "cam", "segmentation"} <= set(files)


def test_a_low_scoring_scan_has_no_hot_region_on_the_absolute_scale(small_phantom, tiny_model, tmp_path):
    """The heat map's scale is absolute: a model that gives every patch a low probability (its
    nodule logit lowered) leaves a heat map below 0.5 everywhere, however structured its maps,
    and the report's outcome says so with the highest heat; the relative view of the same run
    still scales it to 1 and finds regions."""
    import torch

    from LungGradCAMLib.engine.models import load_model
    from LungGradCAMLib.options import ExplainOptions

    doubtful = load_model(tiny_model, device="cpu")
    with torch.no_grad():
        doubtful.module.head[-1].bias[1] -= 2.0  # P(nodule) below 0.5 everywhere, the gradients unchanged
    exp, seg, files = pipeline.run_one(
        small_phantom.volume, tmp_path / "out", ExplainOptions(model=doubtful, device="cpu", batch_size=8)
    )
    p = exp.probabilities["nodule"]
    assert p < 0.5 and 0.0 < exp.cam.array.max() <= p + pipeline.CAM_STEP
    report = json.loads(files["report"].read_text())
    assert seg.regions == [] and report["outcome"] == (
        f"no region above threshold 0.50 (highest heat {np.floor(seg.peak * 100) / 100:.2f})"
    )
    assert report["options"]["scale"] == "absolute"
    relative = lgc.explain(
        small_phantom.volume, options=ExplainOptions(model=doubtful, device="cpu", batch_size=8, scale="relative")
    )
    assert relative.cam.array.max() == pytest.approx(1.0) and lgc.segment_cam(relative).regions


def test_dicom_seg_is_marked_research_and_coded_as_heat_map_regions(small_phantom, tiny_model, tmp_path):
    from LungGradCAMLib.options import ExplainOptions

    dicom = tmp_path / "dicom"
    lgc.phantom.write_dicom_series(small_phantom.volume, dicom)
    exp, seg, files = pipeline.run_one(
        dicom,
        tmp_path / "out",
        ExplainOptions(model=str(tiny_model), device="cpu", batch_size=8, threshold=0.3),
        dicom_seg=True,
    )
    ds = pydicom.dcmread(files["dicom_seg"])
    assert "research" in ds.SeriesDescription.lower() and "not clinical" in ds.SeriesDescription.lower()
    assert ds.ContentDescription == exp.model["intended_use"] and ds.ContentLabel == "HEATMAP"  # short: whole
    # LO holds 64 characters: a longer intended use (the bundled model's) is shortened at a word
    from LungGradCAMLib.io.dicomseg import content_description

    use = lgc.load_model("default").card.intended_use
    short = content_description(use)
    assert len(use) > 64 and len(short) <= 64 and short.endswith("...")
    assert use.startswith(short[:-3]) and use[len(short) - 3] == " "
    for item, region in zip(ds.SegmentSequence, seg.regions):
        assert item.SegmentLabel == region.name and region.name.startswith("heat-map region")
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "309825002")  # spatial/relational
        assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == (
            "DCM",
            "130403",
            "Gradient-weighted class activation",
        )


REAL_CHEST_CTS = [
    "full_chest_ct/dicom",
    "lidc/LIDC-IDRI-0001",
    "lidc/LIDC-IDRI-0002",
    "totalsegmentator/chest_crop_pulmonary.nii.gz",
    "totalsegmentator/chest_crop_aorta.nii.gz",
]


@pytest.mark.parametrize("name", REAL_CHEST_CTS)
def test_every_real_chest_ct_passes_the_chest_check(name):
    """The real chest CTs of ../shared/data, whole scans, slabs of 15 and 40 mm and crops, hold lungs."""
    from LungGradCAMLib.engine.lung import check_chest_ct

    ct = load_input(data_path(*name.split("/")))
    check = check_chest_ct(ct, lgc.lung_mask(ct))
    assert check.ok, check.problems
    assert check.max_lung_area_cm2 > 150 and check.lung_share > 0.2 and check.aerated_share > 0.8


def test_the_abdomen_series_is_refused_before_the_heat_map(tmp_path, capsys, tiny_model):
    """The real upper-abdomen series, whose "lungs" are stomach and bowel gas, is refused as not a
    chest CT, after the lung mask and before any patch is explained; nothing is written."""
    from LungGradCAMLib.core.errors import NotChestCTError
    from LungGradCAMLib.options import ExplainOptions

    source = data_path("totalsegmentator", "abdomen_dicom_series")
    assert (
        main(["run", str(source), "--out", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu"]) == 2
    )
    err = capsys.readouterr().err
    assert "does not look like a chest CT" in err and "largest lung cross-section is 23 cm²" in err
    assert not (tmp_path / "out").exists()
    stages = []
    with pytest.raises(NotChestCTError):
        pipeline.run_one(
            source,
            tmp_path / "o",
            ExplainOptions(model=str(tiny_model), device="cpu"),
            progress=lambda stage, done, total: stages.append(stage),
        )
    assert "lung_mask" in stages and "cam" not in stages
    # switched off, or with a region given, it runs
    exp = lgc.explain(load_input(source), model=str(tiny_model), device="cpu", chest_check=False)
    assert not exp.chest_check["ok"] and exp.chest_check["lung_share"] < 0.05


@pytest.mark.parametrize("name", ["lidc/LIDC-IDRI-0001", "totalsegmentator/chest_crop_pulmonary.nii.gz"])
def test_real_chest_cts_give_reports_marked_with_the_intended_use(name, tmp_path, tiny_model):
    from LungGradCAMLib.options import ExplainOptions

    source = data_path(*name.split("/"))
    _, seg, files = pipeline.run_one(
        source, tmp_path / "out", ExplainOptions(model=str(tiny_model), device="cpu", batch_size=8)
    )
    report = json.loads(files["report"].read_text())
    assert report["chest_check"]["ok"] and report["intended_use"].endswith("Not for clinical use.")
    assert report["outcome"] == (
        f"{len(seg.regions)} hot region{'s' if len(seg.regions) != 1 else ''}"
        if seg.regions
        else f"no region above threshold 0.50 (highest heat {np.floor(seg.peak * 100) / 100:.2f})"
    )


def test_a_real_ct_cut_through_the_lungs_gets_no_hot_region_along_its_cuts():
    """The real contrast CT crop is cut through both lungs on every face. The sliding window's last
    patches used to reach past its last slice and row, padded with air there: each vessel the cut
    ends looked like a nodule, and 13 of the bundled model's 20 hot regions at 0.5 touched those
    two faces (none the first ones). The last patches now end at the volume's edge."""
    ct = load_input(data_path("totalsegmentator", "chest_crop_pulmonary.nii.gz"))
    seg = lgc.segment_cam(lgc.explain(ct, model="default", device="cpu"), threshold=0.5, max_regions=None)
    at_a_cut = [r.name for r in seg.regions if any(a == 0 or b == n for (a, b), n in zip(r.bbox_ijk, ct.shape))]
    assert not at_a_cut and len(seg.regions) <= 4, (at_a_cut, len(seg.regions))


@pytest.mark.slow
def test_demo_takes_a_real_ct_through_the_same_pipeline(tmp_path, capsys, tiny_model):
    """`lunggradcam demo --ct PATH`: after the phantom, the given CT into ct/, with its chest-CT
    check, and the files to open in Slicer (the CT itself among them)."""
    source = data_path("totalsegmentator", "chest_crop_pulmonary.nii.gz")
    assert (
        main(["demo", "--out", str(tmp_path), "--model", str(tiny_model), "--device", "cpu", "--ct", str(source)]) == 0
    )
    out = capsys.readouterr().out
    assert f"2. Your CT, {source}, through the same pipeline:" in out and "chest-CT check: lungs" in out
    report = json.loads((tmp_path / "ct" / "report.json").read_text())
    assert report["input"] == str(source) and report["chest_check"]["ok"]
    assert lgc.same_geometry(lgc.read_volume(tmp_path / "ct" / "cam.nrrd"), lgc.read_volume(source), atol_mm=1e-4)
    ct_line = next(line for line in out.splitlines() if line.startswith("  your CT: "))
    assert str(source.resolve()) in ct_line and str((tmp_path / "ct" / "cam.nrrd").resolve()) in ct_line
    assert main(["demo", "--out", str(tmp_path / "d2"), "--ct", str(tmp_path / "missing")]) == 2  # before any work
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "d2").exists()
