"""Synthetic abdominal CT phantoms in the raw BTCV layout (``img/img00XX.nii.gz``, ``label/label00XX.nii.gz``).

Every case is a smooth, anatomically placed abdomen: body outline with subcutaneous fat and an abdominal wall,
spine (vertebral bodies, discs, canal, posterior elements), ribs, paraspinal and psoas muscles, lung bases, colon
and small-bowel distractors, and the 13 BTCV organs (labels 1..13, see :data:`BTCV_LABELS`). Organ size,
position, orientation, shape (superquadrics with low-frequency deformation) and HU are jittered per case; several
organs share intensities (liver/spleen/pancreas/stomach/bowel/muscle, kidney/vessels) so a model has to use
position and shape. Spacing is about ``358/matrix`` mm in-plane (0.7 mm at 512) and ~3 mm axially (jittered);
storage orientation varies (RAS, LPS, LAS, some oblique affines).

Coordinates below are nibabel RAS+ world millimetres: +x towards the patient's Right, +y Anterior, +z Superior;
z = 0 is about L1/L2.

Generation is deterministic per ``(seed, case id)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BTCV_LABELS = {
    1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
    7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic vein", 11: "pancreas",
    12: "right adrenal gland", 13: "left adrenal gland",
}
# the 30 labelled BTCV training ids (Synapse split applies to these), then the 10 remaining ids
BTCV_TRAINING_IDS = [f"{i:04d}" for i in list(range(1, 11)) + list(range(21, 41))]
EXTRA_IDS = [f"{i:04d}" for i in range(11, 21)]
ALL_IDS = BTCV_TRAINING_IDS + EXTRA_IDS

FOV_MM = 358.4          # 512 x 0.7 mm
Z_EXTENT_MM = 225.0     # from the iliac crest to above the liver dome
STORAGE = ["RAS", "LPS", "LAS", "LPS-oblique", "RAS-oblique"]

SPLEEN, RKID, LKID, GALL, ESO, LIVER, STOM, AORTA, IVC, PORTAL, PANC, RADR, LADR = range(1, 14)


# --------------------------------------------------------------------------------------------- grid helpers
@dataclass
class _Grid:
    shape: tuple          # (nx, ny, nz) of the canonical RAS array
    spacing: tuple        # (sx, sy, sz) mm
    origin: tuple         # world (x, y, z) of voxel (0, 0, 0)

    def slices(self, lo, hi):
        """Index slices covering the world box [lo, hi] (clipped); None when empty."""
        out = []
        for a in range(3):
            i0 = int(math.floor((lo[a] - self.origin[a]) / self.spacing[a]))
            i1 = int(math.ceil((hi[a] - self.origin[a]) / self.spacing[a])) + 1
            i0, i1 = max(i0, 0), min(i1, self.shape[a])
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl):
        """Open world-coordinate grids X (n,1,1), Y (1,n,1), Z (1,1,n) for index slices ``sl``."""
        res = []
        for a in range(3):
            v = self.origin[a] + self.spacing[a] * np.arange(sl[a].start, sl[a].stop, dtype=np.float32)
            shp = [1, 1, 1]
            shp[a] = -1
            res.append(v.reshape(shp))
        return res


def _rot(ax, ay, az):
    """Rotation matrix from angles (radians) about x, y, z."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Painter:
    def __init__(self, grid: _Grid, rng: np.random.Generator):
        self.g = grid
        self.rng = rng
        self.image = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        self.cavity = None  # boolean mask organs are confined to

    def paint(self, sl, mask, hu, label=None, confine=True, only_label=None):
        if sl is None:
            return
        if confine and self.cavity is not None:
            mask = mask & self.cavity[sl]
        if only_label is not None:
            mask = mask & (self.label[sl] == only_label)
        if not mask.any():
            return
        img = self.image[sl]
        img[mask] = hu if np.isscalar(hu) else np.broadcast_to(hu, mask.shape)[mask]
        if label is not None:
            self.label[sl][mask] = label

    # ---- primitives (all return (slices, mask) in world mm) ----
    def superquadric(self, center, axes, rot=(0, 0, 0), n=2.0, deform=0.12, taper=0.0, waves=3):
        c = np.asarray(center, np.float32)
        a = np.asarray(axes, np.float32)
        r = _rot(*rot).astype(np.float32)
        ext = float(a.max()) * (1.0 + abs(taper)) * 1.35
        sl = self.g.slices(c - ext, c + ext)
        if sl is None:
            return None, None
        X, Y, Z = self.g.coords(sl)
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        u = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / a[0]
        v = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / a[1]
        w = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / a[2]
        if taper:
            t = np.clip(1.0 + taper * u, 0.25, None)
            v, w = v / t, w / t
        f = np.abs(u) ** n + np.abs(v) ** n + np.abs(w) ** n
        for _ in range(waves):
            k = self.rng.normal(size=3).astype(np.float32)
            k *= self.rng.uniform(1.5, 3.0) / (np.linalg.norm(k) + 1e-6)
            f = f + deform * self.rng.uniform(0.4, 1.0) * np.sin(k[0] * u + k[1] * v + k[2] * w
                                                                 + self.rng.uniform(0, 2 * np.pi))
        return sl, f <= 1.0

    def tube(self, axis, t_pts, c1_pts, c2_pts, r1_pts, r2_pts):
        """Tube along world ``axis`` (0=x, 2=z): centre (c1, c2) and radii in the other two axes, piecewise linear
        in the axis coordinate ``t``, which spans ``t_pts`` (ascending)."""
        t_pts = np.asarray(t_pts, np.float32)
        others = [a for a in range(3) if a != axis]
        rmax = float(max(np.max(r1_pts), np.max(r2_pts)))
        lo, hi = np.zeros(3, np.float32), np.zeros(3, np.float32)
        lo[axis], hi[axis] = t_pts[0], t_pts[-1]
        lo[others[0]], hi[others[0]] = np.min(c1_pts) - rmax, np.max(c1_pts) + rmax
        lo[others[1]], hi[others[1]] = np.min(c2_pts) - rmax, np.max(c2_pts) + rmax
        sl = self.g.slices(lo, hi)
        if sl is None:
            return None, None
        C = self.g.coords(sl)
        t = C[axis]
        tt = t.ravel()
        shp = t.shape

        def f(p):
            return np.interp(tt, t_pts, np.asarray(p, np.float32)).reshape(shp).astype(np.float32)

        m = ((C[others[0]] - f(c1_pts)) / f(r1_pts)) ** 2 + ((C[others[1]] - f(c2_pts)) / f(r2_pts)) ** 2 <= 1.0
        m = m & (t >= t_pts[0]) & (t <= t_pts[-1])
        return sl, m


