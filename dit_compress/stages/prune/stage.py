"""Depth pruning: drop whole blocks chosen explicitly or by Block Influence."""

from __future__ import annotations

import torch.nn as nn

from ...core.stage import Stage, StageContext
from ...errors import RecipeError
from ...models.families import FamilyAdapter
from .config import PruneConfig
from .analysis import block_influence


def _block_names(adapter: FamilyAdapter, model: nn.Module) -> list[str]:
    return [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]


def remove_blocks_(model: nn.Module, adapter: FamilyAdapter, removed: list[int]) -> None:
    """Remove blocks by global index, group by group, keeping the config in step."""
    offset = 0
    for group in adapter.block_groups:
        n = len(getattr(model, group.attr))
        keep = [i for i in range(n) if i + offset not in removed]
        adapter.remove_blocks_(model, group, keep)
        offset += n


class PruneStage(Stage):
    name = "prune"
    config_cls = PruneConfig

    def apply(self, model, config: PruneConfig, ctx: StageContext):
        adapter = ctx.teacher.with_model(model).adapter  # the student's own: surgery updates its config
        names = _block_names(adapter, model)
        protected = {names.index(f"{g}.{i}") for g, i in adapter.protected_blocks(model)}
        scores = None
        if config.remove is not None:
            bad = [i for i in config.remove if not 0 <= i < len(names)]
            if bad:
                raise RecipeError(f"prune.remove: block index {bad[0]} out of range 0..{len(names) - 1}")
            hit = sorted(protected & set(config.remove))
            if hit:
                raise RecipeError(f"prune.remove: block {hit[0]} ({names[hit[0]]}) is needed by the "
                                  f"{adapter.family} architecture and cannot be removed")
            removed = sorted(config.remove)
        else:
            n_remove = round(config.ratio * len(names))
            candidates = [i for i in range(len(names)) if i not in protected]
            if not 0 < n_remove <= len(candidates):
                raise RecipeError(f"prune.ratio: {config.ratio} removes {n_remove} of {len(names)} blocks "
                                  f"({len(candidates)} removable)")
            scores = block_influence(model, adapter, ctx.calibration)
            removed = sorted(sorted(candidates, key=lambda i: scores[i])[:n_remove])
        kept = [i for i in range(len(names)) if i not in removed]
        # Student block j stands in for teacher blocks kept[j] .. kept[j+1]-1, so its output is
        # matched to the teacher's hidden state where that run of blocks ends.
        ends = [k - 1 for k in kept[1:]] + [len(names) - 1]
        remove_blocks_(model, adapter, removed)
        metadata = {
            "removed": removed,
            "teacher_targets": [names[i] for i in ends],
            "student_blocks": _block_names(adapter, model),
            "block_influence": [round(s, 6) for s in scores] if scores else None,
        }
        return model, metadata

    def restore(self, model, config, metadata, adapter):
        remove_blocks_(model, adapter, metadata["removed"])
        return model

    def layer_map(self, metadata):
        return list(zip(metadata["student_blocks"], metadata["teacher_targets"]))
