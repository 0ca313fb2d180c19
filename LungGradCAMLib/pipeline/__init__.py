"""The explanation pipeline, end to end: CT -> lung mask -> model preprocessing -> CAM ->
:class:`Explanation` -> hot regions -> outputs.

* :mod:`.explainer`: :func:`explain` (and :func:`explain_and_segment`), its stages and costs;
* :mod:`.segment`: :func:`segment_cam`, the hot regions of a heat map;
* :mod:`.outputs`: the report and files of a run, and :func:`run_one` (all ``lunggradcam run`` does);
* :mod:`.batch`: :func:`run_batch`, a cohort, resumably, sharded under ``torchrun``;
* :mod:`.bench`: ``lunggradcam run`` timed stage by stage.
"""
from .batch import SUMMARY_FIELDS, prefetched, run_batch, safe_name, write_summary
from .explainer import (CAM_STEP, STAGES, CostEstimate, Progress, cam_on_ct_grid, check_options, default_batch_size,
                        estimate_cost, explain, explain_and_segment, get_model, on_ct_grid, second_opinions)
from .outputs import (NO_REGION, VOLUME_FORMATS, build_report, intended_use, outcome, run_one, scale_text, write_outputs,
                      write_overlay)
from .segment import segment_cam

__all__ = ["CAM_STEP", "STAGES", "CostEstimate", "Progress", "cam_on_ct_grid", "check_options", "default_batch_size",
           "estimate_cost", "explain", "explain_and_segment", "get_model", "on_ct_grid", "second_opinions",
           "NO_REGION", "VOLUME_FORMATS", "build_report", "intended_use", "outcome", "run_one", "scale_text", "write_outputs",
           "write_overlay", "segment_cam", "SUMMARY_FIELDS", "prefetched", "run_batch", "safe_name", "write_summary"]
