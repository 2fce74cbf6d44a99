"""A small digit classifier; its penultimate features feed the Fréchet distance."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

FEATURE_DIM = 64


class StoredClassifier(nn.Module):
    """A bundled evaluator network: safetensors weights + a config.json of facts, in one folder."""

    what = "classifier"

    def save(self, folder: Path, meta: dict) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path):
        weights = Path(folder) / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{cls.what} weights missing: {weights} (retrain with `ditc zoo-train`)")
        model = cls()
        model.load_state_dict(load_file(str(weights)))
        return model.eval()


class DigitClassifier(StoredClassifier):
    """Conv net for 1x16x16 digits in [-1, 1]; `features` is the 64-d penultimate activation."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

