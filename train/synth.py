"""Deterministic synthetic factory-line images in the MVTec AD layout.

Each image is one part (a procedural surface with a fixed product geometry) on a dark conveyor
belt, seen through a camera with small lighting, pose and noise variation. Defects are painted
onto a finished good image and come with a pixel mask. Every image draws from its own
`numpy.random.Generator` keyed by (seed, category, stream, index), so any subset regenerates
byte-identically and changing one count never changes other images.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

GENERATOR_VERSION = "1.0"

# Defects are kept inside this box (fractions of the frame): every category's part covers it
# under pose jitter, and the mounting holes sit outside it.
_SAFE = (0.22, 0.78)
_CUT = 0.2  # painter coverage below this is dropped, so faint tails never leave the mask
_MIN_CONTRAST = 20.0  # mean gray-level change inside the mask for a defect to be kept
_SS = 4  # supersampling factor for anti-aliased drawing

Texture = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
Painter = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------- helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (size, size) float32."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return x, y


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Standard normal float32 noise (float32 sampling is ~2x faster than float64)."""
    return rng.standard_normal(shape, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (size, size) float32 with std ~1: `cells` blobs across the frame."""
    low = _randn(rng, cells + 1, cells + 1)
    return cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)


def _norm(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-6)


def _rrect_sdf(x: np.ndarray, y: np.ndarray, size: int, margin: float, radius: float) -> np.ndarray:
    """Signed distance in px to a centred rounded square (negative inside)."""
    half, r = size * (0.5 - margin), size * radius
    qx, qy = np.abs(x - size / 2) - half + r, np.abs(y - size / 2) - half + r
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _holes_sdf(x: np.ndarray, y: np.ndarray, size: int, inset: float, r: float) -> np.ndarray:
    """Signed distance in px to the nearest of four corner holes (negative inside a hole)."""
    d = np.full(x.shape, np.inf, np.float32)
    for cx in (inset, 1 - inset):
        for cy in (inset, 1 - inset):
            d = np.minimum(d, np.hypot(x - cx * size, y - cy * size) - r * size)
    return d


def _cover(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the region sdf < 0."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _polyline_cover(
    size: int | tuple[int, int], pts: np.ndarray, width: float, weight: np.ndarray
) -> np.ndarray:
    """Coverage (H,W) of an anti-aliased polyline (size = S or (H, W)); `weight` per point
    fades it (0..1)."""
    h, w = (size, size) if isinstance(size, int) else size
    canvas = np.zeros((h * _SS, w * _SS), np.uint8)
    p = np.rint(pts * _SS).astype(np.int32)
    thick = max(1, int(round(width * _SS)))
    for i in range(len(p) - 1):
        val = int(255 * 0.5 * (weight[i] + weight[i + 1]))
        cv2.line(canvas, tuple(map(int, p[i])), tuple(map(int, p[i + 1])), val, thick, cv2.LINE_AA)
    small = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def _lookup(registry: dict, name: str, kind: str):
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]


# ----------------------------------------------------------------------------- part textures
# Each returns (colour (S,S,3) float32 BGR 0..255, coverage (S,S) float32) in the part's own
# frame: geometry is fixed per category (same product), micro-texture varies with `rng`.


def _brushed_metal(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(size)
    plate = _rrect_sdf(x, y, size, 0.12, 0.05)
    holes = _holes_sdf(x, y, size, 0.17, 0.028)
    cover = _cover(np.maximum(plate, -holes))
    # Brushing: noise that varies slowly along x (few control points) and fast along y.
    streak = cv2.resize(_randn(rng, size, 6), (size, size))
    streak = cv2.GaussianBlur(streak, (0, 0), sigmaX=0.1, sigmaY=0.6)
    fine = cv2.GaussianBlur(_randn(rng, size, size), (0, 0), 6.0, 0.4)
    sheen = np.cos(2 * np.pi * (y / size * 0.7 + rng.uniform()))  # broad anisotropic highlight
    lum = 160 + 9 * _norm(streak) + 5 * _norm(fine) + 8 * sheen + 2 * _smooth_noise(rng, size, 3)
    w = 0.012 * size  # bevelled plate edge reads darker, machined hole chamfer brighter
    lum -= 40 * np.clip(1 + plate / w, 0, 1)
    lum += 45 * np.clip(1 - holes / w, 0, 1) * (holes > 0)
    colour = lum[..., None] * np.array([1.03, 1.0, 0.96], np.float32)
    return colour, cover


def _woven_fabric(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(size)
    sdf = _rrect_sdf(x, y, size, 0.08, 0.015)
    period = max(4.0, size / 26)
    # Threads are not perfectly straight: a smooth displacement field bends the weave.
    dx, dy = (0.18 * period * _smooth_noise(rng, size, 4) for _ in range(2))
    u = (x + dx) / period + rng.uniform(0, 2)
    v = (y + dy) / period + rng.uniform(0, 2)
    i, j = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - i, v - j
    # A thread is a rounded yarn across its width and dives under its neighbour at cell ends.
    across_u, across_v = np.sin(np.pi * fu) ** 0.6, np.sin(np.pi * fv) ** 0.6
    dive_u, dive_v = 1 - 0.45 * np.abs(2 * fu - 1) ** 3, 1 - 0.45 * np.abs(2 * fv - 1) ** 3
    n = int(size / period) + 8
    warp_k = 1 + 0.04 * rng.normal(size=n).astype(np.float32)  # per-thread yarn variation
    weft_k = 1 + 0.04 * rng.normal(size=n).astype(np.float32)
    over = (i + j) % 2 == 0  # plain weave: warp over weft on alternating cells
    warp = warp_k[i % n] * (0.5 + 0.5 * across_u) * dive_v
    weft = weft_k[j % n] * (0.5 + 0.5 * across_v) * dive_u
    hair = cv2.GaussianBlur(_randn(rng, size, size), (0, 0), 0.7)
    edge = 1 - 0.3 * np.clip(1 + sdf / (0.015 * size), 0, 1)  # cut edge curls, darker
    warp_c = np.array([150, 172, 190], np.float32)
    weft_c = np.array([128, 152, 176], np.float32)
    colour = np.where(over[..., None], warp[..., None] * warp_c, weft[..., None] * weft_c)
    colour = colour * edge[..., None] + 10 * hair[..., None]
    return colour.astype(np.float32), _cover(sdf)


@functools.lru_cache(maxsize=4)
def _pcb_layout(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed board design (one product) drawn supersampled: (colour BGR uint8, coverage)."""
    big = size * _SS

    def px(*f: float) -> tuple[int, ...]:  # board fractions -> supersampled px
        return tuple(int(round(v * big)) for v in f)

    def box(cx: float, cy: float, hw: float, hh: float, colour, thick: float = 0) -> None:
        t = px(thick)[0] if thick else -1
        cv2.rectangle(img, px(cx - hw, cy - hh), px(cx + hw, cy + hh), colour, t)

    img = np.empty((big, big, 3), np.uint8)
    img[:] = (52, 100, 34)  # solder mask
    trace, tin, silk = (66, 128, 44), (150, 175, 190), (225, 230, 230)
    lrng = np.random.default_rng(7)  # fixed seed: the board layout must not vary per image
    pins = [0.41 + k * 0.036 for k in range(6)]
    for yp in pins:  # IC pins routed out as Manhattan traces ending in test pads
        for x0, x1 in ((0.38, 0.27), (0.62, 0.73)):
            y1 = float(np.clip(yp + lrng.uniform(-0.18, 0.18), 0.2, 0.8))
            pts = np.array([px(x0, yp), px(x1, yp), px(x1, y1), px(2 * x1 - x0, y1)])
            cv2.polylines(img, [pts], False, trace, px(0.009)[0], cv2.LINE_AA)
            cv2.circle(img, px(2 * x1 - x0, y1), px(0.012)[0], tin, -1, cv2.LINE_AA)
    box(0.5, 0.5, 0.1, 0.12, (36, 34, 34))  # IC package, pin-1 dot, leads, outline, label
    cv2.circle(img, px(0.425, 0.405), px(0.008)[0], (70, 70, 70), -1, cv2.LINE_AA)
    for yp in pins:
        box(0.385, yp, 0.015, 0.007, tin)
        box(0.615, yp, 0.015, 0.007, tin)
    box(0.5, 0.5, 0.145, 0.145, silk, 0.003)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, big / 900
    cv2.putText(img, "U1", px(0.44, 0.35), font, scale, silk, px(0.004)[0], cv2.LINE_AA)
    parts = [(0.3, 0.27, 0), (0.5, 0.27, 0), (0.7, 0.27, 0), (0.3, 0.73, 0), (0.5, 0.73, 0)]
    parts += [(0.7, 0.73, 0), (0.28, 0.5, 1), (0.72, 0.5, 1)]
    for n, (cx, cy, vert) in enumerate(parts):  # two-pad SMD resistors / capacitors
        ax, ay = (0.0, 0.03) if vert else (0.03, 0.0)
        box(cx - ax, cy - ay, 0.014, 0.014, tin)
        box(cx + ax, cy + ay, 0.014, 0.014, tin)
        box(cx, cy, 0.6 * ax + 0.012, 0.6 * ay + 0.012, (40, 40, 44) if n % 2 else (100, 130, 150))
        box(cx, cy, ax + 0.024, ay + 0.024, silk, 0.003)
    x, y = _grid(big)
    holes = _holes_sdf(x, y, big, 0.17, 0.022)
    img[(holes > 0) & (holes < 0.014 * big)] = (95, 160, 190)  # plated ring around mount holes
    cover = _cover(np.maximum(_rrect_sdf(x, y, big, 0.1, 0.02), -holes))
    small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    cover = cv2.resize(cover, (size, size), interpolation=cv2.INTER_AREA)
    small.flags.writeable = cover.flags.writeable = False  # cached: callers must copy
    return small, cover


def _pcb(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    layout, cover = _pcb_layout(size)
    # Per instance only the finish varies: solder-mask thickness (low-freq) and grain.
    thick = 1 + 0.05 * _smooth_noise(rng, size, 4)
    grain = cv2.GaussianBlur(_randn(rng, size, size), (0, 0), 0.8)
    colour = layout.astype(np.float32) * thick[..., None] + 4 * grain[..., None]
    return colour, cover.copy()


CATEGORIES: dict[str, Texture] = {
    "brushed_metal": _brushed_metal,
    "woven_fabric": _woven_fabric,
    "pcb": _pcb,
}


# ----------------------------------------------------------------------------- good image


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark rubber conveyor belt (size, size, 3) float32 BGR."""
    _, y = _grid(size)
    grain = cv2.GaussianBlur(_randn(rng, size, size), (0, 0), 1.2)
    ribs = np.cos(2 * np.pi * (y / max(4.0, size / 40) + rng.uniform()))  # belt cross-ribs
    lum = 44 + 5 * _norm(grain) + 2 * ribs + 3 * _smooth_noise(rng, size, 3)
    return lum[..., None] * np.array([1.0, 1.03, 1.08], np.float32)


def render_part(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One good part on the belt as a camera sees it: (size, size, 3) uint8 BGR."""
    texture = _lookup(CATEGORIES, category, "category")
    colour, cover = texture(rng, size)
    # Pose jitter: a few px shift and < 2 deg rotation of the part; the belt stays put.
    s = size / 256
    m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-1.5, 1.5), 1.0)
    m[:, 2] += rng.uniform(-3 * s, 3 * s, 2)
    colour = cv2.warpAffine(
        colour, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    cover = cv2.warpAffine(cover, m, (size, size), flags=cv2.INTER_LINEAR)
    bg = _background(rng, size)
    shadow = cv2.warpAffine(cover, np.float32([[1, 0, 3 * s], [0, 1, 4 * s]]), (size, size))
    bg *= (1 - 0.45 * cv2.GaussianBlur(shadow, (0, 0), 3 * s))[..., None]
    a = cover[..., None]
    img = colour * a + bg * (1 - a)
    # Camera: gain/offset and white-balance jitter, an illumination gradient, sensor noise.
    x, y = _grid(size)
    th = rng.uniform(0, 2 * np.pi)
    ramp = ((x - size / 2) * np.cos(th) + (y - size / 2) * np.sin(th)) / (size / 2)
    grad = 1 + rng.uniform(0.02, 0.05) * ramp
    wb = 1 + rng.uniform(-0.015, 0.015, 3).astype(np.float32)
    img = img * (rng.uniform(0.94, 1.06) * wb) * grad[..., None] + rng.uniform(-5, 5)
    img += rng.uniform(2.0, 3.0) * _randn(rng, *img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- defects
# Each painter takes the good image (H,W,3) float32 and returns (painted (H,W,3) float32,
# coverage (H,W) float32 in [0, 1]); add_defect blends them so uncovered pixels stay identical.


def _centre(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.uniform(0.3, 0.7, 2) * size


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    c, length, th = _centre(rng, size), rng.uniform(0.2, 0.34) * size, rng.uniform(0, np.pi)
    d = np.array([np.cos(th), np.sin(th)]) * length / 2
    bend = c + np.array([-d[1], d[0]]) * rng.uniform(-0.5, 0.5)
    t = np.linspace(0, 1, 32)[:, None]
    pts = (1 - t) ** 2 * (c - d) + 2 * (1 - t) * t * bend + t**2 * (c + d)  # quadratic Bezier
    taper = np.clip(1.8 * np.sin(np.pi * t[:, 0]), 0.2, 1)  # shallow at both ends
    cover = _polyline_cover(size, pts, rng.uniform(1.2, 2.0) * size / 256, taper)
    if rng.random() < 0.6:  # groove edge catching the light
        return img + rng.uniform(45, 70), cover
    return img * rng.uniform(0.45, 0.6), cover


def _walk(rng, p, th, length, step) -> np.ndarray:
    """Jagged polyline: each step deviates from a slowly drifting main direction."""
    pts = [p]
    for _ in range(max(2, int(length / step))):
        th += rng.normal(0, 0.08)
        a = th + rng.normal(0, 0.55)
        pts.append(pts[-1] + step * np.array([np.cos(a), np.sin(a)]))
    return np.array(pts)


def _crack(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    s, length, th = size / 256, rng.uniform(0.2, 0.32) * size, rng.uniform(0, 2 * np.pi)
    start = _centre(rng, size) - length / 2 * np.array([np.cos(th), np.sin(th)])
    main = _walk(rng, start, th, length, 4 * s)
    width = rng.uniform(1.2, 1.8) * s
    t = np.linspace(0, 1, len(main))
    cover = _polyline_cover(size, main, width, np.clip(2.5 * np.sin(np.pi * t), 0.3, 1))
    for _ in range(rng.integers(1, 4)):  # branches split off the main crack and thin out
        k = int(rng.integers(len(main) // 5, 4 * len(main) // 5))
        bth = th + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
        br = _walk(rng, main[k], bth, length * rng.uniform(0.25, 0.45), 3 * s)
        fade = np.linspace(1, 0.3, len(br))
        cover = np.maximum(cover, _polyline_cover(size, br, 0.8 * width, fade))
    return img * rng.uniform(0.25, 0.4), cover


def _spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    c, r = _centre(rng, size), rng.uniform(0.03, 0.065) * size
    blob = np.zeros(img.shape[:2], np.float32)
    for _ in range(rng.integers(3, 6)):  # a few overlapping ellipses make an irregular stain
        o = tuple(int(v) for v in np.rint(c + rng.normal(0, 0.35 * r, 2)))
        axes = tuple(int(max(1, v)) for v in np.rint(r * rng.uniform(0.4, 0.8, 2)))
        cv2.ellipse(blob, o, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    blob = cv2.GaussianBlur(blob, (0, 0), max(0.8, 0.3 * r))
    cover = np.clip(1.4 * blob / max(blob.max(), 1e-6), 0, 1)
    # A stain fills the surface micro-structure (less texture) and shifts its colour.
    base = 0.4 * img + 0.6 * cv2.blur(img, (3, 3))
    kind = rng.integers(3)
    if kind == 0:  # rust / dried coolant: brownish
        return base * np.array([0.5, 0.66, 0.9], np.float32), cover
    if kind == 1:  # oil: darker, slightly bluish
        return base * np.array([0.6, 0.57, 0.55], np.float32), cover
    return base * 0.5 + 0.5 * np.array([225, 230, 235], np.float32), cover  # whitish residue


def _missing(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    s, c, r = size / 256, _centre(rng, size), rng.uniform(0.04, 0.07) * size
    n = int(rng.integers(9, 15))
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 0.5, n)
    rad = r * np.clip(1 + 0.25 * rng.normal(size=n), 0.5, 1.5)
    poly = c + rad[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
    canvas = np.zeros((size * _SS, size * _SS), np.uint8)
    cv2.fillPoly(canvas, [np.rint(poly * _SS).astype(np.int32)], 255, cv2.LINE_AA)
    cover = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    # Through the hole the camera sees the belt (colour from the frame border, which is always
    # belt), in the part's shadow, plus the broken wall as a lit crescent on one side.
    border = np.concatenate([img[:4].reshape(-1, 3), img[-4:].reshape(-1, 3)])
    belt = np.median(border, axis=0) * 0.75
    grain = 3 * _smooth_noise(rng, size, 12) + 2.5 * _randn(rng, *cover.shape)
    fill = belt + grain[..., None].astype(np.float32)
    shift = np.float32([[1, 0, 2.5 * s], [0, 1, 2.5 * s]])
    wall = np.clip(cover - cv2.warpAffine(cover, shift, (size, size)), 0, 1)[..., None]
    return fill * (1 - wall) + (0.5 * img + 60) * wall, cover


DEFECTS: dict[str, Painter] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "missing": _missing,
}


def add_defect(
    image: np.ndarray, defect: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint `defect` on a good (H,W,3) uint8 BGR image: (defective image, mask (H,W) 0/255)."""
    painter = _lookup(DEFECTS, defect, "defect")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) image, got shape {image.shape}")
    img = image.astype(np.float32)
    lo, hi = (int(f * image.shape[0]) for f in _SAFE)
    # Redraw (bounded) a defect that strays outside the part's safe zone or that would be
    # nearly invisible where it landed (e.g. a dark crack across a black IC package).
    for _ in range(12):
        painted, cover = painter(img, rng)
        cover = np.clip((cover - _CUT) / (1 - _CUT), 0, 1)  # still soft, but compact support
        a = cover[..., None]
        out = np.where(a > 0, img * (1 - a) + painted * a, img)
        mask = cover > 0  # exactly the pixels that were repainted
        ys, xs = np.nonzero(mask)
        if not mask.any() or min(ys.min(), xs.min()) < lo or max(ys.max(), xs.max()) >= hi:
            continue
        if np.abs(out - img)[mask].max(axis=1).mean() >= _MIN_CONTRAST:
            break
    mask = np.where(mask, 255, 0).astype(np.uint8)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------- writing sets


def _rng(seed: int, category: str, stream: str, index: int) -> np.random.Generator:
    """Independent stream per image; crc32 (not hash()) so keys are stable across runs."""
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(stream.encode()), index]
    return np.random.default_rng(key)


def _write_png(path: Path, img: np.ndarray) -> None:
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


def _names(seq: list[str] | None, registry: dict, kind: str) -> list[str]:
    names = list(registry) if seq is None else list(seq)
    for n in names:
        _lookup(registry, n, kind)
    return names


def _clear_pngs(folder: Path, pattern: str) -> None:
    """Drop our own stale outputs (a previous run with larger counts) before rewriting."""
    if folder.is_dir():
        for f in folder.glob(pattern):
            f.unlink()


def _check(seed: int, image_size: int, **counts: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    for k, v in counts.items():
        if v < 0:
            raise ValueError(f"{k} must be >= 0, got {v}")


def generate(
    out: str | Path,
    categories: list[str] | None = None,
    image_size: int = 256,
    train_good: int = 60,
    test_good: int = 20,
    test_defect: int = 8,
    defects: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write an MVTec AD layout set under `out` plus `out/meta.yaml`; return the meta dict."""
    cats = _names(categories, CATEGORIES, "category")
    defs = _names(defects, DEFECTS, "defect")
    _check(seed, image_size, train_good=train_good, test_good=test_good, test_defect=test_defect)
    out = Path(out)
    jobs = []  # (category, split dir, defect or None, count)
    for cat in cats:
        jobs += [(cat, "train/good", None, train_good), (cat, "test/good", None, test_good)]
        jobs += [(cat, f"test/{d}", d, test_defect) for d in defs]
    total = sum(j[3] for j in jobs)
    with tqdm(total=total, desc="synth", unit="img", disable=not progress) as bar:
        for cat, split, defect, count in jobs:
            folder = out / cat / split
            gt = out / cat / "ground_truth" / (defect or "")
            folder.mkdir(parents=True, exist_ok=True)
            _clear_pngs(folder, "*.png")
            if defect:
                gt.mkdir(parents=True, exist_ok=True)
                _clear_pngs(gt, "*_mask.png")
            width = max(3, len(str(count - 1)))
            for i in range(count):
                rng = _rng(seed, cat, split, i)
                img = render_part(cat, rng, image_size)
                name = f"{i:0{width}d}"
                if defect:
                    img, mask = add_defect(img, defect, rng)
                    _write_png(gt / f"{name}_mask.png", mask)
                _write_png(folder / f"{name}.png", img)
                bar.update()
    meta = {
        "generator": "train.synth",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "categories": cats,
        "defects": defs,
        "counts": {"train_good": train_good, "test_good": test_good, "test_defect": test_defect},
        "layout": "mvtec_ad",
    }
    (out / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return meta


def generate_line_sequence(
    out_dir: str | Path,
    category: str,
    n_parts: int,
    defect_rate: float,
    image_size: int = 256,
    seed: int = 0,
) -> list[dict]:
    """Write a replay of the line (out_dir/00000.png ..., masks/, labels.json); return labels.

    Parts come from the "line" stream, disjoint from generate()'s train/test images.
    """
    _lookup(CATEGORIES, category, "category")
    _check(seed, image_size, n_parts=n_parts)
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
    out_dir = Path(out_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    _clear_pngs(out_dir, "[0-9][0-9][0-9][0-9][0-9].png")
    _clear_pngs(out_dir / "masks", "*_mask.png")
    plan = _rng(seed, category, "line-plan", 0)  # which parts are defective, and how
    names = list(DEFECTS)
    labels = []
    for i in range(n_parts):
        defective = bool(plan.random() < defect_rate)
        defect = names[int(plan.integers(len(names)))] if defective else None
        rng = _rng(seed, category, "line", i)
        img = render_part(category, rng, image_size)
        frame, mask_name = f"{i:05d}.png", None
        if defect:
            img, mask = add_defect(img, defect, rng)
            mask_name = f"masks/{i:05d}_mask.png"
            _write_png(out_dir / mask_name, mask)
        _write_png(out_dir / frame, img)
        labels.append(
            {
                "frame": frame,
                "index": i,
                "defective": defective,
                "defect": defect,
                "mask": mask_name,
            }
        )
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=1))
    return labels
