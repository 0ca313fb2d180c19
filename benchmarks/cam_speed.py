"""Grad-CAM speed, side by side: ours, a forward pass alone, captum, MONAI and pytorch-grad-cam
(when importable) on the same 8-conv network (``gradcam3d_cnn``) and the same inputs.

Cases: one whole volume 1x1x64x512x512 and a batch of 64 patches of 64^3 (``--small``: 1x1x32x
128x128 and 8 patches of 32^3, for a quick CPU run). Each peer is timed as a user calls it, with
its own explainer object built once (outside the timing) on its own copy of the model, including
the upsampling to the input size. Prints JSON: medians in ms and the ratios.

    python benchmarks/cam_speed.py --device cuda
    python benchmarks/cam_speed.py --device cpu --small
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

from LungGradCAMLib.engine.cam import CAM
from LungGradCAMLib.engine.models import build_model

TARGET = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return 1000.0 * (time.perf_counter() - start)


def explainers(
    model: torch.nn.Module, layer: str, x: torch.Tensor, amp: bool, stack: contextlib.ExitStack
) -> Dict[str, Optional[Callable[[], object]]]:
    """name -> a call producing a CAM at input size (None: the peer is not installed). Our
    hooks stay installed until ``stack`` closes."""
    size = x.shape[2:]
    calls: Dict[str, Optional[Callable[[], object]]] = {}

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    calls["forward"] = forward
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        calls["captum"] = None
    else:
        net = copy.deepcopy(model)
        captum = LayerGradCam(net, net.get_submodule(layer))
        calls["captum"] = lambda: LayerAttribution.interpolate(
            captum.attribute(x, target=TARGET, relu_attributions=True), size, interpolate_mode="trilinear"
        )

    try:
        from monai.visualize import GradCAM as MonaiGradCAM
    except ImportError:
        calls["monai"] = None
    else:
        monai = MonaiGradCAM(nn_module=copy.deepcopy(model), target_layers=layer)
        calls["monai"] = lambda: monai(x, class_idx=TARGET)

    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        calls["pytorch_grad_cam"] = None
    else:
        net = copy.deepcopy(model)
        pgc = pytorch_grad_cam.GradCAM(model=net, target_layers=[net.get_submodule(layer)])
        targets = [ClassifierOutputTarget(TARGET)] * x.shape[0]
        calls["pytorch_grad_cam"] = lambda: pgc(input_tensor=x, targets=targets)

    # after the peers' copies, so that they do not carry our hook
    ours = stack.enter_context(CAM(model, layer, "gradcam"))
    calls["ours"] = lambda: ours(x, TARGET).cam
    if amp and x.is_cuda:
        ours_amp = stack.enter_context(CAM(model, layer, "gradcam", amp=True))
        calls["ours_amp"] = lambda: ours_amp(x, TARGET).cam
    return calls


def agreement(model: torch.nn.Module, layer: str, x: torch.Tensor) -> Optional[float]:
    """Correlation of our map with captum's on this input (a sanity check of what was timed)."""
    try:
        from captum.attr import LayerGradCam
    except ImportError:
        return None
    with CAM(model, layer, "gradcam", upsample=False, normalize=False) as cam:
        ours = cam(x, TARGET).cam.flatten().double()
    net = copy.deepcopy(model)
    theirs = (
        LayerGradCam(net, net.get_submodule(layer))
        .attribute(x, target=TARGET, relu_attributions=True)
        .detach()
        .flatten()
        .double()
    )
    if ours.std() == 0 or theirs.std() == 0:
        return float(torch.equal(ours == 0, theirs == 0))
    return float(torch.corrcoef(torch.stack([ours, theirs]))[0, 1])


def run_case(
    model: torch.nn.Module, layer: str, x: torch.Tensor, device: torch.device, repeats: int, warmup: int, amp: bool
) -> dict:
    """Warm-up calls, then ``repeats`` rounds in which every explainer runs once (interleaved,
    so that a drifting load on a shared machine hits all of them alike)."""
    times: Dict[str, Optional[List[float]]] = {}
    with contextlib.ExitStack() as stack:
        calls = explainers(model, layer, x, amp, stack)
        for round_ in range(warmup + repeats):
            for name, fn in calls.items():
                if fn is None or times.get(name, []) is None:
                    times[name] = None
                    continue
                try:
                    elapsed = _time_ms(fn, device)
                except (RuntimeError, MemoryError) as exc:  # e.g. a peer running out of memory
                    times[name] = None
                    print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                    continue
                if round_ >= warmup:
                    times.setdefault(name, []).append(elapsed)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    medians = {k: None if v is None else round(statistics.median(v), 2) for k, v in times.items()}
    minima = {k: None if v is None else round(min(v), 2) for k, v in times.items()}
    ratios = {}
    for label, stat in (("median", medians), ("min", minima)):
        ours = stat["ours"]
        ratios[f"ours/forward ({label})"] = round(ours / stat["forward"], 3)
        for peer in ("captum", "monai", "pytorch_grad_cam"):
            if stat.get(peer) is not None:
                ratios[f"{peer}/ours ({label})"] = round(stat[peer] / ours, 2)
        if stat.get("ours_amp") is not None:
            ratios[f"ours_amp/forward ({label})"] = round(stat["ours_amp"] / stat["forward"], 3)
    return {
        "input": list(x.shape),
        "median_ms": medians,
        "min_ms": minima,
        "ratios": ratios,
        "corr_with_captum": agreement(model, layer, x[:1]),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="1x1x32x128x128 and 8 patches of 32^3 (quick CPU run)")
    parser.add_argument("--width", type=int, default=32, help="filters of the first conv (32 = paper)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="also time ours with bf16 autocast (CUDA)")
    parser.add_argument("--cases", nargs="+", default=["volume", "patches"], choices=["volume", "patches"])
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("gradcam3d_cnn", width=args.width).eval().to(device)
    layer = model.cam_layer
    shapes = (
        {"volume": (1, 1, 32, 128, 128), "patches": (8, 1, 32, 32, 32)}
        if args.small
        else {"volume": (1, 1, 64, 512, 512), "patches": (64, 1, 64, 64, 64)}
    )
    warnings.simplefilter("ignore")  # peers' deprecation chatter
    report = {
        "benchmark": "cam_speed",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {
            "name": "gradcam3d_cnn",
            "width": args.width,
            "layer": layer,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cases": {},
    }
    for case in args.cases:
        x = torch.randn(shapes[case], device=device)
        report["cases"][case] = run_case(model, layer, x, device, args.repeats, args.warmup, args.amp)
        del x
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
