"""Strict safetensors loading with errors that name the file and what differs."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..errors import CheckpointError


def load_weights_(model: nn.Module, path: Path, against: str, assign: bool = False) -> nn.Module:
    """Load a safetensors file into `model` strictly; errors name the file and what differs.

    `assign`: the file's tensors become the parameters (for a model built on the meta device)."""
    from safetensors.torch import load_file

    try:
        # Copied into fresh allocations: the file's tensors may sit at any alignment, and some CPU
        # kernels (small batches) round differently on unaligned weights, so outputs would drift by 1e-7.
        state = {k: v.clone() for k, v in load_file(str(path)).items()}
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt weights ({str(e).splitlines()[0]})") from None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match {against}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model
