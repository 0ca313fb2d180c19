"""The synthetic chest CT: geometry, determinism, anatomy and HU per tissue, nodules, noise."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from LungGradCAMLib import phantom
from LungGradCAMLib.core.errors import InvalidInputError
from LungGradCAMLib.core.volume import Volume
from LungGradCAMLib.phantom import TISSUES, NoduleSpec

# an adult chest at a coarse, quick resolution (FOV 317 x 317 x 216 mm)
SHAPE = (72, 144, 144)
SPACING = (2.2, 2.2, 3.0)
VOXEL_MM3 = float(np.prod(SPACING))


@pytest.fixture(scope="module")
def chest():
    return phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING)


@pytest.fixture(scope="module")
def empty_chest():
    """The same patient without nodules."""
    return phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING, nodules=[])


@pytest.fixture(scope="module")
def kinds_chest(empty_chest):
    """One nodule of every kind/margin, at valid random positions in the lungs of seed 11."""
    rng = np.random.default_rng(5)
    specs = phantom.random_nodules(
        rng, empty_chest.lungs, empty_chest.volume, 4, placements=["parenchymal"], diameter_mm=(14.0, 20.0)
    )
    looks = [("solid", "smooth"), ("ground-glass", "lobulated"), ("part-solid", "spiculated"), ("calcified", "smooth")]
    specs = [replace(s, kind=k, margin=m) for s, (k, m) in zip(specs, looks)]
    return phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING, nodules=specs)


def eroded(mask: np.ndarray, voxels: int = 1) -> np.ndarray:
    """The mask without its boundary voxels (keeps statistics clear of partial volume)."""
    return ndimage.binary_erosion(mask, iterations=voxels)


def tissue(ph: phantom.Phantom, name: str) -> np.ndarray:
    return ph.tissues == TISSUES[name]


# ---------------------------------------------------------------------------------------------
# geometry and determinism
# ---------------------------------------------------------------------------------------------
def test_axial_geometry_and_meta(chest):
    vol = chest.volume
    assert vol.shape == SHAPE and vol.array.dtype == np.float32
    sx, sy, sz = SPACING
    # i toward the patient's left, j posterior, k superior (a standard axial DICOM in Slicer)
    np.testing.assert_allclose(vol.ijk_to_ras[:3, :3], np.diag([-sx, -sy, sz]))
    centre = vol.ijk_to_ras_points((np.array(SHAPE[::-1]) - 1) / 2)[0]
    np.testing.assert_allclose(centre, (0.0, 0.0, -150.0), atol=1e-9)
    assert vol.meta["modality"] == "CT" and vol.meta["patient_id"] == "LGC-PHANTOM-11"
    for key in ("study_uid", "series_uid", "frame_of_reference_uid"):
        uid = vol.meta[key]
        assert len(uid) <= 64 and all(
            part.isdigit() and (part == "0" or not part.startswith("0")) for part in uid.split(".")
        )
    assert len({vol.meta[k] for k in ("study_uid", "series_uid", "frame_of_reference_uid")}) == 3
    assert chest.lungs.dtype == bool and chest.lungs.shape == SHAPE
    assert chest.nodule_labelmap.dtype == np.int16 and chest.nodule_labelmap.shape == SHAPE
    assert chest.tissues.dtype == np.uint8 and chest.tissues.shape == SHAPE


def test_deterministic_per_seed(chest):
    again = phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING)
    np.testing.assert_array_equal(again.volume.array, chest.volume.array)
    np.testing.assert_array_equal(again.nodule_labelmap, chest.nodule_labelmap)
    np.testing.assert_array_equal(again.tissues, chest.tissues)
    assert again.nodules == chest.nodules
    assert again.volume.meta == chest.volume.meta
    other = phantom.chest_ct(seed=12, shape=SHAPE, spacing_mm=SPACING)
    assert not np.array_equal(other.lungs, chest.lungs)
    assert other.nodules != chest.nodules
    assert other.volume.meta["series_uid"] != chest.volume.meta["series_uid"]


def test_anatomy_does_not_depend_on_nodules(chest, empty_chest):
    assert not empty_chest.nodules and not empty_chest.nodule_labelmap.any()
    np.testing.assert_array_equal(chest.lungs, empty_chest.lungs)
    # away from every nodule's reach (spicules, blur), the images are identical
    kji = np.indices(SHAPE).reshape(3, -1).T
    ras = chest.volume.ijk_to_ras_points(kji[:, ::-1])
    away = np.ones(len(ras), bool)
    for spec in chest.nodules:
        away &= np.linalg.norm(ras - spec.center_ras, axis=1) > 1.6 * spec.diameter_mm + 8.0
    away = away.reshape(SHAPE)
    assert away.mean() > 0.9
    np.testing.assert_array_equal(chest.volume.array[away], empty_chest.volume.array[away])
    np.testing.assert_array_equal(chest.tissues[away], empty_chest.tissues[away])


# ---------------------------------------------------------------------------------------------
# anatomy and HU
# ---------------------------------------------------------------------------------------------
def test_hu_per_tissue(empty_chest):
    ph, hu = empty_chest, empty_chest.volume.array
    expected = {  # tissue: (low, high) for the mean HU away from the tissue's edges
        "air": (-1010, -990),
        "fat": (-130, -70),
        "muscle": (20, 70),
        "lung": (-910, -790),
        "mediastinum": (-130, -50),
        "heart": (15, 65),
        "blood": (15, 65),
        "abdomen": (30, 80),
    }
    for name, (low, high) in expected.items():
        core = eroded(tissue(ph, name), 2 if name != "lung" else 1)
        assert core.sum() > 50, name
        assert low <= hu[core].mean() <= high, (name, hu[core].mean())
    bone = hu[eroded(tissue(ph, "bone"))]
    assert 300 <= bone.mean() <= 1200 and np.percentile(bone, 99) > 500
    # the whole lung (vessels and bronchi included) as a lung-window reader sees it
    assert -900 <= hu[ph.lungs].mean() <= -790
    # parenchymal texture: more spread than noise alone, denser toward the back (gravity)
    lung_core = eroded(tissue(ph, "lung"))
    assert hu[lung_core].std() > 25
    k, j, i = np.nonzero(lung_core)
    front, back = j < np.median(j), j > np.median(j)
    assert hu[k[back], j[back], i[back]].mean() > hu[k[front], j[front], i[front]].mean() + 10


def test_two_lungs_with_airways_vessels_and_bones(empty_chest):
    ph = empty_chest
    labels, n = ndimage.label(ph.lungs)
    sizes = np.bincount(labels.ravel())[1:]
    assert n == 2 or (np.sort(sizes)[:-2].sum() < 0.01 * sizes.sum())  # two lungs (stray bits negligible)
    big = np.argsort(sizes)[-2:] + 1
    x_of = [ph.volume.ijk_to_ras_points(np.argwhere(labels == b)[:, ::-1]).mean(axis=0)[0] for b in big]
    assert min(x_of) < -30 and max(x_of) > 30  # one per side
    litres = ph.lungs.sum() * VOXEL_MM3 / 1e6
    assert 1.5 < litres < 8.0
    # vessels fill a plausible fraction of the lungs and narrow toward the periphery
    vessel = tissue(ph, "vessel")
    assert 0.01 < vessel.sum() / ph.lungs.sum() < 0.2
    depth = ndimage.distance_transform_edt(ph.lungs, sampling=SPACING[::-1])
    central, peripheral = ph.lungs & (depth > 15), ph.lungs & (depth < 8)
    assert vessel[central].mean() > 2 * vessel[peripheral].mean()  # few visible vessels at the edge
    # trachea: air in the midline above the lungs' middle, outside the lungs
    airway = tissue(ph, "airway") & ~ph.lungs
    top = airway[int(SHAPE[0] * 0.75)]
    assert top.any() and abs(np.argwhere(top)[:, 1].mean() - SHAPE[2] / 2) < 10
    # the carina: the extrapulmonary airway splits into two branches below the trachea
    branch_counts = [ndimage.label(airway[k])[1] for k in range(SHAPE[0])]
    assert max(branch_counts) >= 2
    # vertebrae behind the centre, ribs on both sides
    bone = tissue(ph, "bone")
    ras = ph.volume.ijk_to_ras_points(np.argwhere(bone)[:, ::-1])
    assert (ras[:, 0] > 80).any() and (ras[:, 0] < -80).any()
    assert (np.abs(ras[:, 0]) < 10).any() and ras[np.abs(ras[:, 0]) < 10, 1].mean() < -20
    # the body outline changes with height
    body = (ph.tissues != TISSUES["air"]) & ~tissue(ph, "table")
    body_area = np.array([ndimage.binary_fill_holes(s).sum() for s in body])  # stomach gas is inside
    assert body_area.max() > 1.1 * body_area.min()


def test_noise_level(empty_chest):
    hu = empty_chest.volume.array
    outside = eroded(tissue(empty_chest, "air"), 3)
    assert 15.0 <= hu[outside].std() <= 30.0
    # correlated: neighbours along i are alike, as in a reconstructed CT
    both = outside[:, :, :-1] & outside[:, :, 1:]
    assert both.sum() > 1000
    assert np.corrcoef(hu[:, :, :-1][both], hu[:, :, 1:][both])[0, 1] > 0.3
    quiet = phantom.chest_ct(seed=11, shape=(24, 48, 48), spacing_mm=(6.6, 6.6, 9.0), nodules=[], noise_hu=0)
    assert quiet.volume.array[eroded(quiet.tissues == TISSUES["air"], 2)].std() < 1.0


def test_contrast_enhances_blood():
    plain = phantom.chest_ct(seed=2, shape=(36, 72, 72), spacing_mm=(4.4, 4.4, 6.0), nodules=[])
    enhanced = phantom.chest_ct(seed=2, shape=(36, 72, 72), spacing_mm=(4.4, 4.4, 6.0), nodules=[], contrast=True)
    blood = eroded(plain.tissues == TISSUES["blood"])
    assert enhanced.volume.array[blood].mean() > plain.volume.array[blood].mean() + 150


# ---------------------------------------------------------------------------------------------
# nodules
# ---------------------------------------------------------------------------------------------
def test_default_nodules(chest):
    assert 2 <= len(chest.nodules) <= 5
    assert [n.label for n in chest.nodules] == list(range(1, len(chest.nodules) + 1))
    assert set(np.unique(chest.nodule_labelmap)) == set(range(len(chest.nodules) + 1))
    for spec in chest.nodules:
        mask = chest.nodule_labelmap == spec.label
        assert (chest.lungs | ~mask).all(), "nodules lie in the lungs"
        assert 3.0 <= spec.diameter_mm <= 30.0
        assert np.all(chest.tissues[mask] == TISSUES["nodule"])


def test_kinds_have_their_hu(kinds_chest):
    hu = kinds_chest.volume.array
    by_kind = {spec.kind: kinds_chest.nodule_labelmap == spec.label for spec in kinds_chest.nodules}
    solid = hu[eroded(by_kind["solid"])]
    assert -60 <= solid.mean() <= 80
    ggo = hu[eroded(by_kind["ground-glass"])]
    assert -700 <= np.median(ggo) <= -400
    part = hu[by_kind["part-solid"]]  # ground glass around a solid core
    assert (part < -450).mean() > 0.2 and (part > -150).sum() >= 3
    calcified = hu[eroded(by_kind["calcified"])]
    assert calcified.mean() > 200 and calcified.max() > 450


@pytest.mark.parametrize("margin,tolerance", [("smooth", 0.25), ("lobulated", 0.35), ("spiculated", 0.45)])
def test_nodule_volume_matches_diameter(empty_chest, margin, tolerance):
    rng = np.random.default_rng({"smooth": 1, "lobulated": 2, "spiculated": 3}[margin])
    specs = phantom.random_nodules(
        rng,
        empty_chest.lungs,
        empty_chest.volume,
        3,
        placements=["parenchymal"],
        margins=[margin],
        diameter_mm=(10.0, 20.0),
    )
    ph = phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING, nodules=specs)
    for spec in ph.nodules:
        volume = (ph.nodule_labelmap == spec.label).sum() * VOXEL_MM3
        sphere = np.pi / 6 * spec.diameter_mm**3
        assert abs(volume / sphere - 1) < tolerance, (spec, volume, sphere)
        centroid = ph.volume.ijk_to_ras_points(np.argwhere(ph.nodule_labelmap == spec.label).mean(axis=0)[::-1])[0]
        assert np.linalg.norm(centroid - spec.center_ras) < spec.diameter_mm / 2


def test_placements(empty_chest):
    vessels = empty_chest.tissues == TISSUES["vessel"]
    rng = np.random.default_rng(9)
    wall = np.isin(empty_chest.tissues, [TISSUES[t] for t in ("skin", "fat", "muscle", "bone")])
    for placement in phantom.PLACEMENTS:
        specs = phantom.random_nodules(
            rng,
            empty_chest.lungs,
            empty_chest.volume,
            3,
            vessels=vessels,
            placements=[placement],
            diameter_mm=(6.0, 14.0),
        )
        assert [s.placement for s in specs] == [placement] * 3
        ph = phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING, nodules=specs)
        for spec in ph.nodules:
            mask = ph.nodule_labelmap == spec.label
            ring = ndimage.binary_dilation(mask) & ~mask
            if placement == "parenchymal":
                assert ph.lungs[ring].all(), "a parenchymal nodule is surrounded by lung"
            elif placement == "juxta-pleural":
                assert wall[ring].any(), "a juxta-pleural nodule touches the chest wall"
            else:
                near = ndimage.binary_dilation(mask, iterations=2) & ~mask
                assert vessels[near].any(), "a juxta-vascular nodule touches a vessel"


def test_explicit_nodule_at_ras_centre(empty_chest):
    centre_ijk = np.argwhere(eroded(empty_chest.lungs, 5))[0][::-1]
    centre = tuple(empty_chest.volume.ijk_to_ras_points(centre_ijk)[0])
    spec = NoduleSpec(centre, 10.0, kind="solid", margin="lobulated", malignant=True)
    ph = phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING, nodules=[spec])
    assert ph.nodules == [replace(spec, label=1)]
    assert ph.nodule_labelmap[tuple(centre_ijk[::-1])] == 1
    # a nodule smaller than a voxel still gets its centre voxel
    tiny = phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING, nodules=[replace(spec, diameter_mm=1.0)])
    assert (tiny.nodule_labelmap == 1).sum() >= 1


def test_random_nodules_options(empty_chest):
    rng = np.random.default_rng(0)
    specs = phantom.random_nodules(
        rng,
        empty_chest.lungs,
        empty_chest.volume,
        6,
        kinds=["calcified"],
        margins=["smooth"],
        diameter_mm=(5.0, 8.0),
        malignant_fraction=0.0,
    )
    assert len(specs) == 6
    assert all(s.kind == "calcified" and s.margin == "smooth" and not s.malignant for s in specs)
    assert all(5.0 <= s.diameter_mm <= 8.0 for s in specs)
    centres = np.array([s.center_ras for s in specs])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(6) * 1e3
    assert gaps.min() >= 5.0 + 5.0
    malignant = phantom.random_nodules(rng, empty_chest.lungs, empty_chest.volume, 4, malignant_fraction=1.0)
    assert all(s.malignant and s.kind != "calcified" for s in malignant)


def test_errors(empty_chest):
    with pytest.raises(InvalidInputError, match="seed"):
        phantom.chest_ct(seed=-1)
    with pytest.raises(InvalidInputError, match="shape"):
        phantom.chest_ct(shape=(4, 64, 64))
    with pytest.raises(InvalidInputError, match="spacing_mm"):
        phantom.chest_ct(spacing_mm=(1.0, 0.0, 1.0))
    with pytest.raises(InvalidInputError, match="nodules"):
        phantom.chest_ct(nodules="many")
    with pytest.raises(InvalidInputError, match="kind"):
        NoduleSpec((0.0, 0.0, 0.0), 10.0, kind="glassy")
    with pytest.raises(InvalidInputError, match="diameter_mm"):
        NoduleSpec((0.0, 0.0, 0.0), 0.2)
    outside = NoduleSpec(tuple(empty_chest.volume.ijk_to_ras_points([[2, 2, 2]])[0]), 10.0)
    with pytest.raises(InvalidInputError, match="lungs"):
        phantom.chest_ct(seed=11, shape=SHAPE, spacing_mm=SPACING, nodules=[outside])
    with pytest.raises(InvalidInputError, match="no room"):
        phantom.random_nodules(
            np.random.default_rng(0), empty_chest.lungs, empty_chest.volume, 40, diameter_mm=(30.0, 30.0)
        )
    with pytest.raises(InvalidInputError, match="vessels"):
        phantom.random_nodules(
            np.random.default_rng(0), empty_chest.lungs, empty_chest.volume, 1, placements=["juxta-vascular"]
        )
    # non-strict: as many as fit
    some = phantom.random_nodules(
        np.random.default_rng(0), empty_chest.lungs, empty_chest.volume, 40, diameter_mm=(30.0, 30.0), strict=False
    )
    assert 0 < len(some) < 40


def test_small_field_of_view_gets_a_smaller_patient():
    ph = phantom.chest_ct(seed=1, shape=(20, 40, 40), spacing_mm=(3.0, 3.0, 5.0))
    assert ph.lungs.any() and ph.tissues[0, 0, 0] == TISSUES["air"]
    assert ph.nodule_labelmap.max() == len(ph.nodules)


def test_write_dicom_series_round_trip(tmp_path):
    import SimpleITK as sitk

    ph = phantom.chest_ct(seed=4, shape=(12, 40, 40), spacing_mm=(8.0, 8.0, 12.0), nodules=[])
    files = phantom.write_dicom_series(ph.volume, tmp_path / "dicom", shuffle_names=True)
    assert len(files) == 12
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    image = reader.Execute()
    back = Volume.from_sitk(image)
    np.testing.assert_allclose(back.ijk_to_ras, ph.volume.ijk_to_ras, atol=1e-4)
    np.testing.assert_allclose(back.array, ph.volume.array, atol=0.51)
    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.SeriesInstanceUID == ph.volume.meta["series_uid"] and ds.PatientID == "LGC-PHANTOM-4"
