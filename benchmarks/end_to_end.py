"""End-to-end benchmark: a 512x512x300 phantom DICOM series through `lunggradcam run` (= `lunggradcam bench`).

    python benchmarks/end_to_end.py [--shape 300x512x512] [--device auto|cpu|cuda] [--runs 3]

Each run in a fresh process; a table of the stages (median of the runs, their min-max, the floor
each stage is measured against) on stderr, the report as JSON on stdout (LungGradCAMLib/bench.py).
Targets (issue 15): under 8 s in all on 2 CPU cores (median of 3 runs); under 2 s on an H100/H200.
"""

import sys

from LungGradCAMLib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
