"""``lunggradcam demo``: a synthetic chest CT through the whole pipeline (and a real CT with ``--ct``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

from ..core.atomic import MARKER, check_output_folder, output_folder
from ..options import ExplainOptions
from ..pipeline.outputs import OUTPUT_FILES
from .common import argument_type, device


def _heat_map_statement(card: Any) -> str:
    """One honest line about the model's heat maps: its intended use and, where its card has
    them, how well it finds real nodules and how often its heat map's maximum lands on one
    (``metrics.real_nodules``, else ``metrics.heat_map``)."""
    metrics = card.metrics if isinstance(card.metrics, dict) else {}
    quality = metrics.get("heat_map")
    real = (metrics.get("real_nodules") or {}).get("test")
    text = (
        f"About the heat map: it shows which voxels drove the score of model '{card.name}' {card.version}; "
        f"it is not a finding. {card.intended_use}"
    )
    if isinstance(real, dict) and {"patients", "nodules_ge_4mm", "at_threshold_0.5", "whole_scan_heat_map"} <= set(
        real
    ):
        found, whole = real["at_threshold_0.5"], real["whole_scan_heat_map"]
        text += (
            f" On {real['nodules_ge_4mm']} real nodules (>= 4 mm) of {real['patients']} held-out test patients "
            f"placed in held-out real lungs, hot regions at heat 0.5 found {found['sensitivity_ge_4mm']['value']:.0%} "
            f"with {found['false_hot_regions_per_scan']['value']:.1f} false hot regions per scan, and the "
            f"whole-scan heat map's maximum fell inside the nodule for {whole['pointing']['value']:.0%} "
            f"(mean-Dice {whole['mean_dice']['value']:.2f})."
        )
    elif isinstance(quality, dict) and {"scans", "peak_in_lesion"} <= set(quality):
        text += (
            f" On {quality['scans']} held-out test scans its heat map's maximum fell inside a lesion in "
            f"{quality['peak_in_lesion']}"
            + (f" and within 10 mm of one in {quality['peak_within_10mm']}" if "peak_within_10mm" in quality else "")
            + (f" (mean-Dice {quality['mean_dice']:.2f})" if "mean_dice" in quality else "")
            + "."
        )
        slabs = quality.get("lidc_slabs")
        if isinstance(slabs, dict) and slabs:
            text += (
                " On real LIDC-IDRI slabs: "
                + "; ".join(
                    f"{name}: {'inside the nodule' if r.get('peak_in_nodule') else 'missed, %.0f mm away' % r.get('peak_mm', 0)}"
                    for name, r in slabs.items()
                    if isinstance(r, dict)
                )
                + "."
            )
    else:
        text += " How well its heat maps localise lesions has not been measured (no metrics.heat_map in its card)."
    return text


def nodule_findings(nodules: Any, nodule_labelmap: Any, segmentation: Any, cam: Any) -> List[str]:
    """One line per true phantom nodule: found (the hot regions that overlap it) or missed (the
    most heat inside it), then how many were found. ``nodule_labelmap`` and ``cam`` are K, J, I
    arrays on the CT's grid; a nodule is found when a hot region has a voxel inside it."""
    import numpy as np

    regions = {r.label: r.name for r in segmentation.regions}
    lines, found = [], 0
    for nodule in nodules:
        inside = nodule_labelmap == nodule.label
        hit = [regions[label] for label in np.unique(segmentation.labelmap.array[inside]) if label in regions]
        found += bool(hit)
        where = ", ".join(f"{c:.0f}" for c in nodule.center_ras)
        status = (
            ("found: " + ", ".join(hit))
            if hit
            else f"missed (heat at most {float(cam[inside].max(initial=0.0)):.2f} inside it)"
        )
        lines.append(f"nodule {nodule.label} ({nodule.kind}, {nodule.diameter_mm:.0f} mm, RAS {where} mm): {status}")
    lines.append(f"{found} of {len(nodules)} phantom nodules found by a hot region")
    return lines


