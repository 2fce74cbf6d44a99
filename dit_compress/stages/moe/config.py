"""Config of the `moe` stage (Dense2MoE). Defaults: 62.5 % fewer activated FFN parameters, the
paper's two training stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...config import StrictConfig
from ...train.distill import TD_LORA, DistillConfig

BALANCE = {"paper": 1e-2, "joint": 0.05}  # the load-balance weight each schedule defaults to


class MoEConfig(StrictConfig):
    # The FFN's neurons are cut into `segments` equal parts: `shared_segments` form the shared
    # expert, every other part is one routed expert, and `top_k` of those run per token.
    # 8 / 1 / 2 activates 3 of 8 parts: 62.5 % fewer activated FFN parameters, as in the paper.
    segments: int = Field(8, ge=2)
    shared_segments: int = Field(1, ge=0)
    top_k: int = Field(2, ge=1)
    targets: tuple[str, ...] = Field(("ff", "ff_context", "mlp"), min_length=1, strict=False,  # a YAML/JSON list
                                     description="FFNs of a block to convert: ff, ff_context, and mlp (the "
                                                 "fused MLP of Flux's single-stream blocks)")
    taylor_batches: int = Field(4, ge=1, description="calibration batches for Taylor scores and the router fit")
    schedule: Literal["paper", "joint"] = Field(
        "paper", description="paper: the shared expert alone (output + block features), then the shared expert "
                             "frozen while experts and routers train (+ load balance); joint: one phase, "
                             "everything trainable")
    balance_weight: float | None = Field(None, ge=0, description="weight of the load-balancing loss "
                                                                 "(default: 0.01 for paper, 0.05 for joint)")
    # Knowledge distillation of the converted model: the routed-experts phase (paper), or the one phase (joint).
    recover: DistillConfig | None = Field(default_factory=lambda: DistillConfig(steps=1200, feature_weight=1.0))
    shared_recover: DistillConfig | None = Field(
        None, description="the shared-expert phase's settings (schedule paper; default: those of recover)")

    @model_validator(mode="after")
    def _fits(self):
        if self.shared_segments >= self.segments:
            raise ValueError("shared_segments must leave at least one routed expert")
        if self.top_k > self.segments - self.shared_segments:
            raise ValueError(f"top_k={self.top_k} exceeds the {self.segments - self.shared_segments} routed experts")
        if self.schedule == "paper":
            if self.shared_segments == 0:
                raise ValueError("schedule paper trains the shared expert first: shared_segments must be >= 1")
            for name in ("recover", "shared_recover"):
                phase = getattr(self, name)
                # (td_lora is refused for moe with its own message, at the recipe)
                if phase is not None and phase.trainable not in (["*"], [TD_LORA]):
                    raise ValueError(f"{name}.trainable: schedule paper sets what each phase trains "
                                     f"(use schedule: joint to choose)")
            if self.shared_recover is not None and self.recover is None:
                raise ValueError("shared_recover needs recover (the phase that follows it)")
        elif self.shared_recover is not None:
            raise ValueError("shared_recover is the first phase of schedule paper; schedule joint has one phase")
        return self

    @property
    def balance(self) -> float:
        return BALANCE[self.schedule] if self.balance_weight is None else self.balance_weight

    @property
    def activated_ffn_fraction(self) -> float:
        return (self.shared_segments + self.top_k) / self.segments
