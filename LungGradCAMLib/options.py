"""The settings of one explanation, in one type that every face builds and passes on.

The Slicer panel (its parameter node), ``LungGradCAMLogic.process``, ``mrml.explain_volume_node``,
``explain``, ``run_one``, ``run_batch`` and the ``lunggradcam`` command line all build one
:class:`ExplainOptions` and hand it down; it checks every value when it is made, so a wrong option
is refused before any work starts. This module imports neither torch nor slicer: the CLI parser
and the Slicer panel use it before torch is loaded (or installed).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from .core.errors import InvalidInputError
from .engine.methods import METHODS

#: How a scan is covered: ``auto`` picks ``roi`` with a roi, ``whole`` for whole-volume models,
#: else ``sliding`` (see :func:`LungGradCAMLib.pipeline.explain`).
MODES: Tuple[str, ...] = ("auto", "sliding", "whole", "roi")
#: The heat map's scale (``engine.sliding.SCALES``; a test keeps the two equal): ``absolute``, a
#: value means the same evidence on every scan (patch probability x the patch's scaled map, never
#: rescaled per scan); ``relative``, the same map min-max scaled over the scan (its maximum is 1).
SCALES: Tuple[str, ...] = ("absolute", "relative")
#: auto = CUDA, else MPS, else CPU.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: Options that change where or how fast a result is computed, not the result itself.
RUNTIME_ONLY = ("device", "batch_size")

#: A heat-map threshold as :func:`parse_threshold` gives it: a level in [0, 1], ``"otsu"`` or ``"pNN"``.
Threshold = Union[float, str]
Roi = Union[None, np.ndarray, Tuple[Tuple[float, float, float], Tuple[float, float, float]]]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def parse_threshold(value: Any) -> Threshold:
    """A heat-map threshold, the one parser of it: a level in [0, 1] (float), ``"otsu"``, or a
    percentile ``"pNN"`` (0 <= NN <= 100) of the CAM inside the lungs (``("percentile", NN)`` too).
    Text such as ``"0.5"`` becomes 0.5, ``"P99"`` becomes ``"p99"``.

    Raises :class:`InvalidInputError` naming the value otherwise."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "percentile":
        value = f"p{value[1]}"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "otsu":
            return text
        if text.startswith("p") and text[1:2].isdigit():
            percent = _number(text[1:])
            if 0.0 <= percent <= 100.0:
                return f"p{percent:g}"
            raise InvalidInputError(f"threshold {value!r}: a percentile is within 0 to 100, e.g. 'p99'")
        level = _number(text)
        if level != level:  # NaN: no number
            raise InvalidInputError(
                f"threshold {value!r} is not understood: use a heat-map level in [0, 1] "
                "(e.g. 0.5), 'otsu', or a percentile such as 'p99'"
            )
    else:
        level = float("nan") if isinstance(value, bool) else _number(value)
    if 0.0 <= level <= 1.0:
        return level
    raise InvalidInputError(
        f"threshold {value!r} is not a level in [0, 1] (the heat map's range): use a "
        "level in [0, 1] (e.g. 0.5), 'otsu', or a percentile such as 'p99'"
    )


def parse_roi(value: Any) -> Roi:
    """A region to explain: ``None``; a bool mask (K, J, I) on the CT's grid; ``(centre_ras_mm,
    size_mm)`` with size one number (a cube) or three (R, A, S extents), all mm; or the text
    ``"X,Y,Z,SIZE"`` / ``"X,Y,Z,SX,SY,SZ"`` (RAS mm, negative coordinates welcome)."""
    if value is None or isinstance(value, np.ndarray):
        if isinstance(value, np.ndarray) and (value.ndim != 3 or not value.any()):
            raise InvalidInputError("a roi mask must be a non-empty 3-D (K, J, I) boolean array on the CT's grid")
        return None if value is None else value.astype(bool, copy=False)
    if isinstance(value, str):
        try:
            numbers = [float(x) for x in value.replace(",", " ").split()]
        except ValueError:
            numbers = []
        if len(numbers) not in (4, 6):
            raise InvalidInputError(
                f"roi {value!r}: give 'X,Y,Z,SIZE' or 'X,Y,Z,SX,SY,SZ' in RAS mm (e.g. --roi -55.5,-85.6,-116,40)"
            )
        value = (numbers[:3], numbers[3:] if len(numbers) == 6 else numbers[3])
    try:
        centre, size = value
        centre = tuple(float(c) for c in np.asarray(centre, dtype=float).reshape(3))
        size = tuple(float(s) for s in np.broadcast_to(np.asarray(size, dtype=float), (3,)))
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"roi must be a boolean mask or (centre_ras_mm (x, y, z), size_mm (one or three numbers)); got {value!r}"
        ) from None
    if not all(np.isfinite(centre + size)) or min(size) <= 0:
        raise InvalidInputError(
            f"roi centre {list(centre)} mm and size {list(size)} mm must be finite, the size positive"
        )
    return centre, size


