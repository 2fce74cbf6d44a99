"""The digit-scene classifier: which digit a scene shows, read from its digit crop
(`data.scenes.digit_crops`, 3x16x16, background-relative); its penultimate features feed the scene
Fréchet distance. Trained by `train/scene_classifier.py`."""

from __future__ import annotations

import torch
import torch.nn as nn

from .classifier import StoredClassifier

FEATURE_DIM = 64


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SceneClassifier(StoredClassifier):
    """Conv net over (N, 3, 16, 16) digit crops; `features` is the 64-d penultimate activation."""

    what = "scene classifier"

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            *_conv(3, 32, 1), *_conv(32, 64, 2), *_conv(64, 64, 2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

