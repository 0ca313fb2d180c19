#!/usr/bin/env bash
# The GPU path measured in one run (under 5 minutes on one GPU), from the repository root:
#
#   benchmarks/gpu.sh              on the GPU machine: installs what is missing from the working tree,
#                                  runs the GPU tests (pytest -m gpu), the CAM speed comparison
#                                  (benchmarks/cam_speed.py --device cuda --amp: ours, a forward pass,
#                                  captum, MONAI and pytorch-grad-cam in the same run) and the end-to-end
#                                  benchmark on CUDA (lunggradcam bench --device cuda), then prints ONE
#                                  JSON summary on stdout (the steps' own output goes to stderr).
#   benchmarks/gpu.sh --wheels     here, where PyPI is reachable: downloads the packages a GPU machine
#                                  without network lacks (Python 3.12, x86-64) into .whl/ (git-ignored);
#                                  carry .whl along with the working tree.
#   benchmarks/gpu.sh --cpu-check  every step on the CPU with small cases, to check this script where
#                                  there is no GPU (the GPU tests skip; the figures mean nothing).
#
# It uses the python3 that holds the CUDA build of torch (or $PYTHON) and installs nothing into it:
# the missing packages go into a temporary folder on PYTHONPATH, from .whl/ when it is there, else
# from PyPI. Exit status: 0 with the summary printed, also on a machine without a GPU, where the
# summary is {"gpu": false, "reason": ...} and nothing else runs; 1 when a step failed (the summary
# names it and its log). The targets of issue 15 are reported, not enforced.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl
# what the benchmark and the GPU tests need beyond torch, numpy, scipy, scikit-image, matplotlib,
# safetensors, tqdm and pytest (a CUDA machine's image has those); the versions of make test's .venv
NEEDED="pydicom==3.0.2 simpleitk==2.5.7 slicerio==1.4.0 pynrrd==1.1.3 monai==1.6.1 captum==0.9.0 ttach==0.0.3"
PEERS_SDIST="grad-cam==1.5.5"  # pytorch-grad-cam is published as a source archive only: built here

