"""Digit scenes: captioned RGB 32x32 canvases of one coloured scikit-learn digit, for text-to-image teachers.

A scene places one digit at one of five positions, in one of two sizes, in one of four colours on one
of three backgrounds. Each attribute is chosen so that it can be measured from pixels alone
(`evaluate/adherence.py`): positions by the foreground's centroid, sizes by its bounding box, colours by
the nearest palette entry. Captions come from a few templates over a closed vocabulary, so a tokenizer
can be built from `VOCABULARY` and every caption parses back to its scene.

Compositional split (as GenEval tests it): each digit colour has one position it never takes in
training, `HELDOUT_ONLY` — red at the top left, green at the top right, blue at the bottom left and
yellow at the bottom right. Every colour and every position is still seen in training, only these
pairings are new. Held-out scenes also draw their digit images from the held-out digit images.

    >>> data = scene_split("train", n=1000, seed=0)      # scenes, uint8 images [N, 32, 32, 3], captions
    >>> images = render_captions(["a large blue three at the centre on a black background"], seed=0)

Everything is a pure function of its seed: the same seed gives byte-identical arrays.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .digits import load_digits_split

CANVAS = 32
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Side of the square the digit is drawn in: small digits at scikit-learn's own 8x8, large ones twice
# that. A digit's ink spans at least 2/3 of its box, so their bounding boxes never overlap.
SIZES = {"small": 8, "large": 16}
# Corner boxes touch the canvas edge, which puts large corner digits as far from the centre as they go.
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
# Saturated digit colours and neutral backgrounds: any two of these colours, digit or background, are
# at least 160 apart in RGB, so every pair contrasts and the nearest palette colour is unambiguous.
COLOURS = {"red": (230, 25, 25), "green": (25, 200, 25), "blue": (30, 60, 240), "yellow": (245, 220, 20)}
BACKGROUNDS = {"black": (0, 0, 0), "grey": (128, 128, 128), "white": (255, 255, 255)}
# (colour, position) pairs seen only in held-out prompts.
HELDOUT_ONLY = frozenset({("red", "top left"), ("green", "top right"),
                          ("blue", "bottom left"), ("yellow", "bottom right")})

TEMPLATES = (
    "a {size} {colour} {digit} at the {position} on a {background} background",
    "a {background} background with a {size} {colour} {digit} at the {position}",
    "the digit {digit} drawn {size} in {colour} at the {position} on {background}",
    "{size} {colour} {digit} {position} {background} background",
)
HELDOUT_PROMPT_COUNT = 100
HELDOUT_PROMPT_SEED = 2024


@dataclass(frozen=True)
class Scene:
    digit: int
    size: str
    colour: str
    position: str
    background: str

    def __post_init__(self):
        if self.digit not in range(10) or self.size not in SIZES or self.colour not in COLOURS \
                or self.position not in POSITIONS or self.background not in BACKGROUNDS:
            raise ValueError(f"not a digit scene: {self}")

    @property
    def heldout_only(self) -> bool:
        return (self.colour, self.position) in HELDOUT_ONLY


@dataclass(frozen=True)
class SceneSplit:
    scenes: list[Scene]
    images: np.ndarray  # (N, 32, 32, 3) uint8
    captions: list[str]


def all_scenes() -> list[Scene]:
    """Every attribute combination (1200), in a fixed order."""
    return [Scene(d, s, c, p, b) for d, s, c, p, b
            in itertools.product(range(10), SIZES, COLOURS, POSITIONS, BACKGROUNDS)]


def caption(scene: Scene, template: int = 0) -> str:
    return TEMPLATES[template].format(size=scene.size, colour=scene.colour, digit=DIGIT_NAMES[scene.digit],
                                      position=scene.position, background=scene.background)


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in words)


@lru_cache(maxsize=None)
def _caption_patterns() -> tuple[re.Pattern, ...]:
    groups = {"size": _alternatives(SIZES), "colour": _alternatives(COLOURS), "digit": _alternatives(DIGIT_NAMES),
              "position": _alternatives(POSITIONS), "background": _alternatives(BACKGROUNDS)}
    return tuple(re.compile("^" + re.escape(t).replace(r"\{", "{").replace(r"\}", "}").format(
        **{k: f"(?P<{k}>{v})" for k, v in groups.items()}) + "$") for t in TEMPLATES)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; ValueError for text no template produces."""
    for pattern in _caption_patterns():
        m = pattern.match(" ".join(text.lower().split()))
        if m:
            return Scene(DIGIT_NAMES.index(m["digit"]), m["size"], m["colour"], m["position"], m["background"])
    raise ValueError(f"not a digit-scene caption: {text!r}")


