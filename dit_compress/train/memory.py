"""Training memory, counted rather than sampled: weights + gradients + AdamW's two moments +
the activations autograd keeps for backward. These are what differ between training all
weights and training an adapter; the allocator's own overhead is left out on purpose."""

from __future__ import annotations

import torch
import torch.nn as nn

MB = 1024 * 1024


def saved_activation_bytes(model: nn.Module, fn) -> tuple[int, object]:
    """Bytes of the tensors autograd saves for backward while `fn()` runs, weights excluded and each
    storage counted once. All of them stay alive until backward, so this is the forward's peak."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in weights:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


def training_memory(model: nn.Module, activation_bytes: int) -> dict:
    """MB of one AdamW training step of `model` with its current `requires_grad` flags."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"total_mb": round((weights + state + activation_bytes) / MB, 2), "weights_mb": round(weights / MB, 2),
            "gradients_and_adam_mb": round(state / MB, 2), "saved_activations_mb": round(activation_bytes / MB, 2)}
