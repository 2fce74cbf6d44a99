"""Prompt adherence for digit scenes, a GenEval for `data/scenes.py`: is each attribute of the prompt in the image?

    >>> report = evaluate_adherence(generate)   # generate(prompts: list[str], seed: int) -> uint8 [N, 32, 32, 3]
    >>> report["all"]                           # {"mean": ..., "stderr": ...} over seeds

The digit is read by the bundled scene classifier (`zoo/scenes-classifier`); every other attribute is
measured from pixels: the background is the nearest palette background to the canvas border, the
foreground is what lies far from it, its centroid gives the position, its bounding box the size, and the
palette colour whose blend with the background best explains its pixels is the digit colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data.scenes import BACKGROUNDS, CANVAS, COLOURS, HELDOUT_PROMPTS, SIZES, Scene, render_captions
from ..models.load import ZOO_DIR
from ..models.scene_classifier import SceneClassifier
from .metrics import frechet_distance, psnr_ssim

ATTRIBUTES = ("digit", "size", "colour", "position", "background")
REAL_SEED = 10_000  # seeds of the real renders FD compares with, apart from any generation seed
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


def _drop_isolated(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with no foreground among their 8 neighbours are noise, not strokes: one such
    pixel would stretch the bounding box across the canvas."""
    padded = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    neighbours = sum(padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    return mask & (neighbours > 0)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels at least FOREGROUND_DISTANCE from the background colour, isolated ones dropped."""
    img = np.asarray(image, dtype=np.float64)
    return _drop_isolated(np.linalg.norm(img - background_rgb(img), axis=-1) >= FOREGROUND_DISTANCE)


def measure(image: np.ndarray) -> Measured:
    """Size, digit colour, position and background of one (32, 32, 3) uint8 image."""
    img = np.asarray(image, dtype=np.float64)
    bg = background_rgb(img)
    background = _nearest(bg, _BACKGROUND_NAMES, _BACKGROUND_RGB)
    mask = foreground_mask(img)
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


def scene_psnr_ssim(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of two uint8 batches (N, 32, 32, 3), e.g. teacher and student images
    generated from identical noise."""
    return psnr_ssim(_to_signed(reference), _to_signed(test))


def _to_signed(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _spread(values: list[float]) -> dict:
    """Mean and standard error over seeds (the error is None for a single seed)."""
    v = np.asarray(values, dtype=np.float64)
    stderr = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": round(float(v.mean()), 4), "stderr": None if stderr is None else round(stderr, 4)}


def attribute_hits(scenes: list[Scene], images: np.ndarray, classifier: SceneClassifier) -> dict[str, np.ndarray]:
    """Per attribute, a bool per image: does the image show what its scene asks for?"""
    digits, _ = classifier.predict(images)
    measured = [measure(image) for image in images]
    hits = {"digit": digits == np.array([s.digit for s in scenes])}
    for attribute in ATTRIBUTES[1:]:
        hits[attribute] = np.array([getattr(m, attribute) == getattr(s, attribute) for m, s in zip(measured, scenes)])
    hits["all"] = np.logical_and.reduce([hits[a] for a in ATTRIBUTES])
    return hits


GenerateFn = Callable[[list[str], int], np.ndarray]


def evaluate_adherence(generate: GenerateFn, seeds: tuple[int, ...] = (0, 1, 2),
                       prompts: tuple[tuple[Scene, str], ...] = HELDOUT_PROMPTS,
                       classifier: SceneClassifier | None = None, reference: GenerateFn | None = None,
                       real_draws: int = 10) -> dict:
    """Prompt adherence of `generate(prompts, seed) -> uint8 [N, 32, 32, 3]` on the held-out prompts.

    Per seed: each attribute's accuracy, the fraction with every attribute right (overall and on the
    pairings training never shows), the Fréchet distance of the classifier's features to `real_draws`
    real renders of each prompt, and — given a `reference` pipeline (the teacher) called with the same
    seed, hence the same noise — PSNR/SSIM against it. Reported as mean and standard error over seeds.
    FD from 100 images is biased upwards: compare it only at equal prompt counts, against `fd_real`,
    the FD of a fresh real draw of the prompts."""
    classifier = classifier or SceneClassifier.load(ZOO_DIR / "scenes-classifier")
    scenes, captions = [s for s, _ in prompts], [c for _, c in prompts]
    novel = np.array([s.heldout_only for s in scenes])
    real = np.concatenate([render_captions(captions, seed=REAL_SEED + k) for k in range(real_draws)])
    real_features = classifier.predict(real)[1]
    _, fresh_features = classifier.predict(render_captions(captions, seed=REAL_SEED + real_draws))
    per_seed = []
    for seed in seeds:
        images = np.asarray(generate(captions, seed))
        if images.shape != (len(captions), CANVAS, CANVAS, 3) or images.dtype != np.uint8:
            raise ValueError(f"generate must return uint8 images of shape {(len(captions), CANVAS, CANVAS, 3)}, "
                             f"got {images.dtype} {images.shape}")
        hits = attribute_hits(scenes, images, classifier)
        row = {"seed": seed, **{a: float(hits[a].mean()) for a in (*ATTRIBUTES, "all")},
               "all_novel_pairs": float(hits["all"][novel].mean()) if novel.any() else None,
               "fd": frechet_distance(classifier.predict(images)[1], real_features)}
        if reference is not None:
            row["psnr"], row["ssim"] = scene_psnr_ssim(np.asarray(reference(captions, seed)), images)
        per_seed.append(row)
    metrics = [k for k in per_seed[0] if k != "seed" and per_seed[0][k] is not None]
    return {"prompts": len(prompts), "novel_pair_prompts": int(novel.sum()), "seeds": list(seeds),
            **{k: _spread([row[k] for row in per_seed]) for k in metrics},
            "fd_real": round(frechet_distance(fresh_features, real_features), 4),
            "per_seed": per_seed}
