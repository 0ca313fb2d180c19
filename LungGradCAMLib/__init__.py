"""LungGradCAMLib: Grad-CAM explanations of 3D CNNs on lung CT (the engine of the LungGradCAM
Slicer extension). Names are imported lazily so that ``import LungGradCAMLib`` stays fast and
torch is only loaded when a model is used."""

from __future__ import annotations

import importlib
import time
from typing import Any

#: When this package began to be imported (``time.perf_counter()``): a ``lunggradcam`` command's
#: report counts its ``total`` from here, so that the imports (torch, numpy, ...) are in it.
IMPORT_STARTED = time.perf_counter()

__version__ = "0.1.0"

# public name -> module that defines it (the parts: core, io, engine, pipeline, training, evaluation, cli)
_EXPORTS = {
    "Volume": "core.volume",
    "read_volume": "io.volume_files",
    "write_volume": "io.volume_files",
    "same_geometry": "core.volume",
    "resample": "core.volume",
    "resample_to": "core.volume",
    "crop": "core.volume",
    "LungGradCAMError": "core.errors",
    "Explanation": "core.results",
    "Segmentation": "core.results",
    "Region": "core.results",
    "Outline": "core.results",
    "nodule_outline": "engine.outline",
    "measure_outline": "engine.outline",
    "load_dicom_series": "io.dicom",
    "list_dicom_series": "io.dicom_series",
    "SeriesInfo": "io.dicom_series",
    "write_dicom_series": "io.dicom_write",
    "DicomResampledWarning": "io.dicom",
    "DicomDatabase": "io.ctkdb",
    "make_dicom_database": "io.ctkdb_write",
    "lung_mask": "engine.lung",
    "lung_bbox": "engine.lung",
    "load_model": "engine.models",
    "LoadedModel": "engine.models",
    "ModelCard": "engine.models",
    "compute_cam": "engine.cam",
    "CAM": "engine.cam",
    "sliding_cam": "engine.sliding",
    "segment_cam": "pipeline.segment",
    "write_segmentation": "io.segnrrd",
    "explain": "pipeline",
    "write_outputs": "pipeline",
    "ExplainOptions": "options",
}
# lgc.<name> -> module: the parts, the top-level modules, and lgc.metrics (named in the README)
_SUBMODULES = {
    name: name
    for name in ("core", "io", "engine", "training", "evaluation", "cli", "phantom", "mrml", "options", "pipeline")
}
_SUBMODULES["metrics"] = "evaluation.metrics"

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    raise AttributeError(f"module 'LungGradCAMLib' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
