"""The flow-matching task loss on seeded calibration draws, whose gradients score importance.

A copy of the teacher matches the teacher exactly, so a distillation loss would have zero
gradient; the task loss on teacher-generated x0 (v = noise - x0) is what the teacher was
trained on. Width pruning's Taylor importance and MoE's neuron split both backpropagate it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from ..data.calibration import CalibrationSet
from ..models.families import FamilyAdapter


def task_losses(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, batches: int, batch_size: int,
                first_seed: int) -> Iterator[torch.Tensor]:
    """The task loss of `batches` draws of `batch_size` teacher samples, noised at random
    timesteps; draw k is seeded `first_seed + k`. The caller backpropagates each."""
    for k in range(batches):
        g = torch.Generator().manual_seed(first_seed + k)
        idx = torch.randint(0, len(calib), (batch_size,), generator=g)
        x0 = calib.x0[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = calib.schedule.draw_timesteps(batch_size, g)
        cond = {key: v[idx] for key, v in calib.cond.items()}
        pred = adapter.denoise(model, calib.schedule.add_noise(x0, noise, t), t, cond)
        yield torch.mean((pred - calib.schedule.target(x0, noise)) ** 2)
