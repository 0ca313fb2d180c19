"""Check the bundled default model where it is used: as a sliding window over whole phantom chest
CTs it has never seen. For each phantom: the pipeline's predicted nodule probability, whether the
CAM's peak lies in a nodule (pointing game, exact and within 5 mm), the peak's distance to the
nearest nodule, and the CAM's mean-Dice against the nodule truth. Prints one JSON object.

    .venv/bin/python benchmarks/default_model_check.py --seeds 2000-2003 --threads 2
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    import torch

    from LungGradCAMLib.evaluation import metrics
    from LungGradCAMLib import phantom
    from LungGradCAMLib.pipeline import explain
    from LungGradCAMLib.training.sources import parse_seeds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--seeds", default="2000-2003", help="phantom seeds (default 2000-2003, unseen in training)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for seed in parse_seeds(args.seeds):
        ph = phantom.chest_ct(seed=seed)  # the demo's default geometry
        truth = ph.nodule_labelmap > 0
        t0 = time.perf_counter()
        exp = explain(ph.volume, model=args.model, device=args.device)
        seconds = time.perf_counter() - t0
        rows.append({
            "seed": seed, "nodules": len(ph.nodules),
            "diameters_mm": [round(n.diameter_mm, 1) for n in ph.nodules],
            "p_nodule": round(exp.probabilities.get("nodule", float("nan")), 4),
            "pointing_game": metrics.pointing_game(exp.cam, truth),
            "pointing_game_5mm": metrics.pointing_game(exp.cam, truth, tolerance_mm=5.0),
            "peak_distance_mm": round(metrics.peak_distance_mm(exp.cam, truth), 1),
            "mean_dice": round(metrics.mean_dice(exp.cam, truth, within=exp.lung_mask), 4),
            "seconds": round(seconds, 1), "n_patches": exp.n_patches,
        })
    summary = {k: float(np.mean([r[k] for r in rows])) for k in
               ("pointing_game", "pointing_game_5mm", "peak_distance_mm", "mean_dice", "p_nodule", "seconds")}
    print(json.dumps({"model": args.model, "device": args.device, "threads": args.threads,
                      "summary": summary, "phantoms": rows}, indent=1))


if __name__ == "__main__":
    main()