def _vocabulary() -> tuple[str, ...]:
    words = set()
    for template in TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    for values in (SIZES, COLOURS, DIGIT_NAMES, POSITIONS, BACKGROUNDS):
        for value in values:
            words.update(value.split())
    return tuple(sorted(words))


VOCABULARY = _vocabulary()  # every word any caption can contain


def box_origin(position: str, size: str) -> tuple[int, int]:
    """(row, column) of the top-left corner of the digit's box."""
    side = SIZES[size]
    if position == "centre":
        return (CANVAS - side) // 2, (CANVAS - side) // 2
    vertical, horizontal = position.split()
    row = 0 if vertical == "top" else CANVAS - side
    col = 0 if horizontal == "left" else CANVAS - side
    return row, col


def render(scene: Scene, digit_image: np.ndarray) -> np.ndarray:
    """The scene as a (32, 32, 3) uint8 canvas; `digit_image` is a 2-D ink map in [0, 1] (ink = 1).

    The ink map, resized to the digit's box, is the alpha with which the digit colour covers the
    background."""
    side = SIZES[scene.size]
    ink = torch.as_tensor(np.asarray(digit_image, dtype=np.float32))[None, None]
    alpha = F.interpolate(ink, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    alpha = alpha[0, 0].clamp(0, 1).numpy()[..., None].astype(np.float64)
    canvas = np.empty((CANVAS, CANVAS, 3), dtype=np.float64)
    canvas[:] = BACKGROUNDS[scene.background]
    row, col = box_origin(scene.position, scene.size)
    box = canvas[row:row + side, col:col + side]
    box[:] = box * (1 - alpha) + np.asarray(COLOURS[scene.colour], dtype=np.float64) * alpha
    return np.rint(canvas).astype(np.uint8)


@lru_cache(maxsize=2)
def _digit_inks(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The project's digit split (`data/digits.py`) as ink maps in [0, 1], with labels."""
    data = load_digits_split(split)
    return ((data.images[:, 0].numpy() + 1) / 2).clip(0, 1), data.labels.numpy()


def render_scenes(scenes: list[Scene], split: str, seed: int = 0) -> np.ndarray:
    """Renders of given scenes, with digit images of `split` drawn by `seed`."""
    return _render_all(scenes, split, np.random.default_rng([seed, 3]))


def _render_all(scenes: list[Scene], split: str, rng: np.random.Generator) -> np.ndarray:
    inks, labels = _digit_inks(split)
    by_label = [np.flatnonzero(labels == d) for d in range(10)]
    images = np.empty((len(scenes), CANVAS, CANVAS, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene, inks[rng.choice(by_label[scene.digit])])
    return images


def scene_split(split: str, n: int, seed: int = 0) -> SceneSplit:
    """`n` random scenes with images and captions (random templates).

    `train` scenes avoid the `HELDOUT_ONLY` pairings and use training digit images; `heldout` scenes
    range over every combination and use held-out digit images."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    pool = [s for s in all_scenes() if split == "heldout" or not s.heldout_only]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    scenes = [pool[i] for i in rng.integers(0, len(pool), n)]
    captions = [caption(s, int(t)) for s, t in zip(scenes, rng.integers(0, len(TEMPLATES), n))]
    return SceneSplit(scenes, _render_all(scenes, split, rng), captions)


def render_captions(captions: list[str], seed: int = 0, split: str = "heldout") -> np.ndarray:
    """Real renders of captions, with digit images of `split` drawn by `seed`: a perfect `generate`."""
    rng = np.random.default_rng([seed, 2])
    return _render_all([parse_caption(c) for c in captions], split, rng)


def _heldout_prompts() -> tuple[tuple[Scene, str], ...]:
    """A fixed prompt set with balanced marginals: each digit 10 times, each size 50, each
    (colour, position) pair 5 times (so 20 prompts pair them in ways training never shows), each
    background and template about equally often; the attributes are shuffled independently."""
    rng = np.random.default_rng(HELDOUT_PROMPT_SEED)
    n = HELDOUT_PROMPT_COUNT

    def balanced(values):
        values = list(values)
        return [values[i] for i in rng.permutation(np.arange(n) % len(values))]

    digits, sizes = balanced(range(10)), balanced(SIZES)
    pairs = balanced(itertools.product(COLOURS, POSITIONS))
    backgrounds, templates = balanced(BACKGROUNDS), balanced(range(len(TEMPLATES)))
    scenes = [Scene(d, s, c, p, b) for d, s, (c, p), b in zip(digits, sizes, pairs, backgrounds)]
    return tuple((s, caption(s, t)) for s, t in zip(scenes, templates))


HELDOUT_PROMPTS = _heldout_prompts()
