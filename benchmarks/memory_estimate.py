"""Is ``explain``'s memory estimate honest? The peak memory (RSS) of explaining one CT on the CPU
with a model card of a big patch, beside what ``explain`` estimates before it starts (the sum its
check compares with the memory the process can get, :func:`cost.memory_needed`: 24 bytes per
CT voxel, 32 per voxel of the model's grid, and a batch of patches: the layer outputs of each
(:meth:`LoadedModel.activation_bytes`) times a factor per CAM method).

Each case runs in a fresh process: the model (``gradcam3d_cnn`` of ``--width``, untrained, a card of
``--patch`` voxels at 1.5 mm) is loaded and the CT (a phantom) made first; then the peak RSS is
reset (``/proc/self/clear_refs``) and ``explain(..., device="cpu", batch_size=B)`` runs. ``peak``
is the resident memory's highest point above what the process held before ``explain``, ``ratio``
= peak / estimate (at most 1 for an honest estimate); ``address_space_peak`` the same for the
address space, which ``ulimit -v`` limits (None when it did not pass the process's earlier peak).
Linux only. Prints one JSON object.

    .venv/bin/python benchmarks/memory_estimate.py --patch 64 96 128 --batch 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASE = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np, torch
torch.set_num_threads({threads})
import LungGradCAMLib as lgc
from LungGradCAMLib import phantom
from LungGradCAMLib.engine.models import ModelCard, build_model, load_model, save_model
from LungGradCAMLib.pipeline import cost

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
folder = Path(tempfile.mkdtemp())
kwargs = {{"width": {width}}} if "{arch}" == "gradcam3d_cnn" else {{}}
module = build_model("{arch}", **kwargs).eval()
layer = "features.act6" if "{arch}" == "gradcam3d_cnn" else [n for n, m in module.named_modules() if n][-3]
card = ModelCard(architecture="{arch}", kwargs=kwargs, class_names=["background", "nodule"], cam_class="nodule",
                 target_layer=layer, patch_size=[{patch}] * 3, spacing_mm=[1.5] * 3, name="big")
path = save_model(module, card, folder / "big.safetensors")
loaded = load_model(path, device="cpu")
ct = phantom.chest_ct(seed=0, shape=(80, 192, 192), spacing_mm=(1.6, 1.6, 2.0)).volume
estimate = {{}}
needed = cost.memory_needed

def spy(*args):  # what explain's check compares with the memory the process can get
    estimate.update(needed(*args))
    return estimate

cost.memory_needed = spy
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from here
before, size_before, vpeak_before = rss("VmRSS:"), rss("VmSize:"), rss("VmPeak:")
exp = lgc.explain(ct, model=loaded, method="{method}", device="cpu", batch_size={batch}, mode="sliding",
                  chest_check=False)
peak = rss("VmHWM:") - before
vpeak = rss("VmPeak:")  # address space (what ulimit -v limits); its peak cannot be reset
address_space = vpeak - size_before if vpeak > vpeak_before else None
total = sum(estimate.values())
print(json.dumps({{"arch": "{arch}", "method": "{method}", "patch": {patch}, "batch": {batch}, "width": {width},
                  "n_patches": exp.n_patches,
                  "bytes_per_voxel": loaded.bytes_per_voxel, "estimate": estimate, "estimate_total": total,
                  "peak": peak, "ratio": peak / total, "address_space_peak": address_space,
                  "address_space_ratio": address_space and address_space / total}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=int, default=8, help="gradcam3d_cnn's width")
    parser.add_argument("--arch", default="gradcam3d_cnn")
    parser.add_argument("--methods", nargs="+", default=["gradcam"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    cases = [(m, p, b) for m in args.methods for p in args.patch for b in args.batch]
    for method, patch, batch in cases:
        code = CASE.format(
            patch=patch, batch=batch, width=args.width, threads=args.threads, arch=args.arch, method=method
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
        )
        if done.returncode:
            rows.append(
                {"method": method, "patch": patch, "batch": batch, "error": done.stderr.strip().splitlines()[-1:]}
            )
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"cases": rows, "max_ratio": max((r.get("ratio", 0) for r in rows), default=None)}, indent=1))


if __name__ == "__main__":
    main()