def _print_result(name: str, explanation: Any, segmentation: Any, files: Dict[str, Path]) -> None:
    from ..pipeline.outputs import outcome

    probs = ", ".join(f"{k} {v:.3f}" for k, v in explanation.probabilities.items())
    print(
        f"{name}: {explanation.predicted_class} ({probs}); {outcome(segmentation)}; "
        f"{explanation.timings['total']:.1f} s"
    )


def _demo_runs(args: argparse.Namespace, options: ExplainOptions, out: Path) -> Dict[str, List[Path]]:
    """The demo's work, written into ``out`` (its work folder): the phantom as DICOM, NRRD and
    montage, the run on its DICOM series into result/, and with ``--ct`` the run on that CT into
    ct/. Returns the files to open in Slicer, per what they show."""
    import numpy as np

    from .. import phantom
    from ..core.results import Segmentation
    from ..engine.lung import lung_mask
    from ..evaluation import metrics
    from ..io.render import save_montage
    from ..io.segnrrd import write_segmentation
    from ..io.volume_files import write_volume
    from ..pipeline import run_one
    from .common import cli_progress, print_regions

    ph = phantom.chest_ct(seed=args.seed)
    vol = ph.volume
    dicom_dir = out / "dicom"
    files = phantom.write_dicom_series(vol, dicom_dir, shuffle_names=True)
    write_volume(vol, out / "phantom.nrrd")
    truth = ph.nodule_labelmap > 0
    write_segmentation(
        Segmentation(vol.with_array(ph.nodule_labelmap.astype(np.int16)), []),
        out / "nodules_truth.seg.nrrd",
        names={n.label: f"nodule {n.label} ({n.kind})" for n in ph.nodules},
    )
    first = ph.nodules[0]
    centre = tuple(int(round(c)) for c in vol.ras_to_ijk_points(first.center_ras)[0])
    save_montage(
        vol,
        out / "montage.png",
        center_ijk=centre,
        contours={"lungs": lung_mask(vol), "nodules": truth},
        title=f"phantom seed {args.seed}: {first.kind} nodule, {first.diameter_mm:.0f} mm",
    )
    print(
        f"1. A synthetic chest CT (phantom seed {args.seed}): {vol.shape[::-1]} voxels (i, j, k) at "
        f"{np.round(vol.spacing, 2).tolist()} mm with {len(ph.nodules)} nodules, written as {len(files)} DICOM "
        f"files and read back through the pipeline:"
    )
    update, close = cli_progress(options.method)
    try:
        explanation, segmentation, written = run_one(
            dicom_dir, out / "result", options, progress=update, input_desc="demo phantom DICOM series"
        )
    finally:
        close()
    _print_result("   prediction", explanation, segmentation, written)
    print_regions(segmentation, indent="     ")
    for line in nodule_findings(ph.nodules, ph.nodule_labelmap, segmentation, explanation.cam.array):
        print("   " + line)
    distance = metrics.peak_distance_mm(explanation.cam, truth)  # 0 when the CAM's maximum is in a nodule
    print(
        "   the heat map's maximum is "
        + ("inside a true nodule" if distance == 0 else f"{distance:.1f} mm from the nearest true nodule (outside it)")
    )

    slicer_files = {
        "the phantom": [
            out / "phantom.nrrd",
            out / "result" / "cam.nrrd",
            out / "result" / "segmentation.seg.nrrd",
            out / "nodules_truth.seg.nrrd",
        ]
    }
    if args.ct is not None:
        print(f"2. Your CT, {args.ct}, through the same pipeline:")
        update, close = cli_progress(options.method)
        try:
            real, real_seg, real_files = run_one(
                args.ct, out / "ct", options, series_uid=args.series, progress=update, input_desc=str(args.ct)
            )
        finally:
            close()
        _print_result("   prediction", real, real_seg, real_files)
        print_regions(real_seg, indent="     ")
        chest = real.chest_check
        print(
            f"   chest-CT check: lungs {chest['lung_ml']:.0f} ml, largest cross-section "
            f"{chest['max_lung_area_cm2']:.0f} cm², {100 * chest['lung_share']:.0f} % of the body, "
            f"{100 * chest['aerated_share']:.0f} % aerated"
        )
        slicer_files["your CT"] = [out / "ct" / "cam.nrrd", out / "ct" / "segmentation.seg.nrrd"]
    return slicer_files


