"""The phantom's anatomy: body outline, skin, fat, muscle, bones, lungs, airways, mediastinum,
heart and great vessels, diaphragm and abdomen, table (:class:`Anatomy`), and the lungs' vessel
trees (:func:`lung_trees`)."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .specs import TISSUE_HU, TISSUES
from .tubes import Grid, Tubes, polyline, smoothstep, tree


# --------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------
class Anatomy:
    """The chest's fixed structures for one seed, evaluated slice by slice.

    Every field is a 2D (J, I) map or a per-slice scalar: one axial slice of work fits in cache,
    which makes the slice loop several times faster than whole-volume numpy expressions.
    """

    def __init__(self, grid: Grid, rng: np.random.Generator, contrast: bool):
        self.grid, self.contrast = grid, contrast
        # --- per-patient variation --------------------------------------------------------------
        self.A = A = 158.0 * rng.uniform(0.94, 1.06)  # body half width (adult mm)
        self.B = B = 108.0 * rng.uniform(0.94, 1.06)  # body half depth
        # all work happens in the rows/columns the body can reach at any height
        z_max = float(np.abs(grid.z).max())
        rows = np.flatnonzero(np.abs(grid.y) <= B * 1.06 * (1 + 0.0004 * z_max) + 2.0)
        cols = np.flatnonzero(np.abs(grid.x) <= A * 1.15 + 2.0)
        self.rows = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0)
        self.cols = slice(int(cols[0]), int(cols[-1]) + 1) if len(cols) else slice(0, 0)
        X, Y = np.meshgrid(grid.x[self.cols], grid.y[self.rows])  # (J, I) body mm
        table_y = grid.y[:, None]
        self.table = (np.abs(grid.x[None, :]) < 210.0) & (table_y < -B / 1.1 - 4.0) & (table_y > -B / 1.1 - 13.0)
        fat0 = rng.uniform(6.0, 15.0)  # subcutaneous fat
        self.rib_phase = rng.uniform(0.0, 1.0)
        heart_shift = rng.normal(0.0, 4.0, 3)
        self.dia_right = -62.0 + rng.normal(0.0, 5.0)  # diaphragm dome tops (z)
        self.dia_left = self.dia_right - 10.0 + rng.normal(0.0, 3.0)

        yb = np.where(Y < 0, Y * 1.1, Y)  # a flatter back
        self.X2, self.Y2 = X * X, yb * yb
        self.radius = np.sqrt(self.X2 + self.Y2)
        cos_t = X / np.maximum(self.radius, 1e-3)  # around the body: right = +1
        sin_t = yb / np.maximum(self.radius, 1e-3)  # anterior = +1
        self.fat = (fat0 * (1 + 0.4 * cos_t**2)).astype(np.float32)
        self.paraspinal = (32.0 * np.clip(-sin_t, 0, 1) ** 2 * np.exp(-((cos_t / 0.45) ** 2))).astype(np.float32)
        self.pectoral = (12.0 * np.clip(sin_t, 0, 1) * (np.abs(cos_t) > 0.25)).astype(np.float32)
        self.lateral = np.abs(cos_t) ** 3  # shoulder girdle: thick walls up top
        self.rib_slope = (85.0 * (1.0 + sin_t) * 0.5).astype(np.float32)  # ribs run down anteriorly
        self.rib_ok = (np.abs(X) > 26.0) & ((np.abs(cos_t) > 0.3) | (sin_t < 0))
        self.sternum_ok = (np.abs(X) < 14.0) & (sin_t > 0.9)

        # --- spine: vertebral bodies (discs along z), canal, posterior elements -----------------
        self.yv = yv = -B + 56.0
        yc = yv - 25.0
        self.r_vb = np.sqrt(X * X + (Y - yv) ** 2)
        r_canal = np.sqrt(X * X + (Y - yc) ** 2)
        self.vert_body = self.r_vb < 17.0
        self.vb_cortex = self.r_vb > 14.5
        self.canal = r_canal < 8.0
        self.post_elem = (
            ((r_canal >= 8.0) & (r_canal < 14.0) & (Y < yc + 4.0))
            | ((np.abs(X) < 4.0) & (Y < yc - 8.0) & (Y > yc - 44.0))
            | ((np.abs(X) > 9.0) & (np.abs(X) < 34.0) & (np.abs(Y - yc - 3.0) < 5.0))
        )

        # --- diaphragm domes: deeper laterally and posteriorly ---------------------------------
        top = np.where(X > 0, self.dia_right, self.dia_left)
        self.dia = (top - 60.0 * (((np.abs(X) - 60.0) / 90.0) ** 2 + ((Y - 10.0) / 95.0) ** 2)).astype(np.float32)

        # --- lung envelope: apices are domes above z = 30; the mediastinum and spine split it --
        self.apex_xy = (((np.abs(X) - 62.0) / 72.0) ** 2 + ((Y - yv - 38.0) / 78.0) ** 2).astype(np.float32)
        self.mediast_col = np.abs(X + 4.0 + 6.0 * smoothstep((Y - yv - 60.0) / 40.0)) < 13.0
        self.spine_zone = ((np.abs(X) < 24.0) & (Y < yv + 10.0)) | (self.r_vb < 22.0)

        # --- heart: a rotated ellipsoid on the diaphragm, long axis to the left-anterior -------
        self.hc = hc = np.array([-24.0, yv + 86.0, -52.0]) + heart_shift  # centre (body mm)
        ang = np.deg2rad(40.0)
        u = (X - hc[0]) * -np.cos(ang) + (Y - hc[1]) * np.sin(ang)
        v = (X - hc[0]) * np.sin(ang) + (Y - hc[1]) * np.cos(ang)
        self.heart_xy = ((u / 62.0) ** 2 + (v / 45.0) ** 2).astype(np.float32)  # half height: 52 mm
        self.gas_xy = (((X + 55.0) / 30.0) ** 2 + ((Y - 10.0) / 35.0) ** 2).astype(np.float32)

        # --- mediastinal tubes (body mm) ---------------------------------------------------------
        self.carina = np.array([0.0, yv + 46.0, 24.0])
        self.bronchus_end = {1.0: np.array([46.0, yv + 44.0, 4.0]), -1.0: np.array([-48.0, yv + 40.0, -2.0])}
        trachea = polyline(grid, [[2.0, yv + 50.0, 250.0], self.carina], 9.0)
        bronchi = sum(
            (
                polyline(grid, [self.carina, end], r)
                for end, r in ((self.bronchus_end[1.0], 6.5), (self.bronchus_end[-1.0], 6.0))
            ),
            [],
        )
        hz = self.hc[2]
        blood = (
            polyline(
                grid,
                [
                    [16, yv + 80, hz + 40],
                    [18, yv + 82, 30],
                    [10, yv + 70, 52],
                    [-8, yv + 45, 60],
                    [-22, yv + 22, 52],
                    [-22, yv + 14, 30],
                    [-20, yv + 14, -250],
                ],
                13.0,
            )  # aorta
            + polyline(grid, [[-8, yv + 88, hz + 35], [-18, yv + 78, 8], [-26, yv + 62, 14]], 13.0)  # trunk
            + polyline(grid, [[-26, yv + 62, 14], [-52, yv + 50, 8]], 10.0)  # left PA
            + polyline(grid, [[-14, yv + 70, 10], [22, yv + 58, 6], [52, yv + 50, 2]], 10.0)  # right PA
            + polyline(grid, [[36, yv + 70, 250], [34, yv + 72, hz + 40]], 10.0)  # SVC
            + polyline(grid, [[30, yv + 50, hz - 10], [30, yv + 45, -250]], 12.0)
        )  # IVC
        esophagus = polyline(grid, [[-6, yv + 27, 250], [-10, yv + 30, -70], [-35, yv + 45, -120]], 7.5)
        self.excl_mm = 5.0 * grid.scale
        self.blood = Tubes(grid, blood, self.excl_mm)
        self.air = Tubes(grid, trachea + bronchi, self.excl_mm)
        self.esophagus = Tubes(grid, esophagus, self.excl_mm)

    def slice(self, k: int, tissues: np.ndarray, hu: np.ndarray, lungs: np.ndarray) -> None:
        """Fill tissue codes, HU (before texture, blur, noise) and the lung mask of slice ``k``."""
        g = self.grid
        z = float(g.z[k])
        up = float(smoothstep((z - 50.0) / 70.0))
        down = float(smoothstep((-z - 70.0) / 60.0))
        # shoulders up top, a deeper (AP) lower chest and belly
        a = self.A * (1 + 0.12 * up - 0.03 * down) * (1 + 0.02 * np.sin(z / 23.0))
        b = self.B * (1 - 0.10 * up + 0.06 * down) * (1 - 0.0004 * z)
        rho2 = self.X2 * np.float32(1 / a**2) + self.Y2 * np.float32(1 / b**2)
        body = rho2 <= 1.0
        depth = (1.0 / np.sqrt(np.maximum(rho2, 1e-6)) - 1.0) * self.radius  # mm in from the skin
        wall = (
            2.0
            + self.fat
            + self.paraspinal
            + self.pectoral * np.float32(smoothstep(z / 50.0))
            + self.lateral * np.float32(10.0 * smoothstep((z + 40.0) / 120.0) + 25.0 * up)
            + np.float32(7.0)
        )  # muscle >= 7 mm
        rib_zone = 11.0
        inner = body & (depth >= wall + rib_zone)
        above_dia = z > self.dia

        t = np.zeros(body.shape, np.uint8)
        t[body] = TISSUES["skin"]
        t[body & (depth >= 2.0)] = TISSUES["fat"]
        t[body & (depth >= 2.0 + self.fat)] = TISSUES["muscle"]

        sd_b, sd_a, sd_e = (tubes.plane(k, self.rows, self.cols) for tubes in (self.blood, self.air, self.esophagus))
        excl = np.minimum(np.minimum(sd_b, sd_a), sd_e) < self.excl_mm
        e_heart = self.heart_xy + np.float32(((z - self.hc[2]) / 52.0) ** 2)
        apex = self.apex_xy + np.float32((max(z - 30.0, 0.0) / 90.0) ** 2)
        lung = inner & above_dia & (apex < 1.0) & ~self.mediast_col & ~self.spine_zone & ~(e_heart < 1.3) & ~excl

        cavity = inner & ~lung
        t[cavity] = TISSUES["mediastinum"] if z <= 90.0 else TISSUES["muscle"]  # above: neck base
        t[cavity & ~above_dia] = TISSUES["abdomen"]
        t[lung] = TISSUES["lung"]
        t[(e_heart < 1.0) & (self.dia < z + 10.0)] = TISSUES["heart"]
        t[(sd_e < 0) & body] = TISSUES["soft_tissue"]
        t[(sd_b < 0) & inner] = TISSUES["blood"]
        t[(sd_a < 2.0 * g.scale) & body & ~lung] = TISSUES["soft_tissue"]  # airway wall
        t[(sd_a < 0) & body & ~lung] = TISSUES["airway"]
        z_gas = self.dia_left - 22.0
        if abs(z - z_gas) < 12.0:  # stomach bubble
            gas = (self.gas_xy + ((z - z_gas) / 12.0) ** 2 < 1.0) & inner & ~above_dia & (self.dia < z + 30.0)
            t[gas] = TISSUES["air"]

        # bones; the cortex is brighter than the cancellous core
        bone_hu = np.zeros(body.shape, np.float32)
        disc = abs(((z + 7.0) / 27.0) % 1.0 - 0.5) < 0.09
        vb = self.vert_body & body
        t[vb] = TISSUES["soft_tissue"] if disc else TISSUES["bone"]
        if not disc:
            bone_hu[vb] = np.where(self.vb_cortex[vb], 580.0, 180.0)
        t[self.canal & body] = TISSUES["soft_tissue"]
        pe = self.post_elem & body
        t[pe] = TISSUES["bone"]
        bone_hu[pe] = 300.0
        if z < 125.0:
            phase = (z + self.rib_slope) / 26.0 + self.rib_phase
            dz = (phase - np.round(phase)) * np.float32(26.0 / 5.5)
            dd = (depth - wall - np.float32(rib_zone * 0.5)) / np.float32(5.5)
            e_rib = dd * dd + dz * dz
            rib = (e_rib < 1.0) & body & self.rib_ok
            t[rib] = TISSUES["bone"]
            bone_hu[rib] = 100.0 + 650.0 * e_rib[rib] ** 2
        if -75.0 < z < 95.0:
            sternum = self.sternum_ok & body & (depth > wall - 4.0) & (depth < wall + 9.0)
            t[sternum] = TISSUES["bone"]
            bone_hu[sternum] = 150.0
        h = np.take(TISSUE_HU, t)
        h += bone_hu
        if self.contrast:
            h[t == TISSUES["blood"]] = 280.0
            heart = t == TISSUES["heart"]
            h[heart] = np.where(e_heart[heart] < 0.55, 280.0, 110.0)
        crop = (k, self.rows, self.cols)
        tissues[k] = TISSUES["air"]
        tissues[k][self.table] = TISSUES["table"]
        tissues[crop] = np.where(body, t, tissues[crop])
        hu[k] = TISSUE_HU[TISSUES["air"]]
        hu[k][self.table] = TISSUE_HU[TISSUES["table"]]
        hu[crop] = np.where(body, h, hu[crop])
        lungs[k] = False
        lungs[crop] = lung


def lung_trees(grid: Grid, rng: np.random.Generator, lungs: np.ndarray, anatomy: Anatomy) -> Tuple[Tubes, Tubes]:
    """Signed distances (grid mm) to the pulmonary vessels and to the bronchial lumens.

    Two vessel trees per lung (arteries and veins) and one bronchial tree, each from its hilum to
    random terminal points spread through that lung.
    """
    stride = np.maximum(1, np.round(6.0 / grid.sp).astype(int))
    coarse = np.argwhere(lungs[:: stride[0], :: stride[1], :: stride[2]])
    centres = coarse * stride * grid.sp
    mid_i = grid.body_to_grid(np.zeros((1, 3)))[0, 2]
    vessels, lumens = [], []
    yv = anatomy.yv
    for sgn in (1.0, -1.0):
        # +x (the patient's right) is toward lower i
        mine = centres[(mid_i - centres[:, 2]) * sgn > 0]
        if len(mine) < 8:
            continue
        for root_z in (10.0, -14.0):  # arteries, veins
            pick = mine[rng.choice(len(mine), size=min(300, len(mine)), replace=False)]
            pick = pick + rng.uniform(-0.5, 0.5, pick.shape) * stride * grid.sp
            root = grid.body_to_grid([[sgn * 50.0, yv + 48.0, root_z]])[0]
            vessels += tree(rng, root, pick, 0.75 * grid.scale, 0.38)
        pick = mine[rng.choice(len(mine), size=min(24, len(mine)), replace=False)]
        for seg in tree(rng, grid.body_to_grid([anatomy.bronchus_end[sgn]])[0], pick, 0.9 * grid.scale, 0.45):
            if seg[2] > 1.2 * grid.scale:  # visible bronchi only
                lumens.append(seg)
    wall = 1.2 * grid.scale
    return Tubes(grid, vessels), Tubes(grid, lumens, wall)
