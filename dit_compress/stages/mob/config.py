"""Config of the `mob` stage (Mixture of Blocks)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...config import StrictConfig
from ...train.distill import DistillConfig


class MoBConfig(StrictConfig):
    """Mixture of Blocks over the first block list: `active` of every `group_size` blocks run."""

    group_size: int = Field(4, ge=2)
    active: int = Field(3, ge=1)
    router: Literal["adaln", "hidden"] = Field(
        "adaln", description="adaln: the paper's router on hidden state, condition and AdaLN embedding; "
                             "hidden: on the hidden state's mean and spread over tokens")
    alpha: float = Field(0.5, ge=0, le=1, description="adaln router: weight of [hidden, condition] against "
                                                      "the AdaLN embedding")
    loss: Literal["group", "output+group"] = Field(
        "group", description="group: the group feature loss alone (the paper's); output+group: plus output MSE")
    # The group feature loss: the hidden state at every group's end (loss group: alone, weight 1;
    # output+group: weighted by recover.feature_weight against the output MSE).
    recover: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=600, feature_weight=1.0))

    @model_validator(mode="after")
    def _fits(self):
        if self.active >= self.group_size:
            raise ValueError(f"active={self.active} must be below group_size={self.group_size} to skip any block")
        return self
