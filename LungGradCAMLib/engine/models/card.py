"""The model card: everything needed to use a set of weights correctly, as plain JSON.

Stored beside the weights as ``<name>.json`` (``<name>.safetensors`` holds the weights).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ...core.atomic import write_json
from ...core.errors import CamError, ModelError
from ...core.paths import open_regular
from ...core.text import escaped
from ..methods import DEFAULT_METHOD
from ..preprocess import NORMALISATIONS

CARD_FORMAT = 1
#: A card is a few kB; refuse to read anything bigger than this (hostile or wrong file).
MAX_CARD_BYTES = 1 << 20
#: Largest patch a card may declare (voxels): 512^3, 8x a whole 64x512x512 scan.
MAX_PATCH_VOXELS = 512**3
ACTIVATIONS = ("softmax", "sigmoid")
#: What a model takes: a whole scan (sliding window over the lungs) or a region around one lesion.
INPUTS = ("scan", "roi")
#: What a model gives: class logits (a classifier, explained with a heat map) or a mask (logits
#: per voxel: a segmenter such as the nodule outline model, never explained).
OUTPUTS = ("classes", "mask")
NOT_CLINICAL = "Not for clinical use."


@dataclass
class ModelCard:
    """What a model is and how to feed it.

    * ``architecture`` / ``kwargs``: ``build_model(architecture, **kwargs)`` rebuilds the network.
    * ``patch_size``: input size in voxels (K, J, I), or None for whole-volume models.
    * ``spacing_mm``: voxel size (i, j, k) in mm the model was trained at.
    * ``hu_window``, ``normalisation`` (``"minmax"``, ``"zscore"``, ``"none"``) and the optional
      enhancements ``gamma``, ``clahe``, ``sobel``: the intensity preprocessing, applied by
      :func:`LungGradCAMLib.engine.preprocess.apply_card_preprocessing` (HU clipped to the window, then
      the window mapped to [0, 1], ...).
    * ``activation``: ``"softmax"`` (trained with cross-entropy) or ``"sigmoid"`` (one-vs-rest
      binary cross-entropy per class).
    * ``class_names``: one per output logit; ``cam_class``: the class explained by default.
    * ``target_layer``: dotted module name of the CAM layer, or several joined by ``+`` (fused);
      ``cam_method``: the CAM method used when the caller does not choose one (the one whose maps
      were scored best for this model, see its ``metrics``).
    * ``training``: data (what, how many, splits), command, seed, epochs...; ``metrics``: held-out
      metrics, each ``{"value", "ci95": [lo, hi]}`` where known.
    * ``sha256``: hex digest of the weights file; ``intended_use``: plain-language statement.
    * ``input``: ``"scan"`` (the model looks for findings anywhere: explained over a whole scan
      with a sliding window) or ``"roi"`` (it judges a region around ONE lesion, e.g. a nodule's
      malignancy: explained only on one patch centred on a region the user gives).
    * ``output``: ``"classes"`` (one logit per class name) or ``"mask"`` (one logit per class name
      and voxel, (N, classes, K, J, I): a segmentation network such as ``nodule-outline``).
    """

    architecture: str
    kwargs: Dict[str, Any]
    class_names: List[str]
    cam_class: str
    target_layer: str
    patch_size: Optional[List[int]] = None
    spacing_mm: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    hu_window: List[float] = field(default_factory=lambda: [-1000.0, 400.0])
    normalisation: str = "minmax"
    gamma: Optional[float] = None
    clahe: Any = None
    sobel: Any = None
    activation: str = "softmax"
    name: str = ""
    version: str = "0.0.0"
    description: str = ""
    training: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    intended_use: str = "Research and demonstration only. " + NOT_CLINICAL
    sha256: str = ""
    input: str = "scan"
    cam_method: str = DEFAULT_METHOD
    output: str = "classes"
    format: int = CARD_FORMAT

    # --- validation --------------------------------------------------------------------------
    def validate(self, source: str = "model card") -> "ModelCard":
        """Check field types and ranges; raise :class:`ModelError` naming ``source`` and the field."""

        def bad(what: str) -> ModelError:
            return ModelError(f"{source}: {what}. Fix the model card (JSON beside the weights).")

        self._check_network(bad)
        self._check_classes_and_text(bad)
        self._check_grid(bad)
        self._check_choices(bad)
        return self

    def _check_network(self, bad: Callable[[str], ModelError]) -> None:
        from .networks import ARCHITECTURES, SEGMENTERS

        if self.architecture not in ARCHITECTURES:
            raise bad(f"unknown architecture {self.architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}")
        if self.output not in OUTPUTS:
            raise bad(f"'output' must be one of {OUTPUTS}; got {self.output!r}")
        if (self.output == "mask") != (self.architecture in SEGMENTERS):
            raise bad(
                f"architecture {self.architecture!r} does not give the card's output {self.output!r}; "
                f"segmenters ({', '.join(sorted(SEGMENTERS))}) give 'mask', the others 'classes'"
            )
        if not isinstance(self.kwargs, dict):
            raise bad("'kwargs' must be an object")
        if not isinstance(self.target_layer, str) or not self.target_layer:
            raise bad("'target_layer' must be a module name such as 'features.act6'")

    def _check_classes_and_text(self, bad: Callable[[str], ModelError]) -> None:
        if (
            not isinstance(self.class_names, list)
            or not self.class_names
            or not all(isinstance(c, str) and c and c.isprintable() for c in self.class_names)
            or len(set(self.class_names)) != len(self.class_names)
        ):
            raise bad("'class_names' must be a non-empty list of distinct names, each one line of printable text")
        for name in ("name", "version", "intended_use"):  # shown on screen and in every output
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.isprintable()):
                raise bad(
                    f"'{name}' must be one line of printable text (no newline, no terminal escape); "
                    f"got '{escaped(value, 80)}'"
                )
        if self.cam_class not in self.class_names:
            raise bad(f"'cam_class' {self.cam_class!r} is not one of class_names {self.class_names}")

    def _check_grid(self, bad: Callable[[str], ModelError]) -> None:
        if self.patch_size is not None:
            if (
                not isinstance(self.patch_size, list)
                or len(self.patch_size) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.patch_size)
            ):
                raise bad(f"'patch_size' must be three positive integers (K, J, I) or null; got {self.patch_size!r}")
            if math.prod(self.patch_size) > MAX_PATCH_VOXELS:
                raise bad(f"'patch_size' {self.patch_size} declares more than {MAX_PATCH_VOXELS} voxels")
        for name, n in (("spacing_mm", 3), ("hu_window", 2)):
            value = getattr(self, name)
            if (
                not isinstance(value, list)
                or len(value) != n
                or not all(_is_number(v) and math.isfinite(v) for v in value)
            ):
                raise bad(f"'{name}' must be {n} finite numbers; got {value!r}")
        if not all(0 < s <= 100 for s in self.spacing_mm):
            raise bad(f"'spacing_mm' must be in (0, 100] mm; got {self.spacing_mm}")
        if not self.hu_window[0] < self.hu_window[1]:
            raise bad(f"'hu_window' must be [low, high] with low < high; got {self.hu_window}")

    def _check_choices(self, bad: Callable[[str], ModelError]) -> None:
        from ..methods import METHODS

        if self.normalisation not in NORMALISATIONS:
            raise bad(f"'normalisation' must be one of {NORMALISATIONS}; got {self.normalisation!r}")
        if self.gamma is not None and not (_is_number(self.gamma) and 0 < self.gamma <= 10):
            raise bad(f"'gamma' must be null or a number in (0, 10]; got {self.gamma!r}")
        if self.clahe not in (None, False, True, "slice", "3d"):
            raise bad(f"'clahe' must be null, true, 'slice' or '3d'; got {self.clahe!r}")
        if not (
            self.sobel is None or isinstance(self.sobel, bool) or (_is_number(self.sobel) and 0 <= self.sobel <= 10)
        ):
            raise bad(f"'sobel' must be null, true/false or a weight in [0, 10]; got {self.sobel!r}")
        if self.cam_method not in METHODS:
            raise bad(f"'cam_method' must be one of {METHODS}; got {self.cam_method!r}")
        if self.input not in INPUTS:
            raise bad(f"'input' must be one of {INPUTS}; got {self.input!r}")
        if self.activation not in ACTIVATIONS:
            raise bad(f"'activation' must be one of {ACTIVATIONS}; got {self.activation!r}")
        if self.format != CARD_FORMAT:
            raise bad(f"card format {self.format!r} is not supported (this version reads {CARD_FORMAT})")

    @property
    def cam_class_index(self) -> int:
        """Output index of ``cam_class``."""
        return self.class_names.index(self.cam_class)

    def class_index(self, target: "Optional[int | str]" = None) -> int:
        """Output index of ``target`` (a class name or index); None -> ``cam_class``."""
        if target is None:
            return self.cam_class_index
        if isinstance(target, str) and target in self.class_names:
            return self.class_names.index(target)
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(self.class_names):
            return target
        raise CamError(
            f"target class {target!r} is not one of this model's classes "
            f"{self.class_names} (or an index 0..{len(self.class_names) - 1})"
        )

    def probabilities_from_score(self, index: int, probability: float) -> Dict[str, float]:
        """Class name -> probability, given only class ``index``'s probability. For two classes
        the other gets the complement; with more classes only the known one is reported."""
        result = {self.class_names[index]: float(probability)}
        if len(self.class_names) == 2:
            result[self.class_names[1 - index]] = 1.0 - float(probability)
        return result

    def summary(self) -> dict:
        """The JSON-able facts a report about one explanation needs."""
        keys = (
            "name",
            "version",
            "architecture",
            "class_names",
            "cam_class",
            "target_layer",
            "patch_size",
            "spacing_mm",
            "hu_window",
            "normalisation",
            "activation",
            "input",
            "cam_method",
            "output",
            "intended_use",
        )
        out = {k: getattr(self, k) for k in keys}
        out["sha256"] = self.sha256
        out["metrics"] = {k: v for k, v in self.metrics.items() if k in ("roc_auc", "accuracy")}
        return out

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "model card") -> "ModelCard":
        """Build and validate a card from parsed JSON; unknown or missing fields -> ModelError."""
        if not isinstance(data, dict):
            raise ModelError(f"{source}: a model card must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{source}: unknown model card field(s) {unknown}; known: {sorted(known)}")
        try:
            card = cls(**data)
        except TypeError as exc:
            raise ModelError(
                f"{source}: incomplete model card ({exc}); required: architecture, "
                "kwargs, class_names, cam_class, target_layer"
            ) from None
        return card.validate(source)

    def save(self, path: "str | os.PathLike[str]") -> Path:
        """Write the card as indented, strict JSON (a NaN metric becomes null), atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "ModelCard":
        """Read and validate a card JSON file (refusing files over 1 MiB, FIFOs and devices before
        reading them, and JSON nested too deeply to parse)."""
        path = Path(path)
        if not path.exists():
            raise ModelError(
                f"{path}: model card not found; a model needs its card JSON beside the weights (same name, .json)"
            )
        try:
            with open_regular(path) as f:
                raw = f.read(MAX_CARD_BYTES + 1)
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the model card ({exc.strerror})") from None
        if len(raw) > MAX_CARD_BYTES:
            raise ModelError(
                f"{path}: more than {MAX_CARD_BYTES} bytes is too large for a model card; is this the right file?"
            )
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: the model card is not valid JSON ({exc})") from None
        except RecursionError:
            raise ModelError(
                f"{path}: the model card's JSON is nested too deeply to read; it is not a model card"
            ) from None
        return cls.from_dict(data, str(path))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