if [ "${1:-}" = "--wheels" ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" $NEEDED || exit 1
    # a wheel of its package alone (its 8 MB archive carries tutorial images); SimpleITK's wheel
    # (53 MB) is most of the 56 MB, which leave room for the working tree in a 64 MB carry
    "$PY" -m pip wheel -q --no-deps -w "$WHEELS" $PEERS_SDIST || exit 1
    du -sh "$WHEELS" >&2
    exit 0
fi

DEVICE=cuda
CAM_ARGS=(--amp)
BENCH_ARGS=()
if [ "${1:-}" = "--cpu-check" ]; then
    DEVICE=cpu
    CAM_ARGS=(--small --repeats 2)
    BENCH_ARGS=(--shape 60x128x128 --spacing 2.5,2.5,5 --runs 1)
fi
START=$(date +%s)
WORK=$(mktemp -d /tmp/lgc-gpu.XXXXXX)

summary() {  # summary KEY=FILE ... : one JSON object on stdout, from the steps' outputs
    "$PY" - "$WORK" "$START" "$DEVICE" "$@" <<'PYTHON'
import json, sys, time
from pathlib import Path
work, start, device, pairs = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
out = {"gpu": device == "cuda", "seconds": round(time.time() - start, 1), "logs": str(work)}
if device != "cuda":
    out["cpu_check"] = "every step on the CPU with small cases, to check the script: the figures mean nothing"
for pair in pairs:
    key, _, path = pair.partition("=")
    text = Path(path).read_text() if Path(path).is_file() else ""
    try:
        out[key] = json.loads(text)
    except ValueError:
        out[key] = text.strip()[-2000:]
cam = out.get("cam_speed")
if isinstance(cam, dict):
    out["targets_cam"] = {case: {"ours/forward (<= 1.25)": r["ratios"].get("ours/forward (median)"),
                                 "ours_amp/forward": r["ratios"].get("ours_amp/forward (median)"),
                                 "captum/ours (>= 5)": r["ratios"].get("captum/ours (median)"),
                                 "monai/ours (>= 15)": r["ratios"].get("monai/ours (median)"),
                                 "pytorch_grad_cam/ours": r["ratios"].get("pytorch_grad_cam/ours (median)")}
                          for case, r in cam.get("cases", {}).items()}
e2e = out.get("end_to_end")
if isinstance(e2e, dict):
    out["target_end_to_end"] = {"median_total_s (< 2)": e2e["total_s"]["median"],
                                "met": e2e["total_s"]["median"] < 2.0}
print(json.dumps(out, indent=2))
PYTHON
}

fail() {  # fail STEP KEY=FILE ... : the summary so far, naming the failed step; exit 1
    echo "\"$1\"" >"$WORK/failed.json"
    shift
    summary step_failed="$WORK/failed.json" "$@"
    exit 1
}

# 1. is there a GPU? (asked before anything is installed)
if [ "$DEVICE" = cpu ]; then
    "$PY" -c "import json, torch; print(json.dumps({'name': 'cpu', 'torch': torch.__version__}))" >"$WORK/device.json"
elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >"$WORK/nvidia-smi.txt" 2>&1; then
    echo '{"gpu": false, "reason": "no NVIDIA GPU here: nvidia-smi is missing or lists no GPU; nothing was run"}'
    exit 0
elif ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" >"$WORK/torch.txt" 2>&1; then
    echo "{\"gpu\": false, \"reason\": \"nvidia-smi lists a GPU but the torch of $PY cannot use it (a CPU build, or no torch): install a CUDA build of torch first; nothing was run\"}"
    exit 0
else
    "$PY" -c "import json, platform, torch; print(json.dumps({'name': torch.cuda.get_device_name(0), 'torch': torch.__version__, 'cuda': torch.version.cuda, 'python': platform.python_version()}))" \
        >"$WORK/device.json"
fi

# 2. what is missing, from the working tree (.whl/ when carried, else PyPI), never into $PY's own site
SITE="$WORK/site"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" -c "
import importlib.util
names = {'pydicom': 'pydicom', 'SimpleITK': 'simpleitk', 'slicerio': 'slicerio', 'nrrd': 'pynrrd',
         'monai': 'monai', 'captum': 'captum', 'ttach': 'ttach', 'pytorch_grad_cam': 'grad-cam'}
print(' '.join(dist for module, dist in names.items() if importlib.util.find_spec(module) is None))")
if [ -n "$missing" ]; then
    source=()
    [ -d "$WHEELS" ] && source=(--no-index --find-links "$WHEELS")
    "$PY" -m pip install -q --no-deps --no-compile --no-build-isolation --target "$SITE" "${source[@]}" $missing \
        >"$WORK/install.log" 2>&1 || fail install install_log="$WORK/install.log"
fi
echo "installed into $SITE: ${missing:-nothing}" >&2

# 3. the GPU tests, the CAM speed comparison and the end-to-end benchmark
gpu_tests=$(grep -rl --include="test_*.py" "pytest.mark.gpu" Testing/Python)
timeout 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider $gpu_tests >"$WORK/pytest.log" 2>&1
status=$?
tail -n 1 "$WORK/pytest.log" >"$WORK/pytest.txt"
[ $status = 0 ] || fail pytest device="$WORK/device.json" pytest_gpu="$WORK/pytest.log"
timeout 150 "$PY" benchmarks/cam_speed.py --device "$DEVICE" "${CAM_ARGS[@]}" >"$WORK/cam_speed.json" \
    2>"$WORK/cam_speed.log" || fail cam_speed device="$WORK/device.json" cam_speed_log="$WORK/cam_speed.log"
timeout 240 "$PY" -m LungGradCAMLib.cli bench --device "$DEVICE" "${BENCH_ARGS[@]}" >"$WORK/end_to_end.json" \
    2>"$WORK/end_to_end.log" || fail end_to_end device="$WORK/device.json" end_to_end_log="$WORK/end_to_end.log"
cat "$WORK/pytest.txt" "$WORK/end_to_end.log" >&2
summary device="$WORK/device.json" pytest_gpu="$WORK/pytest.txt" cam_speed="$WORK/cam_speed.json" \
    end_to_end="$WORK/end_to_end.json"
