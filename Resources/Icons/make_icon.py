"""Draw Resources/Icons/LungGradCAM.png (128x128 RGBA): two lungs in a dark disc with a Grad-CAM
hot spot over a nodule. Run from anywhere: ``python Resources/Icons/make_icon.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib import pyplot as plt

SIZE = 128
SUPERSAMPLE = 4  # draw at 4x and average down: smooth (anti-aliased) edges


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, tilt_deg: float = 0.0
) -> np.ndarray:
    t = np.deg2rad(tilt_deg)
    u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
    v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def draw() -> np.ndarray:
    """The icon as a (SIZE, SIZE, 4) float RGBA array in [0, 1]."""
    n = SIZE * SUPERSAMPLE
    y, x = np.mgrid[0:n, 0:n] / n  # unit square, y downwards
    rgba = np.zeros((n, n, 4))

    body = _ellipse(x, y, 0.5, 0.52, 0.47, 0.44)
    rgba[body] = (0.13, 0.15, 0.20, 1.0)

    # Lungs: tilted ellipses with the heart notch cut out of the left lung (patient left = image right).
    right_lung = _ellipse(x, y, 0.32, 0.50, 0.15, 0.31, tilt_deg=8)
    left_lung = _ellipse(x, y, 0.68, 0.50, 0.15, 0.31, tilt_deg=-8) & ~_ellipse(x, y, 0.56, 0.68, 0.09, 0.12)
    lungs = right_lung | left_lung
    rgba[lungs] = (0.62, 0.72, 0.82, 1.0)

    # Trachea and main bronchi (air, drawn dark over the mediastinum).
    trachea = (np.abs(x - 0.5) < 0.025) & (y > 0.10) & (y < 0.30)
    bronchi = (np.abs((y - 0.30) - 0.9 * np.abs(x - 0.5)) < 0.025) & (np.abs(x - 0.5) < 0.14)
    rgba[trachea | bronchi] = (0.05, 0.06, 0.08, 1.0)

    # The heat map: a Gaussian hot spot over a nodule in the right lung, coloured with inferno.
    heat = np.exp(-(((x - 0.31) ** 2 + (y - 0.52) ** 2) / (2 * 0.075**2)))
    shown = lungs & (heat > 0.15)
    colours = colormaps["inferno"](0.35 + 0.65 * heat)
    alpha = np.clip((heat - 0.15) / 0.5, 0, 0.9)[..., None]
    rgba[shown, :3] = (1 - alpha[shown]) * rgba[shown, :3] + alpha[shown] * colours[shown, :3]

    nodule = _ellipse(x, y, 0.31, 0.52, 0.035, 0.035)
    rgba[nodule] = (1.0, 0.97, 0.75, 1.0)

    return rgba.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 4).mean(axis=(1, 3))


def main() -> None:
    out = Path(__file__).resolve().with_name("LungGradCAM.png")
    plt.imsave(out, np.clip(draw(), 0, 1))
    print(out)


if __name__ == "__main__":
    main()
