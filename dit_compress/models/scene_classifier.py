"""The digit-scene classifier: which digit a 32x32 RGB scene shows, wherever, however large and in
whatever colours; its penultimate features feed the scene Fréchet distance."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

FEATURE_DIM = 64
CROP = 16


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 scenes (N, 32, 32, 3) -> the classifier's input (N, 3, 16, 16): each scene minus its
    background colour, cropped to the square around its foreground's bounding box and resized, so that
    the digit's shape no longer depends on where it is, how large, or what it is drawn on. A scene
    without foreground is taken whole."""
    from ..evaluate.adherence import background_rgb, foreground_mask

    crops = []
    for image in images:
        relative = torch.from_numpy((image.astype(np.float32) - background_rgb(image).astype(np.float32)) / 127.5)
        relative = relative.permute(2, 0, 1)
        rows, cols = np.nonzero(foreground_mask(image))
        if len(rows):
            side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            top = (rows.max() + rows.min() + 1 - side) // 2
            left = (cols.max() + cols.min() + 1 - side) // 2
            # Pad with zeros (the background) where the square runs off the canvas.
            padded = F.pad(relative, (side, side, side, side))
            relative = padded[:, top + side:top + 2 * side, left + side:left + 2 * side]
        crops.append(F.interpolate(relative[None], size=(CROP, CROP), mode="bilinear", antialias=True,
                                   align_corners=False)[0])
    return torch.stack(crops) if crops else torch.zeros(0, 3, CROP, CROP)


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SceneClassifier(nn.Module):
    """Conv net over a scene's digit crop (`to_input`); `features` is the 64-d penultimate activation."""

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

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """Digits (N,) and float64 features (N, 64) of uint8 scenes (N, 32, 32, 3)."""
        labels, feats = [], []
        for i in range(0, len(images), batch_size):
            f = self.features(to_input(images[i:i + batch_size]))
            labels.append(self.head(f).argmax(1).numpy())
            feats.append(f.numpy().astype(np.float64))
        return np.concatenate(labels), np.concatenate(feats)

    def save(self, folder: Path, meta: dict) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "SceneClassifier":
        weights = Path(folder) / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"scene classifier weights missing: {weights} (retrain with `ditc zoo-train`)")
        model = cls()
        model.load_state_dict(load_file(str(weights)))
        return model.eval()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generated scenes are blurrier, noisier, off-palette and less tightly cropped than renders: shift
    the crop by up to a pixel, blur a little, jitter each channel's gain and offset, add noise."""
    n = len(x)
    dy, dx = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = F.pad(x, (1, 1, 1, 1))[:, :, 1 + dy:1 + dy + CROP, 1 + dx:1 + dx + CROP]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.lerp(x, blur, 0.25 * torch.rand(n, 1, 1, 1, generator=g))
    x = x * (1 + 0.3 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)) + 0.2 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    return x + 0.1 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)


def train_scene_classifier(out: Path, seed: int = 0, scenes: int = 20000, epochs: int = 6,
                           batch: int = 128) -> dict:
    """Seeded training on renders of training digit images over every attribute combination (the
    evaluator must judge compositions the teacher never saw); held-out accuracy on held-out renders."""
    from ..data.scenes import HELDOUT_PROMPTS, all_scenes, render_captions, render_scenes

    start = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = all_scenes()
    train = [pool[i] for i in rng.integers(0, len(pool), scenes)]
    x_all = to_input(render_scenes(train, "train", seed))
    y_all = torch.tensor([s.digit for s in train])
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (scenes // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(scenes, generator=g)
        for i in range(scenes // batch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(_augment(x_all[idx], g)), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    held = [s for s in pool for _ in range(2)]  # every combination twice, held-out digit images
    held_labels = np.array([s.digit for s in held])
    accuracy = float((model.predict(render_scenes(held, "heldout", seed + 1))[0] == held_labels).mean())
    captions = [c for _, c in HELDOUT_PROMPTS]
    prompt_labels = np.array([s.digit for s, _ in HELDOUT_PROMPTS])
    prompt_accuracy = float(np.mean([(model.predict(render_captions(captions, seed=k))[0] == prompt_labels).mean()
                                     for k in range(5)]))
    meta = {"heldout_accuracy": round(accuracy, 4), "heldout_size": len(held),
            "heldout_prompt_accuracy": round(prompt_accuracy, 4), "heldout_prompt_renders": 5 * len(captions),
            "train_scenes": scenes, "epochs": epochs, "batch": batch, "seed": seed,
            "train_seconds": round(time.time() - start, 1),
            "input": "3x16x16 background-relative crop around the foreground of a uint8 RGB 32x32 scene",
            "feature": f"{FEATURE_DIM}-d penultimate ReLU features"}
    model.save(out, meta)
    return meta
