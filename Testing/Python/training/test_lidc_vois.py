"""Real nodules: the LIDC VOI source, background regions, nodule placement, fixed splits."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from LungGradCAMLib.core.errors import DataError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.volume_files import write_volume
from LungGradCAMLib.training import data, lidc, placement

from helpers import data_path, write_voi_folder

SIZE = (16, 16, 16)
SPACING = (1.5, 1.5, 1.5)


@pytest.fixture
def voi_folder(tmp_path):
    root = tmp_path / "vois"
    write_voi_folder(
        root, [("P1", 1, "Benign", 3), ("P1", 2, "Malign", 5), ("P2", 1, "Malign", 6), ("P3", 1, "Benign", 2)]
    )
    return root


def test_records_read_the_table_and_skip_missing_files(voi_folder, caplog):
    (voi_folder / "image" / "P3_R_1.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        records = lidc.lidc_voi_records(voi_folder)
    assert [(r.patient, r.nodule_id, r.malignant) for r in records] == [("P1", "1", 0), ("P1", "2", 1), ("P2", "1", 1)]
    assert records[1].malignancy == 4 and records[1].diameter_mm == pytest.approx(8.0)
    assert "P3_R_1.nii.gz" in caplog.text  # the missing file is named
    image, mask = records[2].load()
    assert image.array.dtype == np.float32 and mask.dtype == bool and mask.sum() > 100
    assert np.allclose(image.spacing, (0.8, 0.8, 1.25))


def test_records_errors_name_the_file(voi_folder):
    with pytest.raises(DataError, match="nodules.csv"):
        lidc.lidc_voi_records(voi_folder / "image")
    text = (voi_folder / "nodules.csv").read_text().replace("Malign,", "Maybe,", 1)
    (voi_folder / "nodules.csv").write_text(text)
    with pytest.raises(DataError, match="line 3: Diagnosis"):
        lidc.lidc_voi_records(voi_folder)
    for p in (voi_folder / "image").iterdir():
        p.unlink()
    (voi_folder / "nodules.csv").write_text(text.replace("Maybe,", "Malign,"))
    with pytest.raises(DataError, match="none of its rows"):
        lidc.lidc_voi_records(voi_folder)


def test_empty_mask_is_named(voi_folder):
    record = lidc.lidc_voi_records(voi_folder)[0]
    blank = Volume(np.zeros((12, 20, 20), np.int16), axis_aligned_matrix((0.8, 0.8, 1.25), (10.0, 20.0, -100.0)))
    write_volume(blank, record.mask)
    with pytest.raises(DataError, match="P1_R_1.nii.gz: the nodule mask is empty"):
        record.load()


def test_malignancy_patches_keep_the_nodule_and_its_mask(voi_folder):
    records = lidc.lidc_voi_records(voi_folder)
    ps = lidc.lidc_voi_patches(records, SIZE, SPACING, task="malignancy", placements=2, seed=1)
    assert ps.class_names == ["benign", "malignant"] and len(ps) == 8
    assert ps.labels.tolist() == [0, 0, 1, 1, 1, 1, 0, 0] and ps.patients.tolist()[:4] == ["P1"] * 4
    for n, record in enumerate(np.repeat(records, 2)):
        hu, mask, _ = lidc.voi_on_grid(record, SPACING, SIZE)
        assert np.array_equal(ps.masks[n], mask)
        # the placed nodule's HU are the source's (int16-rounded) wherever the outline is
        assert np.array_equal(ps.patches[n][mask], np.rint(hu[mask]).astype(np.int16))
        # no background given: outside the VOI's field of view the patch is air
        assert np.all(ps.patches[n][~np.isfinite(hu)] == data.AIR_HU)


def test_paste_and_weights():
    mask = np.zeros((9, 9, 9), bool)
    mask[3:6, 3:6, 3:6] = True
    w = placement.feather_weight(mask, (1.0, 1.0, 1.0), 2.0)
    assert np.all(w[mask] == 1) and w[4, 4, 7] == pytest.approx(0.0) and w[4, 4, 6] == pytest.approx(0.5)
    source = np.full(mask.shape, 100.0, np.float32)
    source[0] = np.nan  # outside the source's field of view
    out = placement.paste(np.full(mask.shape, -800.0, np.float32), source, np.ones(mask.shape, np.float32))
    assert np.all(out[1:] == 100) and np.all(out[0] == -800)
    inner = placement.inner_weight(np.isfinite(source), (1.0, 1.0, 1.0), 2.0)
    assert np.all(inner[0] == 0) and inner[1, 4, 4] == pytest.approx(0.5) and inner[5, 4, 4] == 1.0
    assert inner[5, 0, 0] == 1.0  # the array's own border is not an edge of the field of view


@pytest.fixture(scope="module")
def chest_backgrounds(tmp_path_factory):
    """Background regions from one real chest CT cut into bands (the test module's real data)."""
    folder = tmp_path_factory.mktemp("bg")
    manifest = folder / "backgrounds.csv"
    manifest.write_text(f"image,split\n{data_path('full_chest_ct', 'dicom')},bands\n")
    return placement.load_backgrounds(manifest, (3.0, 3.0, 3.0), (12, 12, 12))


def test_background_bands_keep_test_apart(chest_backgrounds):
    regions = {b.split: b for b in chest_backgrounds}
    assert sorted(regions) == ["test", "train", "validation"]
    slices = {s: np.flatnonzero(b.region.any(axis=(1, 2))) for s, b in regions.items()}
    assert not set(slices["train"]) & set(slices["validation"])
    # every test centre is at least one patch (12 slices) away from every training/validation centre
    others = np.concatenate([slices["train"], slices["validation"]])
    assert np.min(np.abs(slices["test"][:, None] - others[None, :])) >= 12
    rng = np.random.default_rng(0)
    bg = regions["train"]
    depth = bg._map("depth")
    for kind in placement.BACKGROUND_KINDS + placement.PLACEMENT_KINDS:
        centres = placement.sample_centres(bg, kind, 20, rng, radius_mm=3.0)
        assert len(centres) == 20, kind
        k, j, i = centres.T
        assert bg.region[k, j, i].all()
        if kind == "wall":
            assert not bg.lungs[k, j, i].any() and np.all(bg.hu[k, j, i] > -300)
        elif kind == "pleura":
            assert np.all(depth[k, j, i] <= 3.0) and bg.lungs[k, j, i].all()
        elif kind == "juxta_pleural":
            assert np.all(np.abs(depth[k, j, i] - 3.0) <= 1.0)
        elif kind == "parenchyma":
            assert np.all(depth[k, j, i] > 7.0) and np.all(bg._map("vessel")[k, j, i] > 5.0)


def test_bad_background_manifest(tmp_path):
    manifest = tmp_path / "bg.csv"
    manifest.write_text("image,split\nnowhere.nrrd,sometimes\n")
    with pytest.raises(DataError, match="line 2: split must be"):
        placement.load_backgrounds(manifest, SPACING, SIZE)
    manifest.write_text("image,split\nnowhere.nrrd,train\n")
    with pytest.raises(DataError, match="no background scan could be read"):
        placement.load_backgrounds(manifest, SPACING, SIZE)


def test_detection_patches_fix_splits_by_patient_and_region(voi_folder, chest_backgrounds):
    write_voi_folder(voi_folder.parent / "more", [(f"Q{n}", 1, "Benign", 3) for n in range(6)])
    records = lidc.lidc_voi_records(voi_folder) + lidc.lidc_voi_records(voi_folder.parent / "more")
    ps = lidc.lidc_voi_detection_patches(
        records,
        chest_backgrounds,
        (12, 12, 12),
        (3.0, 3.0, 3.0),
        fractions=(0.6, 0.2, 0.2),
        placements=3,
        negatives_per_kind=2,
        phantom_seeds=[5, 6, 7],
        phantom_negatives_per_kind=1,
    )
    assert ps.class_names == ["background", "nodule"] and set(ps.splits) == {"train", "validation", "test"}
    owner = {}
    for patient, split in zip(ps.patients, ps.splits):
        assert owner.setdefault(patient, split) == split  # one split per patient
    negatives = ps.labels == 0
    real_negatives = negatives & np.char.startswith(ps.patients.astype(str), "background:")
    for patient, split in zip(ps.patients[real_negatives], ps.splits[real_negatives]):
        assert patient.endswith(f":{split}")  # a region serves its own split only
    placed = (ps.labels == 1) & np.isin(ps.kinds, placement.PLACEMENT_KINDS)
    assert placed.sum() == 3 * len(records) and set(ps.kinds[placed]) == set(placement.PLACEMENT_KINDS)
    assert {p for p in ps.patients if p.startswith("phantom-")} == {"phantom-5", "phantom-6", "phantom-7"}
    # every patch carries its lesion's voxels: the readers' outline, the phantom's truth, none for negatives
    has_lesion = ps.masks.reshape(len(ps), -1).any(axis=1)
    assert not has_lesion[negatives].any() and has_lesion[placed].all()
    phantom_positives = (ps.labels == 1) & np.char.startswith(ps.patients.astype(str), "phantom-")
    assert has_lesion[phantom_positives].mean() > 0.9  # (a jittered patch may miss a small nodule)


def test_hard_negatives_sit_on_a_model_s_hot_spots(chest_backgrounds):
    """Hard-negative mining: patches of each region around the local maxima of a model's heat map
    in the region's lungs (here an untrained model: any heat), shifted by up to a quarter patch."""
    import torch

    from LungGradCAMLib.engine.lung import lung_bbox
    from LungGradCAMLib.engine.models import LoadedModel, ModelCard, build_model
    from LungGradCAMLib.engine.sliding import sliding_cam

    torch.manual_seed(0)
    card = ModelCard(
        architecture="gradcam3d_cnn",
        kwargs={"width": 2, "num_classes": 2},
        class_names=["background", "nodule"],
        cam_class="nodule",
        target_layer="features.act6",
        patch_size=[12, 12, 12],
        spacing_mm=[3.0, 3.0, 3.0],
        hu_window=[-1000.0, 400.0],
        normalisation="minmax",
    )
    model = LoadedModel(build_model("gradcam3d_cnn", width=2).eval(), card)
    regions = [b for b in chest_backgrounds if b.split == "train"]
    rng = np.random.default_rng(0)
    hu, kinds, names = placement.hard_negative_patches(regions, model, (12, 12, 12), 5, rng, threshold=0.0)
    assert hu.shape == (5, 12, 12, 12) and kinds == ["hard"] * 5 and names == [regions[0].name] * 5
    bg = regions[0]
    where = bg.lungs & bg.region
    cam = sliding_cam(
        model.module,
        torch.from_numpy(bg.hu),
        12,
        6,
        roi=lung_bbox(where, [3, 3, 3]),
        preprocess=model.prepare,
        target=1,
        layer="features.act6",
    ).cam
    hottest = np.unravel_index(np.argmax(np.where(where, cam, -1)), cam.shape)
    # the first patch is the hottest spot's, shifted by at most a quarter patch (3 voxels)
    offsets = np.argwhere(np.ones((7, 7, 7), bool)) - 3
    assert any(np.array_equal(data.crop_patch(bg.hu, np.asarray(hottest) + d, (12, 12, 12)), hu[0]) for d in offsets)

    # a phantom's lungs away from its nodules: the same mining, as negatives of that phantom
    def mine(hu, lungs, clear, patient, draw):
        scan = placement.Background(patient, "train", hu, lungs, clear, (3.0, 3.0, 3.0))
        return placement.hard_negative_patches([scan], model, (12, 12, 12), 3, draw, threshold=0.0)[0]

    ps = data.phantom_patches(
        [5], (12, 12, 12), (3.0, 3.0, 3.0), positives_per_nodule=1, negatives_per_kind=1, hard_negatives=mine
    )
    hard = ps.kinds == "hard"
    assert hard.sum() == 3 and not ps.labels[hard].any() and set(ps.patients[hard]) == {"phantom-5"}
    # another patch size: the model explains with its own, the negatives are cut at the size asked
    assert placement.hard_negative_patches(regions, model, (16, 16, 16), 2, rng, threshold=0.0)[0].shape == (
        2,
        16,
        16,
        16,
    )
    model.card.spacing_mm = [1.5, 1.5, 1.5]
    with pytest.raises(DataError, match="voxels of"):
        placement.hard_negative_patches(regions, model, (12, 12, 12), 5, rng)


def test_a_pasted_real_nodule_holds_the_source_s_hu_and_outline(voi_folder):
    """place_voi: on a grid of the VOI's own spacing, the pasted nodule's voxels are exactly the
    source's HU inside its outline, its mask is the source's, centred where asked, and outside the
    2 mm feather the background is untouched."""
    records = lidc.lidc_voi_records(voi_folder)
    voi = records[2]  # a ball of radius 6 voxels
    image, outline = voi.load()
    spacing = tuple(float(s) for s in image.spacing)
    background = np.full((40, 60, 60), -700.0, np.float32)
    background[::2] = -720.0  # texture, so a background voxel cannot pass for a nodule's
    hu = background.copy()
    where, mask = lidc.place_voi(hu, spacing, voi, (20, 30, 30), feather_mm=2.0)
    assert mask.sum() == outline.sum()
    placed = np.zeros(hu.shape, bool)
    placed[where] = mask
    # the same voxels as the source's outline, shifted so its centre of mass lands on (20, 30, 30)
    shift = np.array([20, 30, 30]) - np.rint(np.argwhere(outline).mean(axis=0)).astype(int)
    np.testing.assert_array_equal(np.argwhere(placed), np.argwhere(outline) + shift)
    np.testing.assert_array_equal(hu[placed], image.array[outline])
    far = ~placement.feather_weight(placed, spacing, 2.0).astype(bool)
    np.testing.assert_array_equal(hu[far], background[far])
    # near an edge: the part inside the array is pasted, the rest left out
    edge = background.copy()
    where, mask = lidc.place_voi(edge, spacing, voi, (1, 30, 30))
    assert 0 < mask.sum() < outline.sum() and where[0].start == 0


def test_a_nodules_placements_do_not_depend_on_the_other_nodules(voi_folder, chest_backgrounds):
    """Each nodule draws its placements from its own stream (seed, patient, nodule): the patches of
    one patient are the same whether or not the other patients were loaded with it."""
    records = lidc.lidc_voi_records(voi_folder)
    size, spacing = (12, 12, 12), (3.0, 3.0, 3.0)
    everyone = lidc.lidc_voi_patches(
        records, size, spacing, backgrounds=chest_backgrounds, placements=3, jitter_vox=1, seed=4
    )
    alone = lidc.lidc_voi_patches(
        [r for r in records if r.patient == "P2"],
        size,
        spacing,
        backgrounds=chest_backgrounds,
        placements=3,
        jitter_vox=1,
        seed=4,
    )
    mine = everyone.patients == "P2"
    assert mine.sum() == len(alone) == 3
    assert np.array_equal(everyone.patches[mine], alone.patches)
    assert np.array_equal(everyone.centres[mine], alone.centres) and np.array_equal(everyone.masks[mine], alone.masks)
    assert everyone.diameters[mine].tolist() == [records[2].diameter_mm] * 3
    reordered = lidc.lidc_voi_patches(
        records[::-1], size, spacing, backgrounds=chest_backgrounds, placements=3, jitter_vox=1, seed=4
    )
    assert np.array_equal(reordered.patches[reordered.patients == "P2"], alone.patches)
    # another seed places them elsewhere; the placements of one nodule differ from each other
    other = lidc.lidc_voi_patches(
        records[2:3], size, spacing, backgrounds=chest_backgrounds, placements=3, jitter_vox=1, seed=5
    )
    assert not np.array_equal(other.patches, alone.patches)
    assert not np.array_equal(alone.patches[0], alone.patches[1])


def test_patch_set_splits_and_masks_round_trip(tmp_path, voi_folder):
    ps = lidc.lidc_voi_patches(lidc.lidc_voi_records(voi_folder), SIZE, SPACING, placements=1)
    ps.splits = np.array(["train", "train", "test", "validation"])
    back = data.PatchSet.load(ps.save(tmp_path / "cache.npz"))
    assert np.array_equal(back.masks, ps.masks) and back.splits.tolist() == ps.splits.tolist()
    assert back.split_index("test").tolist() == [2]
    with pytest.raises(DataError, match="splits must be"):
        data.PatchSet(ps.patches, ps.labels, ps.patients, ps.class_names, SPACING, splits=["a"] * 4)


def test_real_voi_folder():
    root = data_path("lidc_vois")
    records = lidc.lidc_voi_records(root)
    assert len(records) == 795 and len({r.patient for r in records}) == 440
    assert sum(r.malignant for r in records) == 279  # 281 Malign rows, 2 of them without files
    for record in records[::40]:
        image, mask = record.load()
        # the nodule sits where the table says (nodules.csv centres are LPS world mm)
        centre_lps = np.array([float(record.row[c]) for c in ("coordX", "coordY", "coordZ")])
        centre_ras = image.ijk_to_ras_points(np.argwhere(mask).mean(axis=0)[::-1])[0]
        assert np.allclose(centre_ras * [-1, -1, 1], centre_lps, atol=3.0)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """A VOI folder of 8 patients and a backgrounds CSV of one phantom chest cut into bands."""
    from LungGradCAMLib import phantom

    root = tmp_path_factory.mktemp("cli")
    write_voi_folder(root / "vois", [(f"P{n}", 1, "Malign" if n % 2 else "Benign", 3 + n % 3) for n in range(8)])
    chest = phantom.chest_ct(seed=2, shape=(48, 96, 96), spacing_mm=(3.6, 3.6, 5.0))
    write_volume(chest.volume, root / "chest.nrrd")
    (root / "backgrounds.csv").write_text("image,split\nchest.nrrd,bands\n")
    return root


COMMON = [
    "--patch-size",
    "12",
    "12",
    "12",
    "--spacing",
    "3",
    "3",
    "3",
    "--arch-kwargs",
    '{"width": 2}',
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--no-progress",
    "--device",
    "cpu",
]


def test_train_cli_malignancy_folds(cli_inputs, tmp_path):
    from LungGradCAMLib.cli import main
    from LungGradCAMLib.engine.models import ModelCard

    out = tmp_path / "malignancy"
    assert (
        main(
            [
                "train",
                "--source",
                "lidc-vois",
                "--path",
                str(cli_inputs / "vois"),
                "--task",
                "malignancy",
                "--backgrounds",
                str(cli_inputs / "backgrounds.csv"),
                "--placements",
                "2",
                "--folds",
                "2",
                "--out",
                str(out),
            ]
            + COMMON
        )
        == 0
    )
    card = ModelCard.load(out / "fold1" / "best.json")
    assert (
        card.input == "roi" and card.class_names == ["benign", "malignant"] and "ONE lung nodule" in card.intended_use
    )
    split = card.training["split"]
    assert not set(split["train_patients"]) & set(split["test_patients"])
    assert "real LIDC-IDRI nodules" in card.training["data"]
    assert (out / "cv_report.json").is_file()


def test_evaluate_scores_the_cards_own_test_patients_with_its_data_settings(cli_inputs, tmp_path, capsys):
    """The held-out figures of a card come out of `lunggradcam evaluate --model M --out D` exactly:
    the card's data settings and test patients, placements independent of the other patients."""
    import json

    from LungGradCAMLib.cli import main
    from LungGradCAMLib.engine.models import ModelCard

    out = tmp_path / "malignancy"
    assert (
        main(
            [
                "train",
                "--source",
                "lidc-vois",
                "--path",
                str(cli_inputs / "vois"),
                "--task",
                "malignancy",
                "--backgrounds",
                str(cli_inputs / "backgrounds.csv"),
                "--placements",
                "2",
                "--test-fraction",
                "0.4",
                "--out",
                str(out),
            ]
            + COMMON
        )
        == 0
    )
    card = ModelCard.load(out / "best.json")
    assert card.training["data_spec"]["placements"] == 2 and card.training["data_spec"]["task"] == "malignancy"
    test = card.training["split"]["test_patients"]
    assert 0 < len(test) < 8
    capsys.readouterr()
    assert (
        main(["evaluate", "--model", str(out / "best.safetensors"), "--out", str(tmp_path / "eval"), "--device", "cpu"])
        == 0
    )
    assert f"scoring the model card's {len(test)} test patients" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["data"]["patients"] == len(test) and report["data"]["patches"] == 2 * len(test)

    def strict(value):  # the card is strict JSON: NaN is null there
        return json.loads(json.dumps(value).replace("NaN", "null"))

    for name, value in report["metrics"].items():  # exactly the card's held-out figures
        assert strict(value) == card.metrics[name], name
    assert strict(report["diameter_baseline"]) == card.metrics["diameter_baseline"]
    assert "training patients" in report["diameter_baseline"]["threshold_from"]
    assert strict(report["size_bands"]) == card.metrics["size_bands"]
    # a setting given on the command line overrides the card's; --all-patients scores everyone
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out / "best.safetensors"),
                "--out",
                str(tmp_path / "all"),
                "--device",
                "cpu",
                "--all-patients",
                "--placements",
                "1",
            ]
        )
        == 0
    )
    assert "all 8 patients of the data" in capsys.readouterr().out
    assert json.loads((tmp_path / "all" / "report.json").read_text())["data"]["patches"] == 8


