"""Synthetic chest-CT-like volumes with lung nodules (numpy only, seeded).

Each case is a slab of a chest: air around an elliptical body (soft tissue ~40 HU with a
subcutaneous fat rim), two lungs (~-850 HU) that narrow towards the ends of the slab, a
vertebra (bone), vessel-like tubes inside the lungs (the distractors a nodule detector must
ignore) and 0..n bright spherical nodules of 4-30 mm diameter with varied contrast.

Array convention (the one MONAI's ``LoadImage`` uses): ``volume[i, j, k]`` with ``i``
along the columns (patient x, right-left), ``j`` along the rows (y, anterior-posterior)
and ``k`` along the slices (z). ``spacing`` is ``(sx, sy, sz)`` in mm in the same order.
Millimetre positions are in the volume's own frame: voxel ``(i, j, k)`` is at
``(i*sx, j*sy, k*sz)`` mm (origin at the centre of voxel 0, axes aligned with the array).

Partial volume: nodules and vessels are drawn with a soft edge whose width is the voxel
extent along the surface normal, so thick slices blur small nodules along z as a real
scanner does. The ground-truth mask is the set of voxels whose centre lies inside a nodule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AIR_HU = -1000.0
FAT_HU = -100.0
TISSUE_HU = 40.0
BONE_HU = 400.0


@dataclass(frozen=True)
class Nodule:
    centre_voxel: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    diameter_mm: float
    hu: float


@dataclass(frozen=True)
class SynthParams:
    """Ranges the generator draws from (uniformly unless noted)."""

    inplane_mm: tuple[float, float] = (0.6, 0.9)
    slice_mm: tuple[float, float] = (1.0, 3.0)
    matrix: int = 512  # in-plane matrix, as a scanner reconstructs it
    body_fill: tuple[float, float] = (0.78, 0.95)  # body width / field of view
    z_extent_mm: tuple[float, float] = (100.0, 160.0)
    n_nodules: tuple[int, int] = (1, 4)  # inclusive, when the case has nodules
    p_no_nodule: float = 0.2
    diameter_mm: tuple[float, float] = (4.0, 30.0)  # log-uniform
    nodule_hu: tuple[float, float] = (-450.0, 100.0)
    lung_hu: tuple[float, float] = (-880.0, -800.0)
    noise_hu: tuple[float, float] = (8.0, 35.0)  # at 1 mm slices; scales 1/sqrt(thickness)
    vessels_per_lung: tuple[int, int] = (6, 14)


@dataclass
class SynthCase:
    volume: np.ndarray  # float32 HU, (X, Y, Z)
    spacing: tuple[float, float, float]
    nodules: list[Nodule]
    mask: np.ndarray  # uint8, 1 inside a nodule
    lungs: np.ndarray  # uint8, 1 inside the lungs (used to sample training patches)
    meta: dict[str, float] = field(default_factory=dict)


def _soft_fill(
    vol: np.ndarray,
    sdf: np.ndarray,
    normal_spacing: np.ndarray,
    hu: float,
    sl: tuple[slice, slice, slice],
    limit: np.ndarray | None = None,
) -> np.ndarray:
    """Blend ``hu`` into ``vol[sl]`` with occupancy from a signed distance (mm)."""
    occ = np.clip(0.5 - sdf / np.maximum(normal_spacing, 1e-3), 0.0, 1.0)
    if limit is not None:
        occ = occ * limit
    sub = vol[sl]
    sub += (hu - sub) * occ.astype(np.float32)
    return occ


def _bbox(
    lo_mm: np.ndarray, hi_mm: np.ndarray, spacing: np.ndarray, shape: tuple[int, ...]
) -> tuple[slice, slice, slice] | None:
    lo = np.maximum(np.floor(lo_mm / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(hi_mm / spacing).astype(int) + 1, np.array(shape))
    if np.any(hi <= lo):
        return None
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))


def _grid_mm(
    sl: tuple[slice, slice, slice], spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = (np.arange(sl[0].start, sl[0].stop) * spacing[0])[:, None, None]
    y = (np.arange(sl[1].start, sl[1].stop) * spacing[1])[None, :, None]
    z = (np.arange(sl[2].start, sl[2].stop) * spacing[2])[None, None, :]
    return x, y, z


def draw_sphere(
    vol: np.ndarray,
    spacing: np.ndarray,
    centre_mm: np.ndarray,
    radius_mm: float,
    hu: float,
    mask: np.ndarray | None = None,
) -> None:
    sl = _bbox(centre_mm - radius_mm - 3, centre_mm + radius_mm + 3, spacing, vol.shape)
    if sl is None:
        return
    x, y, z = _grid_mm(sl, spacing)
    dx, dy, dz = x - centre_mm[0], y - centre_mm[1], z - centre_mm[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    inv = 1.0 / np.maximum(dist, 1e-6)
    normal_spacing = np.sqrt(
        (dx * inv * spacing[0]) ** 2 + (dy * inv * spacing[1]) ** 2 + (dz * inv * spacing[2]) ** 2
    )
    sdf = dist - radius_mm
    _soft_fill(vol, sdf, normal_spacing, hu, sl)
    if mask is not None:
        mask[sl] |= (sdf <= 0).astype(np.uint8)


def draw_tube(
    vol: np.ndarray,
    spacing: np.ndarray,
    a_mm: np.ndarray,
    b_mm: np.ndarray,
    radius_mm: float,
    hu: float,
    limit: np.ndarray | None = None,
) -> None:
    """A capsule (segment a-b with a radius), clipped to ``limit`` (e.g. the lung mask)."""
    lo = np.minimum(a_mm, b_mm) - radius_mm - 3
    hi = np.maximum(a_mm, b_mm) + radius_mm + 3
    sl = _bbox(lo, hi, spacing, vol.shape)
    if sl is None:
        return
    x, y, z = _grid_mm(sl, spacing)
    ab = b_mm - a_mm
    denom = float(ab @ ab) or 1e-6
    t = ((x - a_mm[0]) * ab[0] + (y - a_mm[1]) * ab[1] + (z - a_mm[2]) * ab[2]) / denom
    t = np.clip(t, 0.0, 1.0)
    dx = x - (a_mm[0] + t * ab[0])
    dy = y - (a_mm[1] + t * ab[1])
    dz = z - (a_mm[2] + t * ab[2])
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    inv = 1.0 / np.maximum(dist, 1e-6)
    normal_spacing = np.sqrt(
        (dx * inv * spacing[0]) ** 2 + (dy * inv * spacing[1]) ** 2 + (dz * inv * spacing[2]) ** 2
    )
    lim = None if limit is None else limit[sl].astype(np.float32)
    _soft_fill(vol, dist - radius_mm, normal_spacing, hu, sl, lim)


def make_case(
    rng: np.random.Generator,
    params: SynthParams | None = None,
    *,
    spacing: tuple[float, float, float] | None = None,
    nodules_mm: list[tuple[tuple[float, float, float], float]] | None = None,
    nodule_hu: float | None = None,
    noise: bool = True,
) -> SynthCase:
    """Draw one case. ``spacing`` and ``nodules_mm`` ([(centre_mm, diameter_mm)]) fix
    what would otherwise be random (used by the tests); centres are in the volume frame."""
    p = params or SynthParams()
    if spacing is None:
        s_in = float(rng.uniform(*p.inplane_mm))
        spacing = (s_in, s_in, float(rng.uniform(*p.slice_mm)))
    sp = np.asarray(spacing, dtype=np.float64)
    nx = ny = p.matrix
    fov = nx * sp[0]
    z_ext = float(rng.uniform(*p.z_extent_mm))
    nz = max(round(z_ext / sp[2]), 8)
    z_ext = nz * sp[2]

    # Body: ellipse, AP shorter than LR, slightly off-centre.
    a = 0.5 * fov * rng.uniform(*p.body_fill)
    b = a * rng.uniform(0.62, 0.8)
    cx = 0.5 * fov + rng.uniform(-0.03, 0.03) * fov
    cy = 0.5 * fov + rng.uniform(-0.03, 0.03) * fov
    x = (np.arange(nx) * sp[0])[:, None]
    y = (np.arange(ny) * sp[1])[None, :]
    ex = (x - cx) / a
    ey = (y - cy) / b
    r_body = ex * ex + ey * ey
    fat_t = rng.uniform(0.06, 0.14)
    slice2d = np.full((nx, ny), AIR_HU, dtype=np.float32)
    slice2d[r_body <= 1.0] = FAT_HU
    slice2d[r_body <= (1.0 - fat_t) ** 2] = TISSUE_HU
    # Vertebra (posterior = +y).
    vx, vy, vr = cx, cy + 0.62 * b, 0.11 * a
    slice2d[(x - vx) ** 2 + (y - vy) ** 2 <= vr * vr] = BONE_HU

    vol = np.repeat(slice2d[:, :, None], nz, axis=2)
    lungs = np.zeros((nx, ny, nz), dtype=np.uint8)

    # Lungs: two ellipses whose size varies along z (narrowing towards one or both ends).
    lung_hu = float(rng.uniform(*p.lung_hu))
    zc = rng.uniform(0.3, 0.7) * z_ext
    zl = rng.uniform(0.75, 1.4) * z_ext
    lung_geo: list[tuple[float, float, float, float]] = []
    for side in (-1.0, 1.0):
        lcx = cx + side * a * rng.uniform(0.4, 0.48)
        lcy = cy - b * rng.uniform(0.0, 0.1)
        la = a * rng.uniform(0.28, 0.36)
        lb = b * rng.uniform(0.62, 0.75)
        lung_geo.append((lcx, lcy, la, lb))
    zs = np.arange(nz) * sp[2]
    scale_z = np.sqrt(np.clip(1.0 - ((zs - zc) / zl) ** 2, 0.2, 1.0))
    for k in range(nz):
        m = np.zeros((nx, ny), dtype=bool)
        for lcx, lcy, la, lb in lung_geo:
            s = scale_z[k]
            m |= ((x - lcx) / (la * s)) ** 2 + ((y - lcy) / (lb * s)) ** 2 <= 1.0
        lungs[:, :, k] = m
        vol[:, :, k][m] = lung_hu

    # Vessels: tapering tubes from the hilum outwards, clipped to the lungs.
    vessel_hu = float(rng.uniform(20.0, 60.0))
    for lcx, lcy, la, lb in lung_geo:
        hilum = np.array([lcx - np.sign(lcx - cx) * 0.55 * la, lcy, zc])
        for _ in range(int(rng.integers(p.vessels_per_lung[0], p.vessels_per_lung[1] + 1))):
            start = hilum + rng.normal(0.0, [0.15 * la, 0.2 * lb, 0.15 * z_ext])
            radius = float(rng.uniform(1.2, 3.0))
            direction = rng.normal(size=3)
            direction[0] += np.sign(lcx - cx) * 1.0
            for _seg in range(int(rng.integers(2, 5))):
                direction = direction + rng.normal(0.0, 0.4, size=3)
                direction /= np.linalg.norm(direction)
                length = float(rng.uniform(15.0, 40.0))
                end = start + direction * length
                draw_tube(vol, sp, start, end, radius, vessel_hu, lungs)
                start = end
                radius = max(0.6, radius * rng.uniform(0.6, 0.85))

    # Nodules.
    mask = np.zeros((nx, ny, nz), dtype=np.uint8)
    nodules: list[Nodule] = []
    hu_n = nodule_hu
    if nodules_mm is None:
        nodules_mm = []
        if rng.uniform() >= p.p_no_nodule:
            n = int(rng.integers(p.n_nodules[0], p.n_nodules[1] + 1))
            tries = 0
            while len(nodules_mm) < n and tries < 200:
                tries += 1
                d = float(np.exp(rng.uniform(np.log(p.diameter_mm[0]), np.log(p.diameter_mm[1]))))
                r = d / 2
                lcx, lcy, la, lb = lung_geo[int(rng.integers(2))]
                zc_n = rng.uniform(r + 2, z_ext - r - 2) if z_ext > d + 4 else None
                if zc_n is None:
                    continue
                kz = min(int(zc_n / sp[2]), nz - 1)
                s = scale_z[kz]
                # Centre inside the lung, at least ~0.6 r from its edge.
                u, v = rng.uniform(-1, 1, size=2)
                if u * u + v * v > 1:
                    continue
                sa, sb = la * s - 0.6 * r, lb * s - 0.6 * r
                if sa <= 2 or sb <= 2:
                    continue
                c = np.array([lcx + u * sa, lcy + v * sb, zc_n])
                if any(
                    np.linalg.norm(c - np.asarray(c2)) < r + d2 / 2 + 5 for c2, d2 in nodules_mm
                ):
                    continue
                nodules_mm.append(((float(c[0]), float(c[1]), float(c[2])), d))
    for centre, d in nodules_mm:
        hu = float(rng.uniform(*p.nodule_hu)) if hu_n is None else hu_n
        c = np.asarray(centre, dtype=np.float64)
        draw_sphere(vol, sp, c, d / 2, hu, mask)
        nodules.append(
            Nodule(
                centre_voxel=(float(c[0] / sp[0]), float(c[1] / sp[1]), float(c[2] / sp[2])),
                centre_mm=(float(c[0]), float(c[1]), float(c[2])),
                diameter_mm=float(d),
                hu=hu,
            )
        )

    noise_sd = 0.0
    if noise:
        noise_sd = float(rng.uniform(*p.noise_hu)) / np.sqrt(sp[2])
        vol += rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(noise_sd)
    return SynthCase(
        volume=vol.astype(np.float32, copy=False),
        spacing=(float(sp[0]), float(sp[1]), float(sp[2])),
        nodules=nodules,
        mask=mask,
        lungs=lungs,
        meta={"noise_sd": noise_sd, "lung_hu": lung_hu, "body_width_mm": 2 * a},
    )
