"""scikit-learn's 8x8 digits, upsampled to 16x16 and scaled to [-1, 1]: the bundled teacher's data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    images: torch.Tensor  # (N, 1, 16, 16) in [-1, 1]
    labels: torch.Tensor  # (N,) int64


def _to_images(flat: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(flat.astype(np.float32)).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


def load_digits_split(split: str) -> DigitsSplit:
    """`train` or `heldout`: a fixed, stratified 80/20 split shared by every script and metric."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    data = load_digits()
    idx_train, idx_held = train_test_split(
        np.arange(len(data.target)), test_size=HELD_OUT_FRACTION,
        stratify=data.target, random_state=SPLIT_SEED,
    )
    idx = idx_train if split == "train" else idx_held
    return DigitsSplit(_to_images(data.data[idx]), torch.from_numpy(data.target[idx]).long())
