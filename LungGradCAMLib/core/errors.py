"""Errors a user can cause. Every one derives from :class:`LungGradCAMError`.

The message of each error says what was wrong (naming the file, series or option) and what to do.
The CLI prints the message without a traceback and exits with status 2.
"""

from __future__ import annotations


class LungGradCAMError(Exception):
    """Base of every error caused by the user's input, files, models or settings."""


class InvalidInputError(LungGradCAMError, ValueError):
    """An argument has a wrong type, shape or value."""


class VolumeError(InvalidInputError):
    """A volume is malformed: wrong dimensions, bad geometry, NaN/Inf voxels, or too large."""


class NotChestCTError(VolumeError):
    """The CT does not look like a chest CT that holds lungs (checked before the CAM is computed)."""


class UnsupportedFormatError(InvalidInputError):
    """A file format or extension that LungGradCAM cannot read or write."""


class DicomError(LungGradCAMError):
    """A DICOM file or series cannot be turned into a volume."""


class NoSeriesFoundError(DicomError):
    """No usable (CT) DICOM series was found where one was expected."""


class AmbiguousSeriesError(DicomError):
    """Several series match and the user must pick one (the message lists them)."""


class SeriesGeometryError(DicomError):
    """Slice positions/orientations do not form a volume (gaps, duplicates, mixed orientations)."""


class DicomDecodeError(DicomError):
    """A DICOM file is unreadable, truncated, or its pixel data cannot be decoded."""


class DatabaseError(LungGradCAMError):
    """A Slicer DICOM database (ctkDICOM.sql) is missing, corrupt, foreign or incomplete."""


class ModelError(LungGradCAMError):
    """A model file or model card is missing, invalid, or does not match its weights."""


class CamError(LungGradCAMError):
    """A CAM cannot be computed as asked (unknown method, bad target or layer)."""


class ResourceError(LungGradCAMError):
    """The work does not fit into the available (GPU) memory even after falling back."""


class OutputError(LungGradCAMError):
    """An output folder cannot be used: not writable, the input itself, a file, or holding files
    that LungGradCAM did not write."""


class FolderBusyError(OutputError):
    """Another run is writing into the same output folder."""


class CancelledError(LungGradCAMError):
    """The user cancelled a long-running operation."""


class DataError(LungGradCAMError):
    """A training/evaluation data source (manifest, annotations, folder) is invalid."""


class LungGradCAMWarning(UserWarning):
    """Something about the user's input or run worth knowing that does not stop it (a series
    resampled onto regular slices, a run moved to the CPU): the CLI prints it as one note."""