# --------------------------------------------------------------------------------------------- anatomy
def _case_geometry(rng, matrix):
    """Spacing (sx, sy, sz), shape and origin of the canonical RAS grid for one case."""
    inplane = FOV_MM / matrix * rng.uniform(0.93, 1.07)
    sz = 3.0 * rng.uniform(0.85, 1.15)
    nz = int(round(Z_EXTENT_MM / sz))
    nx = ny = int(matrix)
    # body centre near the FOV centre (table offset), z range shifted a little
    cx, cy = rng.uniform(-8, 8), rng.uniform(-12, 6)
    z0 = -92.0 + rng.uniform(-10, 10)
    origin = (cx - inplane * (nx - 1) / 2, cy - inplane * (ny - 1) / 2, z0)
    return _Grid((nx, ny, nz), (inplane, inplane, sz), origin)


def _anatomy(p: _Painter, rng: np.random.Generator):
    """Paint one abdomen into ``p`` (canonical RAS grid)."""
    g = p.g
    U = rng.uniform
    S = U(0.9, 1.08)              # patient size (in-plane)
    Sz = U(0.92, 1.08)            # patient height factor
    dz = U(-8, 8)                 # organ block shift along z
    contrast = U(0.8, 1.2)        # contrast phase: scales enhancement of vessels/kidneys
    hu = lambda base, spread=8.0: base + U(-spread, spread)  # noqa: E731

    def P(x, y, z):  # world position from template mm
        return (x * S, y * S, z * Sz + dz)

    # ---- body outline, subcutaneous fat, abdominal wall ----
    full = (slice(0, g.shape[0]), slice(0, g.shape[1]), slice(0, g.shape[2]))
    X, Y, Z = g.coords(full)
    ax, ay = 140 * S * U(0.95, 1.08), 105 * S * U(0.93, 1.07)
    widen = 1.0 + 0.0007 * (-(Z - dz)).clip(0, None)      # a bit wider towards the pelvis
    yb = Y + 8.0                                           # flatter back
    ne = U(2.1, 2.5)
    body_f = np.abs(X / (ax * widen)) ** ne + np.abs(yb / (ay * widen)) ** ne
    body = body_f <= 1.0
    fat = U(10, 28) * S
    wall = U(8, 13) * S

    def shell(d):
        return (np.abs(X / (ax * widen - d)) ** ne + np.abs(yb / (ay * widen - d)) ** ne) <= 1.0

    inner_wall = shell(fat)
    cavity = shell(fat + wall)
    p.image[body] = hu(-100, 10)
    p.image[inner_wall & ~cavity] = hu(50, 6)
    p.image[cavity] = hu(-95, 10)            # visceral fat
    p.cavity = cavity
    del body_f

    # ---- lung bases (posterior, above the diaphragm) ----
    for sx in (+1, -1):
        sl, m = p.superquadric(P(75 * sx, -35, 150), (70 * S, 60 * S, 70), n=2.0, deform=0.05)
        p.paint(sl, m, hu(-850, 30))

    # ---- colon (with gas) and small bowel: unlabelled distractors ----
    for sx in (+1, -1):       # ascending (right) and descending (left) colon
        r = U(14, 20)
        sl, m = p.tube(2, [z + dz for z in (-120, -60, 0, 35)],
                       [sx * 95 * S + U(-6, 6) for _ in range(4)], [U(-15, 10) * S for _ in range(4)],
                       [r] * 4, [r * U(0.8, 1.1)] * 4)
        p.paint(sl, m, hu(20, 10))
        sl, m = p.tube(2, [z + dz for z in (-120, -60, 0, 35)],
                       [sx * 95 * S + U(-6, 6) for _ in range(4)], [U(-10, 5) * S for _ in range(4)],
                       [r * 0.55] * 4, [r * 0.5] * 4)
        p.paint(sl, m, hu(-750, 80))
    r = U(13, 18)             # transverse colon, anterior
    sl, m = p.tube(0, [-95 * S, -40 * S, 0, 40 * S, 95 * S], [U(45, 65) * S for _ in range(5)],
                   [z + dz for z in (35, 8, -5, 5, 28)], [r] * 5, [r] * 5)
    p.paint(sl, m, hu(25, 10))
    for _ in range(int(U(6, 12))):   # small bowel loops in the lower anterior abdomen
        c = P(U(-70, 70), U(10, 70), U(-95, -15))
        sl, m = p.superquadric(c, (U(12, 22) * S, U(10, 18) * S, U(15, 30)), rot=(U(-1, 1), U(-1, 1), U(-1, 1)),
                               deform=0.2)
        p.paint(sl, m, hu(35, 12) if U() < 0.75 else hu(-600, 200))

    # ---- muscles: paraspinal, psoas ----
    for sx in (+1, -1):
        sl, m = p.tube(2, [g.origin[2], g.origin[2] + g.spacing[2] * g.shape[2]], [sx * 32 * S] * 2,
                       [-90 * S] * 2, [24 * S] * 2, [19 * S] * 2)
        p.paint(sl, m, hu(50, 5), confine=False)
        sl, m = p.tube(2, [z + dz for z in (-130, -60, 0, 35)], [sx * 32 * S, sx * 38 * S, sx * 30 * S, sx * 24 * S],
                       [-52 * S, -50 * S, -52 * S, -55 * S], [22 * S, 18 * S, 11 * S, 5 * S],
                       [20 * S, 16 * S, 10 * S, 5 * S])
        p.paint(sl, m, hu(50, 5))

    # ---- stomach (label 7): wall, fluid, gas cap ----
    st_c = P(U(-55, -38), U(22, 38), U(55, 75))
    st_ax = (U(38, 50) * S, U(28, 38) * S, U(45, 60) * Sz)
    st_rot = (U(-0.3, 0.3), U(0.2, 0.6), U(-0.5, -0.1))
    sl, m = p.superquadric(st_c, st_ax, rot=st_rot, n=U(1.9, 2.4), deform=0.1)
    p.paint(sl, m, hu(40, 8), STOM)
    if sl is not None:
        state = p.rng.bit_generator.state
        sl2, m2 = p.superquadric(st_c, tuple(a * 0.72 for a in st_ax), rot=st_rot, n=2.0, deform=0.0, waves=0)
        p.rng.bit_generator.state = state
        X2, Y2, Z2 = g.coords(sl2)
        content = hu(15, 10)
        p.paint(sl2, m2, content, only_label=STOM)
        if U() < 0.7:   # gas rises anteriorly in a supine patient
            p.paint(sl2, m2 & (Y2 > st_c[1] + st_ax[1] * U(0.1, 0.4)), hu(-800, 100), only_label=STOM)

    # ---- liver (6), with its wedge towards the left lobe ----
    lv_c = P(U(55, 70), U(0, 15), U(45, 60))
    sl, m = p.superquadric(lv_c, (U(80, 95) * S, U(75, 88) * S, U(62, 75) * Sz),
                           rot=(U(-0.15, 0.15), U(-0.15, 0.15), U(-0.15, 0.15)), n=U(2.0, 2.6), deform=0.12,
                           taper=U(0.35, 0.55))
    p.paint(sl, m, hu(62, 10), LIVER)

    # ---- gallbladder (4): pear under the liver, anterior ----
    sl, m = p.superquadric(P(U(38, 52), U(38, 52), U(0, 20)), (U(13, 18) * S, U(13, 18) * S, U(30, 40) * Sz),
                           rot=(U(0.2, 0.6), U(-0.4, 0.0), 0), n=2.0, deform=0.06)
    p.paint(sl, m, hu(12, 8), GALL)

    # ---- spleen (1): posterior left ----
    sl, m = p.superquadric(P(U(-92, -78), U(-42, -25), U(45, 62)), (U(25, 34) * S, U(45, 58) * S, U(45, 58) * Sz),
                           rot=(0, U(-0.2, 0.2), U(-0.7, -0.3)), n=U(2.0, 2.4), deform=0.1)
    p.paint(sl, m, hu(52, 8), SPLEEN)

    # ---- kidneys (2 right, 3 left): cortex, medulla, sinus notch facing medially/anteriorly ----
    kid_hu = hu(165, 15) * contrast
    for lab, sx, z0 in ((RKID, +1, U(-30, -15)), (LKID, -1, U(-18, -2))):
        c = P(sx * U(58, 70), U(-62, -48), z0)
        axes = (U(24, 30) * S, U(22, 27) * S, U(50, 60) * Sz)
        rot = (U(-0.25, 0.0), sx * U(0.1, 0.3), sx * U(0.3, 0.6))
        state = p.rng.bit_generator.state
        sl, m = p.superquadric(c, axes, rot=rot, n=2.0, deform=0.05)
        p.paint(sl, m, kid_hu, lab)
        p.rng.bit_generator.state = state
        sl2, m2 = p.superquadric(c, tuple(a * 0.62 for a in axes), rot=rot, n=2.0, deform=0.05)
        p.paint(sl2, m2, kid_hu - hu(45, 10), only_label=lab)
        sl3, m3 = p.superquadric((c[0] - sx * axes[0] * 0.85, c[1] + axes[1] * 0.45, c[2]),
                                 (axes[0] * 0.45, axes[1] * 0.35, axes[2] * 0.35), deform=0.0, waves=0)
        p.paint(sl3, m3, hu(-90, 10), 0, only_label=lab)

    # ---- adrenals (12 right, 13 left): thin plates above and medial to the kidneys ----
    for lab, sx in ((RADR, +1), (LADR, -1)):
        sl, m = p.superquadric(P(sx * U(35, 45), U(-38, -28), U(35, 48)), (U(5, 7) * S, U(13, 17) * S, U(14, 20)),
                               rot=(0, 0, sx * U(0.3, 0.7)), n=2.0, deform=0.05)
        p.paint(sl, m, hu(38, 6), lab)

    # ---- pancreas (11): head right of the midline near the duodenum, body across the aorta, tail to the spleen ----
    xs = [45 * S, 25 * S, 0, -35 * S, -70 * S]
    ys = [U(-5, 10) * S, U(5, 15) * S, U(10, 20) * S, U(0, 10) * S, U(-25, -10) * S]
    zs = [z * Sz + dz for z in (U(-5, 5), U(2, 10), U(10, 18), U(15, 25), U(22, 32))]
    rr = [U(14, 19) * S, U(12, 15) * S, U(9, 12) * S, U(9, 12) * S, U(7, 10) * S]
    sl, m = p.tube(0, xs[::-1], ys[::-1], zs[::-1], rr[::-1], [r * U(0.8, 1.0) for r in rr[::-1]])
    p.paint(sl, m, hu(45, 8), PANC)

    # ---- splenic vein (behind the pancreas) and portal vein (up to the liver hilum): label 10 ----
    vein_hu = hu(165, 15) * contrast
    sl, m = p.tube(0, [-72 * S, -35 * S, 0, 12 * S], [ys[4] - 12 * S, ys[3] - 13 * S, ys[2] - 14 * S, ys[2] - 13 * S],
                   [zs[4] + 2, zs[3] + 2, zs[2] + 2, zs[2] + 4], [5 * S] * 4, [5 * S] * 4)
    p.paint(sl, m, vein_hu, PORTAL)
    sl, m = p.tube(2, [zs[2] + 2, zs[2] + 25, lv_c[2] - 5], [12 * S, 28 * S, 42 * S], [ys[2] - 13 * S, 0, 8 * S],
                   [7 * S] * 3, [7 * S] * 3)
    p.paint(sl, m, vein_hu, PORTAL)

    # ---- aorta (8) anterior-left of the spine, IVC (9) right of it, esophagus (5) above the hiatus ----
    zb, zt = g.origin[2] - 5, g.origin[2] + g.spacing[2] * g.shape[2] + 5
    ax_, ay_ = -U(10, 20) * S, -U(22, 30) * S
    r = U(9, 12.5) * S
    sl, m = p.tube(2, [zb, 0, zt], [ax_ - 2, ax_, ax_ - 3], [ay_ + 3, ay_, ay_ - 6], [r * 0.9, r, r * 1.05],
                   [r * 0.9, r, r * 1.05])
    p.paint(sl, m, hu(200, 20) * contrast, AORTA)
    ix, iy = U(18, 28) * S, -U(15, 24) * S
    r = U(10, 13) * S
    sl, m = p.tube(2, [zb, 0, 60 * Sz + dz, zt], [ix, ix, ix + 5, ix + 8], [iy, iy, iy - 5, iy - 10],
                   [r, r, r * 1.1, r * 1.1], [r * 0.7, r * 0.8, r * 0.9, r])
    p.paint(sl, m, hu(150, 15) * contrast, IVC)
    r = U(6, 8.5) * S
    sl, m = p.tube(2, [72 * Sz + dz, 100 * Sz + dz, zt], [st_c[0] * 0.55, -14 * S, -8 * S],
                   [st_c[1] * 0.3 - 6, -14 * S, -18 * S], [r * 1.2, r, r], [r, r, r])
    p.paint(sl, m, hu(42, 8), ESO)

    # ---- spine: vertebral bodies (cortex + cancellous), discs, canal, posterior elements; ribs ----
    vb_x, vb_y = 0.0, -62 * S
    zz = np.arange(g.shape[2], dtype=np.float32) * g.spacing[2] + g.origin[2]
    period = U(28, 34) * Sz
    disc = (np.mod(zz - dz + U(0, period), period) < 7.5)[None, None, :]
    sl = g.slices((vb_x - 30 * S, vb_y - 70 * S, zb), (vb_x + 30 * S, vb_y + 30 * S, zt))
    Xs, Ys, Zs = g.coords(sl)
    rb = ((Xs - vb_x) / (21 * S)) ** 2 + ((Ys - vb_y) / (17 * S)) ** 2
    vb = rb <= 1.0
    cancellous = rb <= 0.72
    canal = ((Xs - vb_x) / (9 * S)) ** 2 + ((Ys - vb_y + 27 * S) / (8 * S)) ** 2 <= 1.0
    ring = ((Xs - vb_x) / (16 * S)) ** 2 + ((Ys - vb_y + 28 * S) / (14 * S)) ** 2 <= 1.0
    spinous = (np.abs(Xs - vb_x) < 4.5 * S) & (Ys < vb_y - 36 * S) & (Ys > vb_y - 62 * S)
    transverse = (np.abs(Xs - vb_x) < 38 * S) & (np.abs(Ys - vb_y + 30 * S) < 4.5 * S)
    bone_hu, canc_hu = hu(650, 80), hu(230, 40)
    zb3 = disc[:, :, sl[2]]
    shp = np.broadcast_shapes(vb.shape, zb3.shape)
    zb3 = np.broadcast_to(zb3, shp)
    vb3 = np.broadcast_to(vb, shp)
    post = np.broadcast_to((ring | spinous | transverse) & ~canal, shp)
    p.paint(sl, vb3 & ~zb3, bone_hu, 0, confine=False)
    p.paint(sl, np.broadcast_to(cancellous, shp) & ~zb3, canc_hu, 0, confine=False)
    p.paint(sl, vb3 & zb3, hu(85, 10), 0, confine=False)
    p.paint(sl, post & ~zb3, bone_hu * 0.85, 0, confine=False)
    p.paint(sl, np.broadcast_to(canal, shp), hu(15, 5), 0, confine=False)
    # ribs: thin arcs just inside the abdominal wall, upper abdomen, not in front
    rib_top = 130 * Sz + dz
    sl = full
    theta = np.arctan2(Y, X)                                     # (nx, ny, 1)
    d_in = fat + wall * 0.4
    ribshell = shell(d_in) & ~shell(d_in + 7 * S)
    lateral = np.abs(np.sin(theta)) < 0.8
    rphase = np.mod((Z - dz) + 25 * np.abs(np.cos(theta)) - U(0, 25), 25.0) < 9.0
    ribs = ribshell & lateral & rphase & (Z > -40 * Sz + dz) & (Z < rib_top) & (Y > -80 * S)
    p.image[ribs] = hu(550, 60)
    p.label[ribs] = 0
    return contrast


