"""Rate-distortion training of the DiT codec on patches of scikit-image's photos.

Loss = MSE (pixels in [0, 1]) + lambda * bits per pixel + align_weight * cosine-hinge alignment.
Rates are the differentiable estimates (uniform noise); the files the trained codec writes are
measured from their real size. The DiT decoder starts from the teacher and trains at a tenth
of the learning rate of the new transforms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data.tasks import PHOTOS_TRAIN, gray_photo
from .model import DiTCodec


@dataclass
class CodecTrainConfig:
    lam: float
    steps: int = 2000
    batch_size: int = 8
    patch: int = 64
    lr: float = 1e-3
    dit_lr_factor: float = 0.1
    align_weight: float = 0.1
    channels: int = 64
    seed: int = 0
    photos: tuple[str, ...] = field(default_factory=lambda: PHOTOS_TRAIN)


def photo(name: str) -> torch.Tensor:
    """A whole scikit-image photo as (1, H, W) grayscale in [-1, 1]."""
    return torch.from_numpy(gray_photo(name).astype(np.float32)).unsqueeze(0) * 2 - 1


def random_patches(photos: list[torch.Tensor], n: int, size: int, g: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=g))]
        y = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(img.shape[2] - size + 1, (1,), generator=g))
        patch = img[:, y:y + size, x:x + size]
        out.append(patch.flip(-1) if torch.rand(1, generator=g) < 0.5 else patch)
    return torch.stack(out)


def train_codec(dit: nn.Module, config: CodecTrainConfig, progress: bool = True) -> tuple[DiTCodec, dict]:
    torch.manual_seed(config.seed)
    codec = DiTCodec(dit, channels=config.channels)
    dit_params = list(codec.dit.parameters())
    dit_ids = {id(p) for p in dit_params}
    new_params = [p for p in codec.parameters() if id(p) not in dit_ids]
    for p in codec.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": new_params, "lr": config.lr},
                            {"params": dit_params, "lr": config.lr * config.dit_lr_factor}])
    photos = [photo(n) for n in config.photos]
    g = torch.Generator().manual_seed(config.seed)
    history, t0 = [], time.time()
    codec.train()
    for step in tqdm(range(config.steps), desc=f"codec lambda={config.lam:g}", disable=not progress, mininterval=2.0):
        scale = 0.1 if step >= int(0.8 * config.steps) else 1.0  # a final low-rate phase, as RD training does
        for group, base in zip(opt.param_groups, (config.lr, config.lr * config.dit_lr_factor)):
            group["lr"] = base * scale
        x = random_patches(photos, config.batch_size, config.patch, g)
        out = codec(x)
        mse = torch.mean((out["x_hat"] - x) ** 2) / 4  # pixels in [0, 1]
        align = codec.alignment_loss(out["x_hat"], out["y"])
        loss = mse + config.lam * out["bpp"] + config.align_weight * align
        if not torch.isfinite(loss):
            raise FloatingPointError(f"codec training diverged at step {step} (lambda={config.lam})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == config.steps - 1:
            history.append({"step": step, "mse": round(mse.item(), 6), "bpp": round(out["bpp"].item(), 4),
                            "align": round(align.item(), 4)})
    codec.eval().requires_grad_(False)
    return codec, {"seconds": round(time.time() - t0, 1), "history": history}
