"""The explanation pipeline, end to end: CT -> lung mask -> model preprocessing -> CAM ->
:class:`Explanation` -> hot regions -> outputs.

* :mod:`.explainer`: :func:`explain`, stage by stage; :mod:`.stages`: their names, timing and
  progress; :mod:`.cost`: the time and memory a heat map will take, known before it starts;
  :mod:`.ct_grid`: maps brought back onto the CT's grid;
* :mod:`.regions`: :func:`explain_and_segment`, the hot regions and what each gets (a region
  model's second opinion, the nodule outline);
* :mod:`.segment`: :func:`segment_cam`, the hot regions of a heat map;
* :mod:`.outputs`: the report and files of a run, and :func:`run_one` (all ``lunggradcam run`` does);
* :mod:`.batch`: :func:`run_batch`, a cohort, resumably, sharded under ``torchrun``;
* :mod:`.bench`: ``lunggradcam run`` timed stage by stage.
"""

from .batch import SUMMARY_FIELDS, prefetched, run_batch, safe_name, write_summary
from .cost import CostEstimate, default_batch_size, estimate_cost
from .ct_grid import CAM_STEP, cam_on_ct_grid, on_ct_grid
from .explainer import check_options, explain, get_model
from .outputs import (
    NO_REGION,
    VOLUME_FORMATS,
    build_report,
    intended_use,
    outcome,
    run_one,
    scale_text,
    write_outputs,
    write_overlay,
)
from .regions import explain_and_segment, second_opinions
from .segment import segment_cam
from .stages import STAGES, Progress

__all__ = [
    "CAM_STEP",
    "STAGES",
    "CostEstimate",
    "Progress",
    "cam_on_ct_grid",
    "check_options",
    "default_batch_size",
    "estimate_cost",
    "explain",
    "explain_and_segment",
    "get_model",
    "on_ct_grid",
    "second_opinions",
    "NO_REGION",
    "VOLUME_FORMATS",
    "build_report",
    "intended_use",
    "outcome",
    "run_one",
    "scale_text",
    "write_outputs",
    "write_overlay",
    "segment_cam",
    "SUMMARY_FIELDS",
    "prefetched",
    "run_batch",
    "safe_name",
    "write_summary",
]