def test_train_and_evaluate_cli_nodule_fixed_splits(cli_inputs, tmp_path, capsys):
    import json

    from LungGradCAMLib.cli import main
    from LungGradCAMLib.engine.models import ModelCard

    out = tmp_path / "nodule"
    data_args = [
        "--source",
        "lidc-vois",
        "--path",
        str(cli_inputs / "vois"),
        "--task",
        "nodule",
        "--backgrounds",
        str(cli_inputs / "backgrounds.csv"),
        "--negatives-per-region",
        "3",
    ]
    assert main(["train"] + data_args + ["--out", str(out)] + COMMON) == 0
    card = ModelCard.load(out / "best.json")
    assert card.input == "scan" and card.class_names == ["background", "nodule"]
    split = card.training["split"]
    assert any(p.endswith(":test") for p in split["test_patients"])  # the test background region
    assert not set(split["train_patients"]) & set(split["test_patients"])
    assert main(["train"] + data_args + ["--out", str(tmp_path / "x"), "--folds", "2"] + COMMON) == 2
    assert "--folds cannot re-split" in capsys.readouterr().err
    assert (
        main(
            ["evaluate", "--model", str(out / "best.safetensors"), "--out", str(tmp_path / "eval"), "--device", "cpu"]
            + data_args
        )
        == 0
    )
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["data"]["patients"] == len(split["test_patients"])  # the test split, rebuilt
    no_backgrounds = data_args[:6]
    assert main(["train"] + no_backgrounds + ["--out", str(tmp_path / "y")] + COMMON) == 2
    assert "needs --backgrounds" in capsys.readouterr().err
