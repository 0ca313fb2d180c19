"""Property tests (hypothesis) of the geometry code: any valid orientation, position and spacing
survives Volume -> DICOM series -> Volume -> NRRD/MHA -> Volume, voxel for voxel.

test_dicom_write.py holds the right-handed case; here every orientation counts: exact axis
permutations with any flips, random rotations, left-handed index frames (which a DICOM reader
returns with k reversed: the same voxels at the same places), sizes down to one row or column,
spacings from 0.1 to 20 mm and origins up to 5 m away; GDCM (SimpleITK) reads the same files as an
independent oracle. Volume files hold any invertible affine, shear included (NIfTI refuses shear).
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from LungGradCAMLib.core.errors import VolumeError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.dicom import load_dicom_series
from LungGradCAMLib.io.dicom_write import write_dicom_series
from LungGradCAMLib.io.volume_files import read_volume, write_volume

TOL_MM = 1e-4
SIGNED_PERMUTATIONS = [
    np.eye(3)[list(p)].T * np.array(s, dtype=float)
    for p in itertools.permutations(range(3))
    for s in itertools.product((1, -1), repeat=3)
]

signs = st.tuples(*[st.sampled_from([1.0, -1.0])] * 3)
quaternions = st.tuples(*[st.floats(-1, 1)] * 4).filter(lambda q: np.linalg.norm(q) > 0.1)
#: proper or improper orthogonal 3x3 matrices: exact signed permutations, or a random rotation
#: followed by flips of any axes
directions = st.one_of(
    st.sampled_from(range(len(SIGNED_PERMUTATIONS))).map(lambda n: SIGNED_PERMUTATIONS[n]),
    st.builds(lambda q, s: Rotation.from_quat(q).as_matrix() @ np.diag(s), quaternions, signs),
)
spacings = st.tuples(*[st.floats(0.1, 20.0)] * 3)
origins = st.tuples(*[st.floats(-5000.0, 5000.0)] * 3)
shapes = st.tuples(st.integers(2, 4), st.integers(1, 4), st.integers(1, 5))  # K, J, I


def _hu(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 3000, shape).astype(np.float32)


def _voxels_in_space_agree(a: Volume, b: Volume) -> None:
    """Every voxel centre of ``a`` is a voxel centre of ``b`` (within TOL_MM) holding the same value."""
    k, j, i = np.indices(a.shape).reshape(3, -1)
    ras = a.ijk_to_ras_points(np.stack([i, j, k], axis=1))
    ijk = b.ras_to_ijk_points(ras)
    nearest = np.rint(ijk)
    assert np.all(np.abs(b.ijk_to_ras_points(nearest) - ras) <= TOL_MM)
    bi, bj, bk = nearest.astype(int).T
    assert np.array_equal(b.array[bk, bj, bi], a.array[k, j, i])


def _gdcm(folder: Path) -> Volume:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return Volume.from_sitk(reader.Execute())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    direction=directions,
    spacing=spacings,
    origin=origins,
    shape=shapes,
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_orientation_round_trips_through_dicom_and_nrrd(direction, spacing, origin, shape, shuffle, seed):
    volume = Volume(_hu(shape, seed), axis_aligned_matrix(spacing, origin, direction))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dicom"
        write_dicom_series(volume, folder, shuffle_names=shuffle)
        back = load_dicom_series(folder)

        # DICOM readers stack slices along row x column: a left-handed k axis comes back reversed
        expected = volume.ijk_to_ras.copy()
        array = volume.array
        if np.linalg.det(direction) < 0:
            expected[:3, 3] += (shape[0] - 1) * expected[:3, 2]
            expected[:3, 2] *= -1
            array = array[::-1]
        assert np.allclose(back.ijk_to_ras, expected, atol=TOL_MM, rtol=0)
        assert np.array_equal(back.array, array)
        _voxels_in_space_agree(volume, back)

        if min(shape[1:]) > 1:  # GDCM's series reader mishandles slices of one row or column
            oracle = _gdcm(folder)
            assert np.allclose(oracle.ijk_to_ras, back.ijk_to_ras, atol=TOL_MM, rtol=0)
            assert np.array_equal(oracle.array.astype(np.float32), back.array)

        for suffix in (".nrrd", ".mha"):
            again = read_volume(write_volume(back, Path(tmp) / f"ct{suffix}"))
            assert np.allclose(again.ijk_to_ras, back.ijk_to_ras, atol=TOL_MM, rtol=0)
            assert again.array.dtype == back.array.dtype and np.array_equal(again.array, back.array)


shears = st.tuples(*[st.floats(-0.5, 0.5)] * 3)


@settings(max_examples=25, deadline=None)
@given(direction=directions, spacing=spacings, origin=origins, shear=shears, shape=shapes, seed=st.integers(0, 2**16))
def test_any_affine_round_trips_through_volume_files(direction, spacing, origin, shear, shape, seed):
    """NRRD and MHA keep any invertible affine, shear included; NIfTI keeps orthogonal ones (to the
    float32 precision of its header) and refuses sheared ones instead of moving voxels."""
    m = axis_aligned_matrix(spacing, origin, direction)
    sheared = m.copy()
    sheared[:3, :3] = m[:3, :3] @ np.array([[1, shear[0], shear[1]], [0, 1, shear[2]], [0, 0, 1]])
    with tempfile.TemporaryDirectory() as tmp:
        for matrix in (m, sheared):
            volume = Volume(_hu(shape, seed).astype(np.int16), matrix)
            for suffix in (".nrrd", ".mha"):
                back = read_volume(write_volume(volume, Path(tmp) / f"v{suffix}"))
                assert np.allclose(back.ijk_to_ras, matrix, atol=TOL_MM, rtol=0)
                assert back.array.dtype == np.int16 and np.array_equal(back.array, volume.array)
        orthogonal = read_volume(write_volume(Volume(_hu(shape, seed), m), Path(tmp) / "v.nii.gz"))
        float32_mm = 1e-6 * (1.0 + np.abs(m[:3, 3]).max())  # NIfTI stores its affine in float32
        assert np.allclose(orthogonal.ijk_to_ras, m, atol=TOL_MM + float32_mm, rtol=0)
        assert np.array_equal(orthogonal.array, _hu(shape, seed))
        if max(abs(s) for s in shear) > 1e-3:
            with pytest.raises(VolumeError, match="NIfTI cannot hold non-orthogonal"):
                write_volume(Volume(_hu(shape, seed), sheared), Path(tmp) / "s.nii.gz")
            assert not (Path(tmp) / "s.nii.gz").exists()
