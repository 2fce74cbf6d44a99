"""Config of the `mob` stage (Mixture of Blocks)."""

from __future__ import annotations

from pydantic import Field, model_validator

from ...config import StrictConfig
from ...train.distill import DistillConfig


class MoBConfig(StrictConfig):
    """Mixture of Blocks over the first block list: `active` of every `group_size` blocks run."""

    group_size: int = Field(4, ge=2)
    active: int = Field(3, ge=1)
    # MoB optimisation: output + group feature loss (hidden state at every group's end).
    recover: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=600, feature_weight=1.0))

    @model_validator(mode="after")
    def _fits(self):
        if self.active >= self.group_size:
            raise ValueError(f"active={self.active} must be below group_size={self.group_size} to skip any block")
        return self