#: What ``demo`` writes into --out: the phantom (its DICOM series in dicom/), and the run folders
#: result/ (the phantom) and ct/ (--ct), each with its own marker.
DEMO_FILES = (
    "phantom.nrrd",
    "nodules_truth.seg.nrrd",
    "montage.png",
    "dicom/*",
    *(f"{run}/{name}" for run in ("result", "ct") for name in (*sorted(OUTPUT_FILES), MARKER)),
)


def _demo(args: argparse.Namespace) -> int:
    """Phantom chest CT -> DICOM series -> volume -> Grad-CAM -> segmentation -> outputs; then,
    with ``--ct``, the same pipeline on a real CT. --out is owned as ``run``'s is, subfolders
    included: everything is written into its work folder and moved in at the end."""
    from ..io.inputs import check_input, input_tree
    from ..pipeline import check_options

    out = Path(args.out)
    options = ExplainOptions(model=args.model, device=args.device, region_model=args.region_model)
    inputs = [input_tree(check_input(args.ct, args.series))] if args.ct is not None else []
    check_output_folder(out, inputs, DEMO_FILES)  # before any work: an unusable --out fails now
    loaded = check_options(options)
    print(_heat_map_statement(loaded.card))
    print()
    with output_folder(out, inputs, DEMO_FILES) as work:
        slicer_files = _demo_runs(args, options, work)
    slicer_files = {what: [out / p.relative_to(work) for p in paths] for what, paths in slicer_files.items()}
    if args.ct is not None:
        slicer_files["your CT"].insert(0, Path(args.ct))
    print()
    print(f"Outputs in {out.resolve()}:")
    print(
        f"  montage.png, result/overlay.png{', ct/overlay.png' if args.ct else ''}   pictures: open them in any viewer"
    )
    print(
        f"  result/report.json{', ct/report.json' if args.ct else ''}   prediction, hot regions (ml, RAS mm), "
        "timings, the model and its intended use"
    )
    print("To see them in 3D Slicer (5.6 or newer), drag and drop onto its window, for")
    for what, paths in slicer_files.items():
        print(f"  {what}: " + "  ".join(str(p.resolve()) for p in paths))
    if args.ct is not None and Path(args.ct).is_dir():
        print("  (Slicer offers to import a DICOM folder into its DICOM database: do so, then load the series)")
    print(
        "  then set cam as the foreground of the slice views (opacity 0.4); the LungGradCAM module does all "
        "this itself: load the CT and press Apply."
    )
    return 0


def add_cli(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a synthetic chest CT (and on your CT with --ct)",
        description="Make a phantom chest CT with nodules, write it as a DICOM series and "
        "NRRD, save a montage, then load the DICOM back and explain it with "
        "the bundled model (cam.nrrd, segmentation.seg.nrrd, overlay.png, ...). "
        "With --ct, then explain a real chest CT the same way.",
    )
    p.add_argument(
        "--out",
        default="lunggradcam-demo",
        help="output folder (default ./lunggradcam-demo; created; an earlier demo's files there are "
        "replaced; one holding other files is refused)",
    )
    p.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    p.add_argument(
        "--ct",
        default=None,
        metavar="PATH",
        help="also explain this real chest CT: DICOM folder, Slicer DICOM database or volume file",
    )
    p.add_argument("--series", default=None, help="SeriesInstanceUID of --ct, when it holds several CT series")
    p.add_argument("--model", default="default", help="model name or path (default: default)")
    p.add_argument(
        "--region-model",
        default=None,
        metavar="MODEL",
        help="also ask a region model (e.g. lidc-malignancy) about each hot region",
    )
    p.add_argument("--device", default=None, type=argument_type(device), help="auto, cpu, cuda, cuda:N, mps")
    p.set_defaults(func=_demo)
