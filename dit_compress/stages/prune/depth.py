"""Depth surgery shared by depth pruning and PPCL's deployed students."""

from __future__ import annotations

import torch.nn as nn

from ...models.families import FamilyAdapter


def remove_blocks_(model: nn.Module, adapter: FamilyAdapter, removed: list[int]) -> None:
    """Remove blocks by global index, group by group, keeping the config in step."""
    offset = 0
    for group in adapter.block_groups:
        n = len(getattr(model, group.attr))
        keep = [i for i in range(n) if i + offset not in removed]
        adapter.remove_blocks_(model, group, keep)
        offset += n
