"""New tasks for adapting the digits teacher, from images that scikit-image ships.

`faces`: scikit-image's `lfw_subset` (100 faces, 100 non-face crops, 25x25), two classes,
a stratified 70/10/20 train/validation/held-out split. `photos`: 32x32 patches of scikit-image's
grayscale sample photos, one class; validation and held-out patches come from photos never used
for training (named below), so they measure generalisation to new pictures, not to new crops of
seen ones. Validation picks hyper-parameters; held-out is reported.
Everything is resized to the teacher's 16x16 and scaled to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .digits import IMAGE_SIZE

PHOTOS_TRAIN = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "clock", "cell")
PHOTOS_VALIDATION = ("chelsea",)
PHOTOS_HELDOUT = ("astronaut", "coffee")
PATCH = 32


@dataclass(frozen=True)
class TaskData:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    train_images: torch.Tensor  # (N, 1, 16, 16) in [-1, 1]
    train_labels: torch.Tensor
    validation_images: torch.Tensor
    validation_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    source: str


def _resize(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, dtype=np.float32)).unsqueeze(1)
    t = F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return t.clamp(0, 1) * 2 - 1


def faces() -> TaskData:
    from sklearn.model_selection import train_test_split
    from skimage.data import lfw_subset

    images = lfw_subset()  # (200, 25, 25) in [0, 1]; the first 100 are faces
    labels = np.repeat([0, 1], 100)
    rest, ho = train_test_split(np.arange(200), test_size=0.2, stratify=labels, random_state=0)
    tr, va = train_test_split(rest, test_size=20, stratify=labels[rest], random_state=0)
    x = _resize(images)
    y = torch.from_numpy(labels).long()
    return TaskData("faces", 2, ("face", "non-face"), x[tr], y[tr], x[va], y[va], x[ho], y[ho],
                    "skimage.data.lfw_subset, stratified: 140 train, 20 validation, 40 held out")


def gray_photo(name: str) -> np.ndarray:
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    img = img_as_float(getattr(skimage.data, name)())
    return rgb2gray(img[..., :3]) if img.ndim == 3 else img


def _patches(names: tuple[str, ...], per_photo: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    crops = []
    for name in names:
        img = gray_photo(name)
        ys = rng.integers(0, img.shape[0] - PATCH + 1, per_photo)
        xs = rng.integers(0, img.shape[1] - PATCH + 1, per_photo)
        crops += [img[y:y + PATCH, x:x + PATCH] for y, x in zip(ys, xs)]
    return _resize(np.stack(crops))


def photos(per_photo: int = 64) -> TaskData:
    train = _patches(PHOTOS_TRAIN, per_photo, seed=0)
    val = _patches(PHOTOS_VALIDATION, per_photo // 2, seed=1)
    held = _patches(PHOTOS_HELDOUT, per_photo // 2, seed=2)

    def zeros(x):
        return torch.zeros(len(x), dtype=torch.long)

    return TaskData("photos", 1, ("photo patch",), train, zeros(train), val, zeros(val), held, zeros(held),
                    f"{PATCH}x{PATCH} patches of skimage.data photos: train {', '.join(PHOTOS_TRAIN)} "
                    f"({len(train)}); validation {', '.join(PHOTOS_VALIDATION)} ({len(val)}); "
                    f"held out {', '.join(PHOTOS_HELDOUT)} ({len(held)})")


TASKS = {"faces": faces, "photos": photos}


def load_task(name: str) -> TaskData:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]()
