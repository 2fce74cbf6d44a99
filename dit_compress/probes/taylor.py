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
                stream: str) -> Iterator[torch.Tensor]:
    """The task loss on the first `batches` calibration batches of the named stream (teacher
    samples noised at random timesteps). The caller backpropagates each."""
    first = calib.stream(stream)
    for k in range(batches):
        b = calib.batch(first + k, batch_size)
        yield torch.mean((adapter.denoise(model, b.x_t, b.t, b.cond) - b.target) ** 2)
