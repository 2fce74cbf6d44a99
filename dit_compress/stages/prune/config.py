from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...config import StrictConfig
from ...train.distill import DistillConfig


class WidthConfig(StrictConfig):
    """Fractions of attention heads and FFN hidden channels to remove from every block."""

    heads: float = Field(0.0, ge=0.0, lt=1.0)
    ffn: float = Field(0.0, ge=0.0, lt=1.0)
    importance: Literal["l2", "taylor"] = Field(
        "taylor", description="l2: weight magnitude; taylor: |weight x gradient| of the task loss")


class PruneConfig(StrictConfig):
    """Structured pruning of a DiT, recovered by distillation from the teacher.

    method:
      ppcl   PPCL: redundant runs of blocks collapse into single blocks trained by contiguous-layer
             distillation; one training run serves every ratio in `ratios` (the deployed model is
             `ratio`, the others are written as variants); optional `width` pruning in the same phase.
      depth  remove whole blocks: explicit `remove`, or `ratio` of them chosen by `select`.
      width  Torch-Pruning of heads and FFN channels, uniformly in every block, to remove `ratio`
             of the parameters (`width.importance` picks the criterion).

    Blocks are numbered across all block lists in order (Flux: double blocks, then single).
    """

    method: Literal["ppcl", "depth", "width"] = "ppcl"
    ratio: float | None = Field(None, gt=0.0, lt=1.0,
                                description="ppcl/depth: fraction of blocks; width: fraction of parameters")
    remove: list[int] | None = Field(None, description="depth: block indices to remove")
    select: Literal["block_influence", "last", "even"] = Field(
        "block_influence", description="depth: Block Influence (ShortGPT), the last blocks, or evenly spaced")
    ratios: list[float] = Field(default_factory=list,
                                description="ppcl: more ratios trained in the same run and written as variants")
    intervals: list[list[int]] | None = Field(
        None, description="ppcl: candidate runs [first, last] overriding the probe's search")
    # Pairs by default: on the 8-block digits DiT at 50 %, plans of runs up to 3 / 4 blocks ended at
    # FD ratio 1.44 / 1.41-1.53 against 1.20 for pairs (same recovery). Each ratio is planned on its
    # own (forcing smaller ratios onto a subset of the deepest plan's pairs measured no better: FD
    # 1.126 / 1.241 against 1.187 / 1.161 at 25 % on SD3 / DiT). Deep models (the paper's 60-block
    # MMDiT) have longer redundant runs: raise it there.
    max_interval: int = Field(2, ge=2, description="ppcl: longest run that collapses into one block")
    contiguous_weight: float = Field(0.1, ge=0.0, description="ppcl: weight of the block losses on teacher inputs")
    width: WidthConfig | None = None
    recover: DistillConfig | None = Field(default_factory=lambda: DistillConfig(feature_weight=1.0))

    @model_validator(mode="after")
    def _consistent(self):
        m = self.method
        if m == "depth" and (self.remove is None) == (self.ratio is None):
            raise ValueError("depth: give exactly one of `remove` (block indices) or `ratio` (0 < ratio < 1)")
        if m != "depth" and self.remove is not None:
            raise ValueError(f"`remove` belongs to method depth, not {m}")
        if m != "depth" and self.ratio is None:
            raise ValueError(f"{m}: `ratio` is required")
        if self.remove is not None and len(set(self.remove)) != len(self.remove):
            raise ValueError(f"`remove` lists a block twice: {self.remove}")
        if m != "ppcl" and (self.ratios or self.intervals):
            raise ValueError(f"`ratios` and `intervals` belong to method ppcl, not {m}")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"`ratios` must lie strictly between 0 and 1: {self.ratios}")
        if self.intervals and any(len(iv) != 2 or iv[0] >= iv[1] for iv in self.intervals):
            raise ValueError(f"`intervals` entries are [first, last] with first < last: {self.intervals}")
        if m == "width" and self.width is not None and (self.width.heads or self.width.ffn):
            raise ValueError("width: the fractions follow from `ratio`; set only `width.importance`")
        if m == "depth" and self.width is not None:
            raise ValueError("depth: `width` belongs to methods ppcl and width")
        if m == "ppcl" and self.recover is None:
            raise ValueError("ppcl: `recover` is its contiguous-layer distillation and cannot be null")
        return self

    def all_ratios(self) -> list[float]:
        return sorted({self.ratio, *self.ratios}) if self.ratio is not None else []