def _finish_image(p: _Painter, rng: np.random.Generator):
    from scipy.ndimage import gaussian_filter

    sig_mm = 0.8
    s = [sig_mm / sp for sp in p.g.spacing]
    img = gaussian_filter(p.image, sigma=[max(v, 0.35) for v in s[:2]] + [0.35], mode="nearest")
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(10, 22))
    img += noise
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


def generate_case(case_id: str, seed: int = 0, matrix: int = 512):
    """One phantom: ``(image int16, label uint8, affine 4x4, storage code)`` in its storage orientation, plus the
    canonical RAS arrays for previews (``dict``)."""
    cid = int(case_id)
    rng = np.random.default_rng([int(seed), cid, 1729])
    grid = _case_geometry(rng, matrix)
    p = _Painter(grid, rng)
    _anatomy(p, rng)
    image = _finish_image(p, rng)
    label = p.label
    affine = np.eye(4)
    affine[:3, :3] = np.diag(grid.spacing)
    affine[:3, 3] = grid.origin
    canonical = {"image": image, "label": label, "affine": affine.copy()}
    storage = STORAGE[(cid * 7 + seed) % len(STORAGE)]
    base = storage.split("-")[0]
    flip = {"RAS": (), "LPS": (0, 1), "LAS": (0,)}[base]
    for ax in flip:
        image = np.flip(image, ax)
        label = np.flip(label, ax)
        fl = np.eye(4)
        fl[ax, ax] = -1
        fl[ax, 3] = image.shape[ax] - 1
        affine = affine @ fl
    if storage.endswith("oblique"):
        rot = np.eye(4)
        rot[:3, :3] = _rot(rng.uniform(-0.15, 0.15), rng.uniform(-0.1, 0.1), rng.uniform(-0.2, 0.2))
        centre = affine @ np.r_[(np.array(image.shape) - 1) / 2.0, 1.0]
        tr1, tr2 = np.eye(4), np.eye(4)
        tr1[:3, 3], tr2[:3, 3] = -centre[:3], centre[:3]
        affine = tr2 @ rot @ tr1 @ affine
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine, storage, canonical


