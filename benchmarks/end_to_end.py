"""End-to-end benchmark (issue 8): a 512x512x300 phantom DICOM series through `lunggradcam run`.

    python benchmarks/end_to_end.py [--shape 300x512x512] [--device auto|cpu|cuda]

Prints JSON with the seconds of each stage. Targets: < 5 s on an H100, < 90 s on a 2-core CPU.
"""
import sys

from LungGradCAMLib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
