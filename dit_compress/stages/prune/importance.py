"""Block importance from hidden-state similarity on calibration data."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...data.calibration import CalibrationSet
from ...models.families import FamilyAdapter
from ...train.distill import image_hidden


@torch.no_grad()
def block_influence(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet,
                    batches: int = 4, batch_size: int = 64) -> list[float]:
    """Block Influence (ShortGPT): 1 - mean token cosine(input, output) of each block's image
    stream. A block whose output is nearly its input changes little and goes first."""
    blocks = [b for _, _, b in adapter.blocks(model)]
    sums = torch.zeros(len(blocks))
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def post(i):
        def hook(_m, _args, _kwargs, output):
            h_in, h_out = inputs.pop(i), image_hidden(output)
            sums[i] += (1 - torch.cosine_similarity(h_in, h_out, dim=-1)).mean().item()
        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for k in range(batches):
            b = calib.batch(10_000_000 + k, batch_size)  # indices disjoint from training batches
            adapter.denoise(model, b.x_t, b.t, b.cond)
            count += 1
    finally:
        for h in handles:
            h.remove()
    return (sums / count).tolist()