def case_ids(n: int):
    if not 1 <= n <= len(ALL_IDS):
        from glam3d.errors import UserError

        raise UserError(f"--cases must be between 1 and {len(ALL_IDS)} (the BTCV ids 0001..0040), got {n}")
    return ALL_IDS[:n]


def write_case(out: Path, case_id: str, seed: int, matrix: int):
    import nibabel as nib

    from glam3d.utils.io import atomic_path

    image, label, affine, storage, _ = generate_case(case_id, seed, matrix)
    for arr, sub, name in ((image, "img", f"img{case_id}.nii.gz"), (label, "label", f"label{case_id}.nii.gz")):
        nii = nib.Nifti1Image(arr, affine)
        nii.set_qform(affine, code=1)
        nii.set_sform(affine, code=1)
        nii.header.set_xyzt_units("mm")
        with atomic_path(out / sub / name) as tmp:
            nib.save(nii, str(tmp))
    return {"id": case_id, "storage": storage, "shape": list(image.shape),
            "spacing_xyz": [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0))]}


def preview(cases, out_png, seed=0, matrix=512):
    """A figure of axial slices at several levels plus a coronal slice per case, labels overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from glam3d.utils.io import atomic_path

    colours = ["#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#ff0000", "#17becf", "#bcbd22", "#ffff00", "#00ff00", "#00ffff"]
    cmap = ListedColormap(colours)
    levels = [0.88, 0.7, 0.55, 0.42, 0.3]
    fig, axes = plt.subplots(len(cases), len(levels) + 2, figsize=(3 * (len(levels) + 2), 3 * len(cases)),
                             squeeze=False)
    for r, cid in enumerate(cases):
        _, _, _, storage, can = generate_case(cid, seed, matrix)
        img, lab = can["image"].astype(np.float32), can["label"]
        nz = img.shape[2]
        # radiological display: patient right on the left of the picture, anterior up
        for c, lv in enumerate(levels):
            k = int(lv * (nz - 1))
            im2 = np.flipud(img[:, :, k].T)       # rows: anterior at top
            lb2 = np.flipud(lab[:, :, k].T)
            im2, lb2 = im2[:, ::-1], lb2[:, ::-1]
            a = axes[r, c]
            a.imshow(im2, cmap="gray", vmin=-160, vmax=240)
            a.imshow(np.ma.masked_equal(lb2, 0), cmap=cmap, vmin=0, vmax=13, alpha=0.45, interpolation="nearest")
            a.set_title(f"{cid} {storage} z{k}", fontsize=8)
            a.axis("off")
        for c, (name, sl) in enumerate((("coronal", np.s_[:, img.shape[1] // 2 - int(15 / can['affine'][1, 1]), :]),
                                        ("sagittal", np.s_[img.shape[0] // 2 + int(55 / can['affine'][0, 0]), :, :]))):
            im2, lb2 = np.flipud(img[sl].T), np.flipud(lab[sl].T)
            if name == "coronal":
                im2, lb2 = im2[:, ::-1], lb2[:, ::-1]
            a = axes[r, len(levels) + c]
            asp = can["affine"][2, 2] / can["affine"][0, 0]
            a.imshow(im2, cmap="gray", vmin=-160, vmax=240, aspect=asp)
            a.imshow(np.ma.masked_equal(lb2, 0), cmap=cmap, vmin=0, vmax=13, alpha=0.45, aspect=asp,
                     interpolation="nearest")
            a.set_title(name, fontsize=8)
            a.axis("off")
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=70, format="png")
    plt.close(fig)
