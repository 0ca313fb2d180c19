"""Time ``phantom.chest_ct`` on one CPU core and print JSON.

Usage: python benchmarks/phantom_speed.py [--shape K J I] [--spacing I J K] [--repeats N]
The target (issue 2): a (120, 256, 256) phantom in under 3 s on one core. On a shared machine
compare ``cpu_seconds_median`` (process CPU time), which waiting for a busy core does not inflate.
"""

from __future__ import annotations

import os

# one core: pin BLAS/OpenMP pools before numpy/scipy load, and the process to one CPU
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(120, 256, 256), metavar=("K", "J", "I"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.4, 1.4, 2.0), metavar=("I", "J", "K"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    from LungGradCAMLib import phantom

    phantom.chest_ct(seed=0, shape=(24, 48, 48), spacing_mm=(7.0, 7.0, 10.0))  # imports, first calls
    seconds, cpu, nodules = [], [], []
    for seed in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        ph = phantom.chest_ct(seed=seed, shape=tuple(args.shape), spacing_mm=tuple(args.spacing))
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        nodules.append(len(ph.nodules))
    voxels = args.shape[0] * args.shape[1] * args.shape[2]
    print(
        json.dumps(
            {
                "benchmark": "phantom.chest_ct",
                "shape_kji": list(args.shape),
                "spacing_ijk_mm": list(args.spacing),
                "repeats": args.repeats,
                "cpu_cores": 1,
                "seconds_median": round(statistics.median(seconds), 3),
                "seconds_min": round(min(seconds), 3),
                "seconds_max": round(max(seconds), 3),
                # CPU time excludes waiting for a busy machine's cores: the cost on an idle core
                "cpu_seconds_median": round(statistics.median(cpu), 3),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "mvoxels_per_s": round(voxels / statistics.median(seconds) / 1e6, 2),
                "nodules": nodules,
                "target_s": 3.0,
                "python": platform.python_version(),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
