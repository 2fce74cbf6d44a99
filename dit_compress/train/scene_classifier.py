"""Train the digit-scene classifier the adherence evaluator reads digits with (`ditc zoo-train`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.scenes import CROP, HELDOUT_PROMPTS, all_scenes, digit_crops, render_captions, render_scenes
from ..models.scene_classifier import FEATURE_DIM, SceneClassifier
from .schedule import lr_factor


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


@torch.no_grad()
def _accuracy(model: SceneClassifier, images: np.ndarray, digits: list[int]) -> float:
    return (model(digit_crops(images)).argmax(1) == torch.tensor(digits)).float().mean().item()


def train_scene_classifier(out: Path, seed: int = 0, scenes: int = 20000, epochs: int = 6, batch: int = 128,
                           lr: float = 3e-3) -> dict:
    """Seeded training on renders of training digit images over every attribute combination (the
    evaluator must judge compositions the teacher never saw); accuracy on held-out renders. About a
    minute on one CPU core."""
    start = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pool = all_scenes()
    train = [pool[i] for i in np.random.default_rng(seed).integers(0, len(pool), scenes)]
    x_all, y_all = digit_crops(render_scenes(train, "train", seed)), torch.tensor([s.digit for s in train])
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (scenes // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup_steps=steps // 10))
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
    accuracy = _accuracy(model, render_scenes(held, "heldout", seed + 1), [s.digit for s in held])
    captions, digits = [c for _, c in HELDOUT_PROMPTS], [s.digit for s, _ in HELDOUT_PROMPTS]
    prompt_accuracy = np.mean([_accuracy(model, render_captions(captions, seed=k), digits) for k in range(5)])
    meta = {"heldout_accuracy": round(accuracy, 4), "heldout_size": len(held),
            "heldout_prompt_accuracy": round(float(prompt_accuracy), 4), "heldout_prompt_renders": 5 * len(captions),
            "train_scenes": scenes, "epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
            "train_seconds": round(time.time() - start, 1),
            "input": f"3x{CROP}x{CROP} background-relative crop around the foreground of a uint8 RGB 32x32 scene",
            "feature": f"{FEATURE_DIM}-d penultimate ReLU features"}
    model.save(out, meta)
    return meta
