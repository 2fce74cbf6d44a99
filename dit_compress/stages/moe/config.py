"""Config of the `moe` stage (Dense2MoE). Defaults: 62.5 % fewer activated FFN parameters."""

from __future__ import annotations

from pydantic import Field, model_validator

from ...config import StrictConfig
from ...train.distill import DistillConfig


class MoEConfig(StrictConfig):
    # The FFN's neurons are cut into `segments` equal parts: `shared_segments` form the shared
    # expert, every other part is one routed expert, and `top_k` of those run per token.
    # 8 / 1 / 2 activates 3 of 8 parts: 62.5 % fewer activated FFN parameters, as in the paper.
    segments: int = Field(8, ge=2)
    shared_segments: int = Field(1, ge=0)
    top_k: int = Field(2, ge=1)
    targets: tuple[str, ...] = Field(("ff", "ff_context"), min_length=1, strict=False,  # a YAML/JSON list
                                     description="FeedForward attributes of a block to convert")
    taylor_batches: int = Field(4, ge=1, description="calibration batches for Taylor scores and the router fit")
    balance_weight: float = Field(0.05, ge=0, description="weight of the load-balancing loss")
    # Knowledge distillation of the converted model (output + block features + load balancing).
    recover: DistillConfig | None = Field(default_factory=lambda: DistillConfig(steps=1200, feature_weight=1.0))

    @model_validator(mode="after")
    def _fits(self):
        if self.shared_segments >= self.segments:
            raise ValueError("shared_segments must leave at least one routed expert")
        if self.top_k > self.segments - self.shared_segments:
            raise ValueError(f"top_k={self.top_k} exceeds the {self.segments - self.shared_segments} routed experts")
        return self

    @property
    def activated_ffn_fraction(self) -> float:
        return (self.shared_segments + self.top_k) / self.segments
