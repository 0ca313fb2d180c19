"""LungGradCAMLib: Grad-CAM explanations of 3D CNNs on lung CT (the engine of the LungGradCAM
Slicer extension). Names are imported lazily so that ``import LungGradCAMLib`` stays fast and
torch is only loaded when a model is used."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Volume": "volume", "read_volume": "volume", "write_volume": "volume",
    "same_geometry": "volume", "resample": "volume", "resample_to": "volume", "crop": "volume",
    "LungGradCAMError": "errors",
    "Explanation": "results", "Segmentation": "results", "Region": "results",
    "load_dicom_series": "dicom", "list_dicom_series": "dicom", "SeriesInfo": "dicom",
    "write_dicom_series": "dicom", "DicomResampledWarning": "dicom",
    "DicomDatabase": "ctkdb",
    "lung_mask": "lung", "lung_bbox": "lung",
    "load_model": "models", "LoadedModel": "models", "ModelCard": "models",
    "compute_cam": "cam", "CAM": "cam", "sliding_cam": "sliding",
    "segment_cam": "segment", "write_segmentation": "segment",
    "explain": "pipeline", "write_outputs": "pipeline", "ExplainOptions": "options",
}
_SUBMODULES = {"phantom", "render", "dicomseg", "mrml", "metrics", "preprocess", "cam", "sliding", "dicom", "ctkdb", "lung",
               "models", "segment", "pipeline", "errors", "volume", "train", "evaluate", "data", "cam_retrain",
               "bench", "atomic", "results", "cli", "options", "limits", "paths"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'LungGradCAMLib' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
