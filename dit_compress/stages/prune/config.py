from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...core.stage import StageConfig
from ...train.distill import DistillConfig


class PruneConfig(StageConfig):
    """Depth pruning: remove whole transformer blocks, then recover by distillation.

    Blocks are numbered across all block lists in order (Flux: double blocks, then single).
    Give either `remove` (explicit indices) or `ratio` (fraction of blocks, chosen by importance).
    """

    method: Literal["depth"] = "depth"
    remove: list[int] | None = Field(None, description="block indices to remove")
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of blocks to remove")
    importance: Literal["block_influence"] = Field(
        "block_influence", description="ShortGPT's Block Influence: 1 - cos(block input, block output)")
    recover: DistillConfig | None = Field(default_factory=lambda: DistillConfig(feature_weight=1.0))

    @model_validator(mode="after")
    def _one_selector(self):
        if (self.remove is None) == (self.ratio is None):
            raise ValueError("give exactly one of `remove` (block indices) or `ratio` (0 < ratio < 1)")
        if self.remove is not None and len(set(self.remove)) != len(self.remove):
            raise ValueError(f"`remove` lists a block twice: {self.remove}")
        return self
