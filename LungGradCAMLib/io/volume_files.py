"""Volume files: :func:`read_volume` and :func:`write_volume` for NRRD (.nrrd, .nhdr), NIfTI
(.nii, .nii.gz) and MetaImage (.mha, .mhd), through SimpleITK, with the checks a hostile or
broken file needs (a data file elsewhere than beside its header, a size over the limits, NaN or
infinite voxels, NIfTI headers ITK would silently fix up). Arrays are K, J, I; geometry RAS mm
(:class:`~LungGradCAMLib.core.volume.Volume`)."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import UnsupportedFormatError, VolumeError
from ..core.limits import check_voxel_limit
from ..core.paths import check_path, kind, open_regular
from ..core.volume import Volume

SUPPORTED_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: Bytes of an NRRD or MetaImage header that are searched for a detached data file.
HEADER_BYTES = 1 << 16


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _detached_data(path: Path, suffix: str) -> None:
    """Refuse an NRRD ``data file:`` or MetaImage ``ElementDataFile`` that names data anywhere but
    in one regular file beside the header (``/etc/passwd``, ``../secret``, ``/dev/zero``, a FIFO,
    lists and patterns of files): ITK would read whatever it names."""
    nrrd = suffix in (".nrrd", ".nhdr")
    if not nrrd and suffix not in (".mha", ".mhd"):
        return
    with open_regular(path) as f:
        head = f.read(HEADER_BYTES).decode("latin-1")
    lines = head.split("\n")[1:] if nrrd else head.split("\n")  # NRRD starts with its magic line
    value = None
    for line in lines:
        line = line.rstrip("\r")
        if nrrd and not line:
            break  # the end of the header
        field, sep, rest = line.partition(": " if nrrd else "=")
        if sep and field.strip().lower() in (("data file", "datafile") if nrrd else ("elementdatafile",)):
            value = rest.strip()
            break
    if value is None or (not nrrd and value.upper() == "LOCAL"):
        return  # the data follows the header in this file
    where = f"{path}: its header names the data file {value!r}"
    if len(value.split()) != 1 or value.upper() == "LIST":
        raise VolumeError(
            f"{where}: lists or numbered patterns of data files are not read; write the volume as one file (e.g. .nrrd)"
        )
    data = path.parent / value
    if os.path.isabs(value) or Path(value).name != value or data.resolve().parent != path.resolve().parent:
        raise VolumeError(
            f"{where}, which is not beside the header: only a data file in the header's own "
            "folder is read; copy the data beside it"
        )
    try:
        mode = os.stat(data).st_mode
    except OSError as exc:
        raise VolumeError(f"{where}, which cannot be read ({exc.strerror})") from None
    if kind(mode) != "file":
        raise VolumeError(f"{where}, which is a {kind(mode)}, not a file")


def _nonfinite_message(path: Path, count: int, first_ijk: Sequence[int]) -> str:
    return (
        f"{path}: {count} voxels are NaN or infinite (the first at voxel i, j, k = "
        f"{', '.join(str(int(v)) for v in first_ijk)}); fix or mask them before use"
    )


#: Raw NIfTI-1 (header of 348 bytes) and NIfTI-2 (540) fields: offset, type, count. ITK reports
#: them only after its fix-ups, which are the silent changes checked here.
_NIFTI_FIELDS = {
    348: {
        "dim": (40, "i2", 8),
        "datatype": (70, "i2", 1),
        "pixdim": (76, "f4", 8),
        "vox_offset": (108, "f4", 1),
        "scl": (112, "f4", 2),
    },
    540: {
        "dim": (16, "i8", 8),
        "datatype": (12, "i2", 1),
        "pixdim": (104, "f8", 8),
        "vox_offset": (168, "i8", 1),
        "scl": (176, "f8", 2),
    },
}


def _check_nifti(path: Path) -> None:
    """What ITK's NIfTI reader would change silently: non-positive or non-finite voxel sizes
    (read as 1 mm), a non-finite scaling (ignored), and NaN/Inf float voxels (read as 0)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read(540)
        order = next(
            (o for o in "<>" if len(raw) >= 4 and int(np.frombuffer(raw[:4], o + "i4")[0]) in _NIFTI_FIELDS), None
        )
        if order is None:
            return  # not a NIfTI header: ITK says so
        h = {
            name: np.frombuffer(raw, order + t, n, offset)
            for name, (offset, t, n) in _NIFTI_FIELDS[int(np.frombuffer(raw[:4], order + "i4")[0])].items()
        }
        n_spatial = int(min(max(h["dim"][0], 1), 3))
        pixdim = h["pixdim"][1 : 1 + n_spatial].astype(float)
        if not np.all(np.isfinite(pixdim) & (pixdim > 0)):
            raise VolumeError(
                f"{path}: NIfTI voxel size pixdim = {pixdim.tolist()} mm; each must be a positive "
                "number (ITK would read 1 mm): fix the header"
            )
        if not np.all(np.isfinite(h["scl"])):
            raise VolumeError(
                f"{path}: NIfTI scaling scl_slope, scl_inter = {h['scl'].tolist()} is not finite: fix the header"
            )
        dtype = {16: "f4", 64: "f8"}.get(int(h["datatype"][0]))
        if dtype is None:
            return
        item = np.dtype(order + dtype)
        f.seek(int(h["vox_offset"][0]))
        count, first, done = 0, -1, 0
        while True:  # in chunks of 4 Mi voxels: the check allocates no volume
            chunk = np.frombuffer(f.read(item.itemsize << 22), dtype=item)
            if not chunk.size:
                break
            bad = np.flatnonzero(~np.isfinite(chunk))
            if bad.size and first < 0:
                first = done + int(bad[0])
            count, done = count + bad.size, done + chunk.size
    if count:
        nx, ny = int(h["dim"][1]), int(h["dim"][2]) if n_spatial > 1 else 1
        raise VolumeError(_nonfinite_message(path, count, (first % nx, first // nx % ny, first // (nx * ny))))


def read_volume(path: "str | os.PathLike[str]") -> Volume:
    """Read a .nrrd/.nhdr/.nii/.nii.gz/.mha/.mhd scalar volume (any pixel type) into a Volume.

    Raises :class:`VolumeError`, naming the file, for: a path that is not a regular file (a FIFO,
    a device), a header whose data file lies elsewhere than beside it, a declared size over the
    voxel or memory limit (checked from the header, before reading), NaN/Inf voxels, and voxel
    sizes or positions that are not those of a CT (see :class:`Volume`).

    Example::

        >>> import LungGradCAMLib as lgc
        >>> path = lgc.write_volume(lgc.phantom.chest_ct(seed=3).volume, "ct.nrrd")
        >>> lgc.read_volume(path).array.shape
        (96, 192, 192)
    """
    import SimpleITK as sitk

    path = check_path(path, "volume file")
    suffix = _suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFormatError(
            f"{path}: unsupported volume format; use one of {', '.join(SUPPORTED_SUFFIXES)} (or a DICOM folder)"
        )
    try:
        what = kind(os.stat(path).st_mode)
    except FileNotFoundError:
        raise VolumeError(f"{path}: no such file") from None
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read it ({exc.strerror})") from None
    if what != "file":
        raise VolumeError(f"{path}: a {what}, not a volume file")
    try:
        _detached_data(path, suffix)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read it ({exc.strerror})") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = reader.GetSize()
        one = sitk.Image([1] * len(size), reader.GetPixelID(), reader.GetNumberOfComponents())
        # ITK's buffer and the numpy copy of it
        check_voxel_limit(size[::-1], str(path), bytes_per_voxel=2 * sitk.GetArrayViewFromImage(one).nbytes)
        if suffix in (".nii", ".nii.gz"):
            _check_nifti(path)
        image = reader.Execute()
    except (RuntimeError, OSError, EOFError) as exc:
        raise VolumeError(f"{path}: cannot read the volume ({str(exc).strip().splitlines()[-1]})") from None
    try:
        volume = Volume.from_sitk(image, {"source": str(path)})
    except VolumeError as exc:  # 2D/4D or vector images, broken geometry: name the file
        raise VolumeError(f"{path}: {exc}") from None
    if volume.array.dtype.kind == "f":
        bad = ~np.isfinite(volume.array)
        if bad.any():
            k, j, i = np.unravel_index(int(np.argmax(bad)), bad.shape)
            raise VolumeError(_nonfinite_message(path, int(np.count_nonzero(bad)), (i, j, k)))
    return volume


def write_volume(
    volume: Volume, path: "str | os.PathLike[str]", compress: bool = True, compression_level: int = 1
) -> Path:
    """Write ``volume`` to .nrrd/.nii/.nii.gz/.mha atomically (temporary name, then rename).

    ``compress``: gzip the voxels (where the format can), at zlib ``compression_level`` (1, the
    default, is the fastest: on a CT-sized heat map it takes half the time of the zlib default for
    a file about as small). NIfTI holds only orthogonal axes: a sheared ``ijk_to_ras`` raises
    :class:`VolumeError` there."""
    import SimpleITK as sitk

    path = check_path(path, "output file")
    if _suffix(path) not in SUPPORTED_SUFFIXES:
        raise UnsupportedFormatError(f"{path}: unsupported volume format; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if _suffix(path) in (".nii", ".nii.gz"):
        unit = volume.direction
        if np.max(np.abs(unit.T @ unit - np.eye(3))) > 1e-4:  # > rounding of DICOM's 6-digit cosines
            # ITK would "coerce" the axes to orthogonal and silently move voxels by millimetres
            raise VolumeError(
                f"{path}: NIfTI cannot hold non-orthogonal (sheared) axes; write .nrrd or "
                ".mha, or resample the volume onto an orthogonal grid first"
            )
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(volume.to_sitk(), str(tmp), compress, int(compression_level))
        except RuntimeError:  # ITK's 9 lines say only that the writer stopped: a full disk, a file size limit
            free = shutil.disk_usage(tmp.parent).free / 1e6 if tmp.parent.is_dir() else 0.0
            raise OSError(errno.EIO, f"the image writer stopped with {free:.1f} MB free there", str(path)) from None
    return path
