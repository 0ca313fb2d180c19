"""The CAM methods, one table: each method's name, whether it needs gradients at the CAM layer, and
what it costs. Imports no torch: the command line and the Slicer panel list the methods from it
before torch is loaded, :mod:`~LungGradCAMLib.engine.cam` checks its classes against it when it is
imported, and the pipeline's cost and memory estimates read it instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Method:
    """One CAM method.

    ``gradients``: the method needs dScore/dA at the CAM layer (the autograd graph is cut there).
    ``masked``: a masked forward pass per channel of the CAM layer (Score-CAM) instead of a backward.
    ``forwards``: forward passes of each patch (guided methods run a second one for the backward
    to the input). ``cost``: forward-pass equivalents per patch (backward and blending included;
    ignored for a masked method, whose passes are counted one by one). ``patch_memory``: the memory
    one patch of a batch needs, in multiples of the layers' outputs (guided backpropagation keeps
    every layer's output for its backward to the input). ``cam_bytes``: what a heat map holds
    besides its patches (oneDNN's and autograd's buffers; a full backward more), bytes. Measured
    with benchmarks/memory_estimate.py and benchmarks/cam_speed.py.
    """

    name: str
    gradients: bool
    masked: bool = False
    forwards: int = 1
    cost: float = 1.5
    patch_memory: float = 2.0
    cam_bytes: int = 96 << 20


_GUIDED = dict(forwards=2, cost=4.0, patch_memory=2.5, cam_bytes=192 << 20)

#: Every CAM method by its name, in the order the command line and the panel list them.
TABLE: Dict[str, Method] = {
    m.name: m
    for m in (
        Method("gradcam", gradients=True),
        Method("gradcam++", gradients=True),
        Method("xgradcam", gradients=True),
        Method("hirescam", gradients=True),
        Method("layercam", gradients=True),
        Method("scorecam", gradients=False, masked=True),
        Method("guided-backprop", gradients=False, **_GUIDED),
        Method("guided-gradcam", gradients=True, **_GUIDED),
    )
}
#: The methods' names (what ``--method``, ``ExplainOptions.method`` and a model card's
#: ``cam_method`` accept).
METHODS: Tuple[str, ...] = tuple(TABLE)
#: The method a model card without ``cam_method``, and the engine's functions, use.
DEFAULT_METHOD = "gradcam"
#: Other spellings :func:`canonical` accepts, after lower-casing and dropping ``-``, ``_`` and spaces.
ALIASES = {
    "gradcampp": "gradcam++",
    "gradcamplusplus": "gradcam++",
    "guidedbackprop": "guided-backprop",
    "guidedbp": "guided-backprop",
    "guidedgradcam": "guided-gradcam",
}


def canonical(method: str) -> str:
    """``method``'s name in :data:`METHODS` (``"Grad-CAM"`` -> ``"gradcam"``, ``"gradcam_pp"`` ->
    ``"gradcam++"``); raises ``KeyError`` naming the methods when it is none of them."""
    key = str(method).lower().replace("_", "").replace("-", "").replace(" ", "")
    key = ALIASES.get(key, key)
    if key not in TABLE:
        raise KeyError(f"unknown CAM method {method!r}; use one of {', '.join(METHODS)}")
    return key
