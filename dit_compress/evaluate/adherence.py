"""Prompt adherence for digit scenes, a GenEval for `data/scenes.py`: is each attribute of the prompt in the image?

Every attribute but the digit is measured from pixels: the background is the nearest palette background
to the canvas border, the foreground is what lies far from it, its centroid gives the position, its
bounding box the size, and the palette colour whose blend with the background best explains its pixels
is the digit colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.scenes import BACKGROUNDS, CANVAS, COLOURS, SIZES

ATTRIBUTES = ("digit", "size", "colour", "position", "background")
_COLOUR_NAMES, _COLOUR_RGB = list(COLOURS), np.array(list(COLOURS.values()), dtype=np.float64)
_BACKGROUND_NAMES, _BACKGROUND_RGB = list(BACKGROUNDS), np.array(list(BACKGROUNDS.values()), dtype=np.float64)
# A pixel is foreground once it is half-way from the background to the nearest digit colour.
FOREGROUND_DISTANCE = 0.5 * min(np.linalg.norm(c - b) for c in _COLOUR_RGB for b in _BACKGROUND_RGB)
# Sizes: the larger side of the foreground's bounding box is at most the small box's side for a small
# digit and at least 2/3 of the large box's side for a large one; the threshold lies half-way.
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"] * 2 / 3) / 2
# Positions: a centroid within half the large corner boxes' offset from the canvas centre is the centre,
# anything further out is the corner of its quadrant.
CENTRE_RADIUS = (CANVAS - SIZES["large"]) / 4


@dataclass(frozen=True)
class Measured:
    """Pixel-measured attributes of one image; None where there is no foreground to measure."""
    size: str | None
    colour: str | None
    position: str | None
    background: str


def _nearest(rgb: np.ndarray, names: list[str], palette: np.ndarray) -> str:
    return names[int(np.linalg.norm(palette - rgb, axis=1).argmin())]


def _blend_residuals(pixels: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Mean distance of background-relative pixels (P, 3) from each colour's blend line (C, 3) -> (C,).

    Thin or small strokes are only partly inked: a pixel is background + alpha * (colour - background),
    so the digit colour is the one whose line from the background passes closest to the pixels (a
    plain nearest colour would call half-inked yellow on black red)."""
    alpha = np.clip(pixels @ directions.T / (directions ** 2).sum(1), 0, 1)  # (P, C)
    fitted = alpha[..., None] * directions[None]  # (P, C, 3)
    return np.linalg.norm(pixels[:, None] - fitted, axis=-1).mean(0)


def background_rgb(image: np.ndarray) -> np.ndarray:
    """Median colour of the canvas border: a corner digit touches at most a quarter of it."""
    img = np.asarray(image, dtype=np.float64)
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return np.median(ring, axis=0)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels at least FOREGROUND_DISTANCE from the background colour."""
    img = np.asarray(image, dtype=np.float64)
    return np.linalg.norm(img - background_rgb(img), axis=-1) >= FOREGROUND_DISTANCE


def measure(image: np.ndarray) -> Measured:
    """Size, digit colour, position and background of one (32, 32, 3) uint8 image."""
    img = np.asarray(image, dtype=np.float64)
    bg = background_rgb(img)
    background = _nearest(bg, _BACKGROUND_NAMES, _BACKGROUND_RGB)
    distance = np.linalg.norm(img - bg, axis=-1)
    mask = distance >= FOREGROUND_DISTANCE
    if not mask.any():
        return Measured(None, None, None, background)
    rows, cols = np.nonzero(mask)
    side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    size = "large" if side > SIZE_THRESHOLD else "small"
    colour = _COLOUR_NAMES[int(_blend_residuals(img[mask] - bg, _COLOUR_RGB - bg).argmin())]
    dy, dx = rows.mean() - (CANVAS - 1) / 2, cols.mean() - (CANVAS - 1) / 2
    if max(abs(dy), abs(dx)) < CENTRE_RADIUS:
        position = "centre"
    else:
        position = ("top" if dy < 0 else "bottom") + " " + ("left" if dx < 0 else "right")
    return Measured(size, colour, position, background)