def parse_stride(value: Any) -> Optional[Tuple[int, int, int]]:
    """The sliding window's step in model voxels (K, J, I): None or 0 = half a patch; one positive
    int for all axes, or three; text ``"8"`` or ``"8,8,4"``."""
    if value is None or (not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value == 0):
        return None
    if isinstance(value, str):
        values = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple, np.ndarray)):
        values = list(value)
    else:
        values = [value]
    try:
        steps = tuple(int(v) for v in values)
        exact = not any(isinstance(v, bool) for v in values) and all(float(v) == s for v, s in zip(values, steps))
    except (TypeError, ValueError):
        steps, exact = (), False
    if len(steps) == 1:
        steps = steps * 3
    if len(steps) != 3 or not exact or min(steps) < 1:
        raise InvalidInputError(
            f"stride {value!r}: give one positive whole number of model voxels, or three (K, J, I), e.g. 8 or 8,8,4"
        )
    return steps  # type: ignore[return-value]


def parse_count(value: Any, name: str) -> Optional[int]:
    """A positive whole number (``name`` says of what, in the message), or None for 0/None (automatic)."""
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value == 0):
        return None
    try:
        number = int(value)
        exact = float(value) == number
    except (TypeError, ValueError):
        number, exact = 0, False
    if not exact or number < 1 or isinstance(value, bool):
        raise InvalidInputError(f"{name} {value!r}: give a positive whole number (or 0/None for automatic)")
    return number


def parse_device(value: Any) -> Optional[str]:
    """A device: auto (None: CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps (any case)."""
    device = None if value is None else str(value).strip().lower()
    if device is not None and not DEVICE_PATTERN.match(device):
        raise InvalidInputError(f"unknown device {value!r}: use auto, cpu, cuda, cuda:N or mps")
    return None if device in (None, "auto") else device


def _model_name(model: Any) -> str:
    """A model as the user named it: a name or path, or a loaded model's card name."""
    card = getattr(model, "card", None)
    return str(card.name if card is not None else model)


