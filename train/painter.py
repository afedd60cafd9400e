"""Surface-aware defect painter for any good image (real photographs included).

Unlike `train.synth`'s painters, which know the synthetic part they draw on, these take every
colour and every contrast from the surface itself: its mean colour, its spread (std), its own
pixels (a texture warp moves them, a stain mixes them with a tint). Each painter returns the
painted image and a soft coverage; `paint_defect` blends them so uncovered pixels stay exactly
as they were and the mask is exactly the repainted pixels.

    img, mask = paint_defect(good_bgr_uint8, "crack", np.random.default_rng(0))

What painted defects can and cannot tell is written in docs/models.md ("Real surfaces").
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from train.synth import _lookup, _polyline_cover, _walk

Painter = Callable[[np.ndarray, np.random.Generator, "Surface"], tuple[np.ndarray, np.ndarray]]

_SAFE = (0.12, 0.88)  # defects stay inside this box (fractions of the frame)
_CUT = 0.2  # coverage below this is dropped: faint tails never leave the mask
_SS = 4  # supersampling for anti-aliased polygons


class Surface:
    """Statistics of the good image a defect is painted on (H,W,3) float32 BGR."""

    def __init__(self, img: np.ndarray):
        self.h, self.w = img.shape[:2]
        self.size = min(self.h, self.w)
        gray = img.mean(axis=2)
        self.mean = img.reshape(-1, 3).mean(axis=0)  # (3,)
        # Contrast unit: the surface's own spread, floored so a flat surface still gets a
        # visible defect (a real scratch on a mirror-polished part is visible too).
        self.std = float(max(gray.std(), 12.0))
        self.dark = np.percentile(img.reshape(-1, 3), 5, axis=0)  # (3,)
        self.bright = np.percentile(img.reshape(-1, 3), 95, axis=0)  # (3,)


def _centre(rng: np.random.Generator, s: Surface) -> np.ndarray:
    return np.array([rng.uniform(0.3, 0.7) * s.w, rng.uniform(0.3, 0.7) * s.h])


def _blob(rng: np.random.Generator, s: Surface, r: float, lobes: tuple[int, int]) -> np.ndarray:
    """Irregular soft blob (H,W) in [0,1]: a few overlapping ellipses, blurred."""
    c = _centre(rng, s)
    blob = np.zeros((s.h, s.w), np.float32)
    for _ in range(rng.integers(*lobes)):
        o = tuple(int(v) for v in np.rint(c + rng.normal(0, 0.35 * r, 2)))
        axes = tuple(int(max(1, v)) for v in np.rint(r * rng.uniform(0.4, 0.85, 2)))
        cv2.ellipse(blob, o, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    blob = cv2.GaussianBlur(blob, (0, 0), max(0.8, 0.3 * r))
    return np.clip(1.4 * blob / max(blob.max(), 1e-6), 0, 1)


def _polygon(rng: np.random.Generator, s: Surface, r: float) -> np.ndarray:
    """Anti-aliased irregular polygon coverage (H,W) in [0,1] of mean radius r."""
    c, n = _centre(rng, s), int(rng.integers(9, 15))
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 0.5, n)
    rad = r * np.clip(1 + 0.25 * rng.normal(size=n), 0.5, 1.5)
    poly = c + rad[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
    canvas = np.zeros((s.h * _SS, s.w * _SS), np.uint8)
    cv2.fillPoly(canvas, [np.rint(poly * _SS).astype(np.int32)], 255, cv2.LINE_AA)
    return cv2.resize(canvas, (s.w, s.h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _scratch(img: np.ndarray, rng: np.random.Generator, s: Surface):
    """Thin curved groove: lighter (its edge catches the light) or darker than the surface."""
    c, length, th = _centre(rng, s), rng.uniform(0.2, 0.4) * s.size, rng.uniform(0, np.pi)
    d = np.array([np.cos(th), np.sin(th)]) * length / 2
    bend = c + np.array([-d[1], d[0]]) * rng.uniform(-0.5, 0.5)
    t = np.linspace(0, 1, 32)[:, None]
    pts = (1 - t) ** 2 * (c - d) + 2 * (1 - t) * t * bend + t**2 * (c + d)
    taper = np.clip(1.8 * np.sin(np.pi * t[:, 0]), 0.2, 1)
    cover = _polyline_cover((s.h, s.w), pts, rng.uniform(1.0, 2.2) * s.size / 256, taper)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return img + sign * rng.uniform(1.5, 2.5) * s.std, cover


def _crack(img: np.ndarray, rng: np.random.Generator, s: Surface):
    """Jagged dark line with branches: the surface's own colour, much darker."""
    k, length, th = s.size / 256, rng.uniform(0.2, 0.34) * s.size, rng.uniform(0, 2 * np.pi)
    start = _centre(rng, s) - length / 2 * np.array([np.cos(th), np.sin(th)])
    main = _walk(rng, start, th, length, 4 * k)
    width = rng.uniform(1.2, 2.0) * k
    t = np.linspace(0, 1, len(main))
    cover = _polyline_cover((s.h, s.w), main, width, np.clip(2.5 * np.sin(np.pi * t), 0.3, 1))
    for _ in range(rng.integers(1, 4)):
        j = int(rng.integers(len(main) // 5, 4 * len(main) // 5))
        br = _walk(
            rng, main[j], th + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0), length / 3, 3 * k
        )
        fade = np.linspace(1, 0.3, len(br))
        cover = np.maximum(cover, _polyline_cover((s.h, s.w), br, 0.8 * width, fade))
    return np.minimum(img, s.dark) * rng.uniform(0.3, 0.6), cover


def _stain(img: np.ndarray, rng: np.random.Generator, s: Surface):
    """Liquid stain: fills the micro-structure (less texture) and tints it; tint and strength
    relative to the surface so it is neither invisible on a dark nor glaring on a bright one."""
    cover = _blob(rng, s, rng.uniform(0.04, 0.08) * s.size, (3, 7))
    smooth = 0.3 * img + 0.7 * cv2.blur(img, (5, 5))
    tint = rng.uniform(-1.0, 1.0, 3).astype(np.float32)
    tint /= np.linalg.norm(tint) + 1e-6
    return smooth + tint * rng.uniform(2.0, 3.0) * s.std, cover


def _pits(img: np.ndarray, rng: np.random.Generator, s: Surface):
    """A cluster of small pits: dark centres with a lit rim on one side."""
    cover = np.zeros((s.h, s.w), np.float32)
    rim = np.zeros((s.h, s.w), np.float32)
    c, k = _centre(rng, s), s.size / 256
    for _ in range(rng.integers(2, 7)):
        p = c + rng.normal(0, 8 * k, 2)
        r = rng.uniform(2.0, 4.5) * k
        o = tuple(int(v) for v in np.rint(p * _SS))
        big = np.zeros((s.h * _SS, s.w * _SS), np.uint8)
        cv2.circle(big, o, int(r * _SS), 255, -1, cv2.LINE_AA)
        disc = cv2.resize(big, (s.w, s.h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        cover = np.maximum(cover, disc)
        shift = np.float32([[1, 0, -0.4 * r], [0, 1, -0.4 * r]])
        rim = np.maximum(rim, np.clip(disc - cv2.warpAffine(disc, shift, (s.w, s.h)), 0, 1))
    dark = np.minimum(img, s.dark) * 0.5
    lit = np.maximum(img, s.bright)
    r3 = rim[..., None]
    return dark * (1 - r3) + lit * r3, cover


def _burn(img: np.ndarray, rng: np.random.Generator, s: Surface):
    """Heat mark: darkened, browned towards the centre, soft irregular edge."""
    cover = _blob(rng, s, rng.uniform(0.05, 0.09) * s.size, (2, 5))
    core = cover[..., None] ** 0.7
    brown = np.array([0.35, 0.5, 0.7], np.float32)  # BGR multiplier: less blue, more red
    burnt = img * (1 - 0.6 * core) * (1 - core + core * brown) + 0.0
    return burnt, cover


def _missing(img: np.ndarray, rng: np.random.Generator, s: Surface):
    """Missing material: a hole showing a flat, dark, grainy floor, with a lit broken wall."""
    cover = _polygon(rng, s, rng.uniform(0.035, 0.07) * s.size)
    floor = s.dark * 0.6 + rng.normal(0, 0.15 * s.std, (s.h, s.w, 1)).astype(np.float32)
    shift = np.float32([[1, 0, 2.5 * s.size / 256], [0, 1, 2.5 * s.size / 256]])
    wall = np.clip(cover - cv2.warpAffine(cover, shift, (s.w, s.h)), 0, 1)[..., None]
    return floor * (1 - wall) + np.maximum(img, s.bright) * wall, cover


def _warp(img: np.ndarray, rng: np.random.Generator, s: Surface):
    """Texture warp: the surface's own pixels pushed around a point (a dent, a fold, a
    misweave). The mask is where pixels moved by more than a pixel."""
    c, r = _centre(rng, s), rng.uniform(0.05, 0.09) * s.size
    y, x = np.mgrid[0 : s.h, 0 : s.w].astype(np.float32)
    dx, dy = x - c[0], y - c[1]
    fall = np.exp(-(dx**2 + dy**2) / (2 * r * r)).astype(np.float32)
    if rng.random() < 0.5:  # swirl
        a = rng.choice([-1, 1]) * rng.uniform(1.2, 2.2) * fall
        mx = c[0] + dx * np.cos(a) - dy * np.sin(a)
        my = c[1] + dx * np.sin(a) + dy * np.cos(a)
    else:  # pinch (dent)
        f = 1 - rng.uniform(0.5, 0.8) * fall
        mx, my = c[0] + dx * f, c[1] + dy * f
    moved = cv2.remap(
        img,
        mx.astype(np.float32),
        my.astype(np.float32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT,
    )
    shift = np.hypot(mx - x, my - y)
    cover = np.clip(shift - 1.0, 0, 1).astype(np.float32)
    shade = 1 + 0.15 * rng.choice([-1, 1]) * fall[..., None]  # a dent catches light differently
    return moved * shade, cover


PAINTERS: dict[str, Painter] = {
    "scratch": _scratch,
    "crack": _crack,
    "stain": _stain,
    "pits": _pits,
    "burn": _burn,
    "missing": _missing,
    "warp": _warp,
}


def paint_defect(
    image: np.ndarray, defect: str, rng: np.random.Generator, min_contrast: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Paint `defect` on a good (H,W,3) uint8 BGR image.

    Args:
        image: the good image.
        defect: a key of PAINTERS.
        rng: the image's own generator (deterministic sets).
        min_contrast: a defect whose mean change inside its mask is below this many surface
            stds is redrawn (at most 12 times): a painted defect must be visible to a person.
    Returns:
        (defective image (H,W,3) uint8, mask (H,W) uint8 0/255: exactly the changed pixels).
    Raises:
        ValueError: unknown defect or not an (H,W,3) image of at least 32 px.
    """
    painter = _lookup(PAINTERS, defect, "defect")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 32:
        raise ValueError(f"expected an (H, W, 3) image of at least 32 px, got {image.shape}")
    img = image.astype(np.float32)
    s = Surface(img)
    ylo, yhi = (int(f * s.h) for f in _SAFE)
    xlo, xhi = (int(f * s.w) for f in _SAFE)
    out, mask = img, np.zeros(img.shape[:2], bool)
    for _ in range(12):
        painted, cover = painter(img, rng, s)
        cover = np.clip((cover - _CUT) / (1 - _CUT), 0, 1)
        a = cover[..., None]
        out = np.where(a > 0, img * (1 - a) + painted * a, img)
        mask = cover > 0
        ys, xs = np.nonzero(mask)
        if not mask.any() or ys.min() < ylo or xs.min() < xlo or ys.max() >= yhi or xs.max() >= xhi:
            continue
        change = np.abs(np.clip(out, 0, 255) - img)[mask].max(axis=1).mean()
        if change >= min_contrast * s.std:
            break
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), np.where(mask, 255, 0).astype(np.uint8)
