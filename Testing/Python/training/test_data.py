"""Data sources: phantom patches, LUNA16 layout, CSV manifests, LIDC-IDRI XML, patient splits."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from LungGradCAMLib.core.errors import DataError
from LungGradCAMLib.io.volume_files import write_volume
from LungGradCAMLib.training import data, lidc

from helpers import data_path

SIZE = (16, 16, 16)
SPACING = (3.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def phantom_set():
    return data.phantom_patches([3, 4], SIZE, SPACING, positives_per_nodule=3, negatives_per_kind=2)


def test_crop_patch_places_centre_and_pads():
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    p = data.crop_patch(a, (2, 3, 3), (3, 3, 3))
    assert p[1, 1, 1] == a[2, 3, 3] and np.array_equal(p, a[1:4, 2:5, 2:5])
    corner = data.crop_patch(a, (0, 0, 0), (4, 4, 4), fill=-5)
    assert corner[2, 2, 2] == a[0, 0, 0]
    assert np.all(corner[:2] == -5) and np.array_equal(corner[2:, 2:, 2:], a[:2, :2, :2])
    assert np.all(data.crop_patch(a, (50, 0, 0), (2, 2, 2)) == data.AIR_HU)


def test_phantom_patches_truth(phantom_set):
    from LungGradCAMLib import phantom
    from LungGradCAMLib.core.volume import resample_to

    ps = phantom_set
    assert ps.patch_size == SIZE and ps.class_names == ["background", "nodule"]
    assert set(ps.patients) == {"phantom-3", "phantom-4"} and ps.patches.dtype == np.int16
    assert set(ps.kinds[ps.labels == 0]) == set(data.NEGATIVE_KINDS)
    assert set(ps.kinds[ps.labels == 1]) == {"nodule"}
    # rebuild phantom 3 exactly as phantom_patches does and check every patch against its truth
    shape, spacing, noise = data._phantom_geometry(np.random.default_rng([3, 20240605]))
    ph = phantom.chest_ct(seed=3, shape=shape, spacing_mm=spacing, noise_hu=noise)
    grid = data.to_model_grid(ph.volume, SPACING)
    nodules = resample_to(ph.volume.with_array((ph.nodule_labelmap > 0).astype(np.uint8)), grid, order=0).array
    tissues = resample_to(ph.volume.with_array(ph.tissues), grid, order=0).array
    mine = np.flatnonzero(ps.patients == "phantom-3")
    assert len(mine) == 3 * len(ph.nodules) + 2 * len(data.NEGATIVE_KINDS)
    nodule_centres = np.array([n.center_ras for n in ph.nodules])
    for n in mine:
        kji = np.rint(grid.ras_to_ijk_points(ps.centres[n])[0][::-1])
        assert np.array_equal(ps.patches[n], np.rint(data.crop_patch(grid.array, kji, SIZE)).astype(np.int16))
        holds_nodule = data.crop_patch(nodules, kji, SIZE, fill=0).any()
        if ps.labels[n] == 1:
            # centred on a nodule within the jitter (a quarter patch per axis)
            offset = np.abs(grid.ras_to_ijk_points(nodule_centres) - grid.ras_to_ijk_points(ps.centres[n]))
            assert holds_nodule and np.any(np.all(offset <= SIZE[0] // 4 + 1, axis=1))
        else:
            assert not holds_nodule
            if ps.kinds[n] in ("lung", "vessel", "airway"):
                assert tissues[tuple(kji.astype(int))] == phantom.TISSUES[ps.kinds[n]]


def test_phantom_patches_deterministic(phantom_set):
    again = data.phantom_patches([4], SIZE, SPACING, positives_per_nodule=3, negatives_per_kind=2)
    mine = phantom_set.subset(np.flatnonzero(phantom_set.patients == "phantom-4"))
    assert np.array_equal(again.patches, mine.patches) and np.array_equal(again.labels, mine.labels)


def test_patchset_cache_roundtrip(tmp_path, phantom_set):
    path = phantom_set.save(tmp_path / "cache.npz")
    back = data.PatchSet.load(path)
    assert np.array_equal(back.patches, phantom_set.patches) and back.class_names == phantom_set.class_names
    assert np.array_equal(back.kinds, phantom_set.kinds) and np.allclose(back.centres, phantom_set.centres)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz: not a patch cache"):
        data.PatchSet.load(tmp_path / "bad.npz")
    other = data.PatchSet(
        phantom_set.patches[:, :8, :8, :8], phantom_set.labels, phantom_set.patients, phantom_set.class_names, SPACING
    )
    with pytest.raises(DataError, match="cannot concatenate"):
        data.PatchSet.concatenate([phantom_set, other])


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_luna16_layout_lps_world_coordinates(tmp_path, small_phantom):
    uid = "1.2.826.0.1.3680043.8.498.1"
    (tmp_path / "subset0").mkdir()
    write_volume(small_phantom.volume, tmp_path / "subset0" / f"{uid}.mhd", compress=False)
    nod = small_phantom.nodules[0]
    x, y, z = nod.center_ras
    from scipy import ndimage

    from LungGradCAMLib.phantom import TISSUES

    depth = ndimage.distance_transform_edt(small_phantom.tissues == TISSUES["lung"])
    deepest = np.unravel_index(np.argmax(depth), depth.shape)  # parenchyma far from anything else
    lung_point = small_phantom.volume.ijk_to_ras_points(np.array(deepest)[::-1])[0]
    # LUNA16 world coordinates are LPS: x and y negated
    _write_csv(
        tmp_path / "annotations.csv",
        ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
        [[uid, -x, -y, z, nod.diameter_mm], ["not-present", 1, 2, 3, 4]],
    )
    _write_csv(
        tmp_path / "candidates.csv",
        ["seriesuid", "coordX", "coordY", "coordZ", "class"],
        [[uid, -lung_point[0], -lung_point[1], lung_point[2], 0], [uid, -x, -y, z, 1]],
    )
    samples = data.luna16_samples(tmp_path)
    assert [(s.label, s.kind) for s in samples] == [(1, "nodule"), (0, "candidate")]
    assert np.allclose(samples[0].centre_ras, nod.center_ras)
    ps = data.patches_from_samples(samples, ["background", "nodule"], SIZE, SPACING)
    grid = data.to_model_grid(small_phantom.volume, SPACING)
    kji = grid.ras_to_ijk_points(nod.center_ras)[0][::-1]
    assert np.array_equal(ps.patches[0], np.rint(data.crop_patch(grid.array, kji, SIZE)).astype(np.int16))
    # the nodule (solid, ~0 HU) is at the patch centre; the candidate point is lung
    assert ps.patches[0][8, 8, 8] > -400 and ps.patches[1][8, 8, 8] < -400


def test_luna16_errors(tmp_path):
    with pytest.raises(DataError, match="no .mhd scans"):
        data.luna16_samples(tmp_path)
    (tmp_path / "a.mhd").write_text("x")
    with pytest.raises(DataError, match="neither annotations.csv nor candidates.csv"):
        data.luna16_samples(tmp_path)
    _write_csv(tmp_path / "candidates.csv", ["seriesuid", "coordX", "coordY", "coordZ", "class"], [["a", 1, 2, "z", 0]])
    with pytest.raises(DataError, match="candidates.csv line 2: coordX, coordY, coordZ must be numbers"):
        data.luna16_samples(tmp_path)


def test_manifest(tmp_path, small_phantom):
    write_volume(small_phantom.volume, tmp_path / "ct.nrrd")
    x, y, z = small_phantom.nodules[0].center_ras
    _write_csv(
        tmp_path / "m.csv",
        ["image", "label", "patient", "x", "y", "z", "space"],
        [
            ["ct.nrrd", "nodule", "p1", x, y, z, "RAS"],
            ["ct.nrrd", "nodule", "p1", -x, -y, z, "LPS"],
            [str(tmp_path / "ct.nrrd"), "0", "", "", "", "", ""],
        ],
    )
    samples = data.manifest_samples(tmp_path / "m.csv", ["background", "nodule"])
    assert np.allclose(samples[0].centre_ras, samples[1].centre_ras) and samples[2].centre_ras is None
    assert samples[2].patient == str(tmp_path / "ct.nrrd") and samples[2].label == 0
    ps = data.patches_from_samples(samples, ["background", "nodule"], SIZE, SPACING)
    assert np.array_equal(ps.patches[0], ps.patches[1]) and ps.counts() == {"background": 1, "nodule": 2}
    _write_csv(tmp_path / "bad.csv", ["image", "label"], [["ct.nrrd", "tumour"]])
    with pytest.raises(DataError, match="bad.csv line 2: label 'tumour'"):
        data.manifest_samples(tmp_path / "bad.csv", ["background", "nodule"])
    _write_csv(tmp_path / "nolabel.csv", ["image"], [["ct.nrrd"]])
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\]"):
        data.manifest_samples(tmp_path / "nolabel.csv", ["background", "nodule"])


def test_lidc_xml_consensus_on_real_series():
    from LungGradCAMLib.io.dicom import load_dicom_series

    root = data_path("lidc", "LIDC-IDRI-0001")
    series_uid, readings = lidc.parse_lidc_xml(root / "69.xml")
    assert series_uid.startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.")
    assert len({r.reader for r in readings}) == 4
    volume = load_dicom_series(next(p for p in root.rglob("*.dcm")).parent)
    nodules = lidc.lidc_nodules(root / "69.xml", volume)
    big = nodules[0]
    assert sorted(big.malignancy) == [4, 5, 5, 5] and big.label == 1 and len(big.readers) == 4
    zs = volume.ijk_to_ras_points(np.argwhere(big.mask)[:, ::-1])[:, 2]
    assert -125.5 <= zs.min() and zs.max() <= -107 and big.mask.any(axis=(1, 2)).sum() >= 6
    # a large nodule: several cm^3, and consensus (>= 2 of 4) lies within the union of outlines
    assert 2000 < big.mask.sum() * np.prod(volume.spacing) < 60000
    assert -125.5 <= big.centre_ras[2] <= -107


def test_lidc_partial_nodule_and_bad_xml(tmp_path):
    from LungGradCAMLib.io.dicom import load_dicom_series

    root = data_path("lidc", "LIDC-IDRI-0002")
    volume = load_dicom_series(next(p for p in root.rglob("*.dcm")).parent)
    nodules = lidc.lidc_nodules(root / "71.xml", volume)
    rated = [n for n in nodules if n.malignancy]
    assert rated and sorted(rated[0].malignancy) == [4, 5] and rated[0].label == 1
    assert 1 <= rated[0].mask.any(axis=(1, 2)).sum() <= volume.shape[0]
    (tmp_path / "x.xml").write_text("<LidcReadMessage><oops")
    with pytest.raises(DataError, match="x.xml: not a readable LIDC XML"):
        lidc.parse_lidc_xml(tmp_path / "x.xml")


def test_patient_kfold_and_split():
    patients = np.repeat([f"p{i}" for i in range(7)], [5, 1, 3, 2, 4, 1, 2])
    folds = data.patient_kfold(patients, k=3, seed=1)
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests) == list(range(len(patients)))  # every sample tested exactly once
    for tr, te in folds:
        assert not set(patients[tr]) & set(patients[te])
        assert len(tr) + len(te) == len(patients)
    assert max(len(te) for _, te in folds) - min(len(te) for _, te in folds) <= 2
    parts = data.patient_split(patients[:9], (0.7, 0.15, 0.15), seed=0)  # 3 patients
    assert [len(set(patients[p])) for p in parts] == [1, 1, 1]
    parts = data.patient_split(patients, (0.7, 0.15, 0.15), seed=0)
    assert sum(len(p) for p in parts) == len(patients)
    assert all(not set(patients[a]) & set(patients[b]) for i, a in enumerate(parts) for b in parts[i + 1 :])
    with pytest.raises(DataError, match="k-fold needs"):
        data.patient_kfold(patients, k=8)


def test_lidc_patches_from_real_folder():
    root = data_path("lidc")
    ps = lidc.lidc_patches(root, SIZE, SPACING)
    assert ps.class_names == ["benign", "malignant"]
    assert sorted(set(ps.patients)) == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    first = ps.subset(np.flatnonzero(ps.patients == "LIDC-IDRI-0001"))
    assert list(first.labels) == [1]
    # the big solid nodule fills the patch centre (soft tissue, not lung)
    assert first.patches[0][8, 8, 8] > -300