@dataclass
class ExplainOptions:
    """Everything that decides one explanation, checked when made.

    * ``model``: a bundled model name, a model file path, or a loaded ``LoadedModel``;
    * ``method``: one of :data:`METHODS` (None = the model card's ``cam_method``: the method its
      heat maps were scored best with); ``target``: class name or index to explain (None = the
      model card's ``cam_class``); ``layer``: the CAM layer's dotted name, several joined by ``+``
      to fuse them (None = the card's ``target_layer``);
    * ``mode``: one of :data:`MODES`; ``roi``: see :func:`parse_roi` (RAS mm, or a K, J, I mask);
    * ``scale``: one of :data:`SCALES` (``absolute``: a heat-map level means the same on every
      scan, so a scan the model finds nothing in has no hot region; ``relative``: a view whose
      maximum is 1 on every scan);
    * ``threshold``: see :func:`parse_threshold`; ``restrict_to_lungs``: hot regions only inside
      the lung mask; ``chest_check``: refuse a CT that does not hold lungs (see
      :func:`LungGradCAMLib.engine.lung.check_chest_ct`) before the CAM is computed;
    * ``device``: auto / cpu / cuda / cuda:N / mps (None = auto); ``batch_size``: patches per model
      call (None = 8 on CUDA, 2 elsewhere); ``stride``: sliding-window step in model voxels
      (K, J, I; None = half a patch); ``amp``: 16-bit mixed precision on CUDA;
    * ``region_model``: a model made for one region (its card's ``input`` is ``roi``, e.g. the
      bundled ``lidc-malignancy``) asked about each hot region, hottest first: its answer is each
      region's ``second_opinion`` (None = none asked).

    Values are normalised (threshold text to a number, stride to three ints, ``"auto"`` device to
    None); use :func:`dataclasses.replace` for a changed copy (it checks again).
    """

    model: Any = "default"
    method: Optional[str] = None
    target: Optional[Union[str, int]] = None
    layer: Optional[str] = None
    mode: str = "auto"
    roi: Roi = None
    threshold: Threshold = 0.5
    scale: str = "absolute"
    restrict_to_lungs: bool = True
    chest_check: bool = True
    device: Optional[str] = None
    batch_size: Optional[int] = None
    stride: Optional[Tuple[int, int, int]] = None
    amp: bool = False
    region_model: Any = None

    def __post_init__(self) -> None:
        if self.model is None or (isinstance(self.model, str) and not self.model.strip()):
            raise InvalidInputError("model: give a bundled model name (e.g. 'default') or a model file path")
        if self.method is not None and self.method not in METHODS:
            raise InvalidInputError(f"unknown CAM method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise InvalidInputError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.scale not in SCALES:
            raise InvalidInputError(f"unknown heat-map scale {self.scale!r}; use one of {', '.join(SCALES)}")
        if self.target == "":
            self.target = None
        if isinstance(self.target, bool) or not isinstance(self.target, (type(None), str, int, np.integer)):
            raise InvalidInputError(f"target {self.target!r}: give a class name or a class index")
        if self.layer == "":
            self.layer = None
        if self.layer is not None and not isinstance(self.layer, str):
            raise InvalidInputError(f"layer {self.layer!r}: give the dotted name of a module, e.g. features.act6")
        if isinstance(self.region_model, str) and not self.region_model.strip():
            self.region_model = None
        self.roi = parse_roi(self.roi)
        if self.mode == "roi" and self.roi is None:
            raise InvalidInputError(
                "mode 'roi' needs a roi: (centre_ras_mm, size_mm) or a mask (CLI: --roi X,Y,Z,SIZE)"
            )
        self.threshold = parse_threshold(self.threshold)
        self.device = parse_device(self.device)
        self.batch_size = parse_count(self.batch_size, "batch size")
        self.stride = parse_stride(self.stride)
        for name in ("restrict_to_lungs", "chest_check", "amp"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InvalidInputError(f"{name} must be True or False; got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))

    @property
    def model_name(self) -> str:
        """The model as the user named it (a loaded model: its card's name)."""
        return _model_name(self.model)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able options, as recorded in ``report.json`` (a roi mask as ``"mask"``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model_name
        out["region_model"] = None if self.region_model is None else _model_name(self.region_model)
        if isinstance(self.roi, np.ndarray):
            out["roi"] = "mask"
        elif self.roi is not None:
            out["roi"] = [list(self.roi[0]), list(self.roi[1])]
        if self.stride is not None:
            out["stride"] = list(self.stride)
        if isinstance(self.target, np.integer):
            out["target"] = int(self.target)
        return out

    def result_options(self) -> Dict[str, Any]:
        """:meth:`to_dict` without the options that only decide where and how fast
        (:data:`RUNTIME_ONLY`): two runs with equal result options give the same result."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}


#: Each setting's default: the field defaults of :class:`ExplainOptions`, the one place they are
#: written. The command line, the Slicer panel and :func:`~LungGradCAMLib.pipeline.segment.segment_cam`
#: take theirs from here.
DEFAULTS: Dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ExplainOptions)}


def options_from(options: Optional[ExplainOptions], keywords: Dict[str, Any]) -> ExplainOptions:
    """The one door of the functions that take settings as ``options`` or as keywords
    (:func:`~LungGradCAMLib.pipeline.explain`, ``mrml.explain_volume_node``, the Slicer logic's
    ``process``): ``options``, or an :class:`ExplainOptions` made once of ``keywords``; both at once
    is refused."""
    if options is None:
        return ExplainOptions(**keywords)
    if not isinstance(options, ExplainOptions):
        raise InvalidInputError(f"options must be an ExplainOptions, got {type(options).__name__}")
    if keywords:
        raise InvalidInputError(
            f"give the settings either as options=ExplainOptions(...) or as keywords, "
            f"not both (also given: {', '.join(sorted(keywords))})"
        )
    return options
