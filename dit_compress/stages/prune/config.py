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
      ppcl         PPCL as its paper and official code define it: residual linear probes, a proxy
                   model and the trend of its CKA find redundant intervals (2..max_interval blocks);
                   each collapses into its middle block; only the new blocks train, each on the
                   teacher's state at its interval's start against the state at its end (frozen
                   teacher, per-token L2-normalised MSE). `ratio` is the deepest plug (every
                   interval); each of `ratios` (smaller) plugs the most redundant intervals only.
                   `replace_ffn` replaces that fraction of FFNs by least-squares linear maps.
      ppcl-hybrid  this project's earlier variant (ridge R² per pair of blocks, first-block start,
                   every block trained with output + chained block losses); docs/methods/ppcl.md.
      depth        remove whole blocks: explicit `remove`, or `ratio` of them chosen by `select`.
      width        Torch-Pruning of heads and FFN channels, uniformly in every block, to remove
                   `ratio` of the parameters (`width.importance` picks the criterion).

    Blocks are numbered across all block lists in order (Flux: double blocks, then single).
    """

    method: Literal["ppcl", "ppcl-hybrid", "depth", "width"] = "ppcl"
    ratio: float | None = Field(None, gt=0.0, lt=1.0,
                                description="ppcl: fraction of blocks; width: fraction of parameters")
    remove: list[int] | None = Field(None, description="depth: block indices to remove")
    select: Literal["block_influence", "last", "even"] = Field(
        "block_influence", description="depth: Block Influence (ShortGPT), the last blocks, or evenly spaced")
    ratios: list[float] = Field(default_factory=list,
                                description="ppcl: more sizes from the same run, written as variants")
    intervals: list[list[int]] | None = Field(
        None, description="ppcl: candidate intervals [first, last] overriding the search")
    max_interval: int | None = Field(
        None, ge=2, le=64, description="ppcl: longest interval (default 10, as the paper's); ppcl-hybrid: 2")
    turn: float = Field(0.02, gt=0.0, le=1.0,
                        description="ppcl: a CKA drop above this, one block further, is a turning point "
                                    "that ends an interval")
    replace_ffn: float = Field(0.0, ge=0.0, lt=1.0,
                               description="ppcl: fraction of FFNs replaced by least-squares linear maps")
    # ppcl-hybrid only. Pairs by default: on the 8-block digits DiT at 50 %, runs up to 3 / 4 blocks
    # ended at FD ratio 1.44 / 1.41-1.53 against 1.20 for pairs (same recovery).
    contiguous_weight: float | None = Field(
        None, ge=0.0, description="ppcl-hybrid: weight of the block losses on teacher inputs (default 0.1)")
    width: WidthConfig | None = None
    recover: DistillConfig | None = Field(default_factory=lambda: DistillConfig(feature_weight=1.0))

    @model_validator(mode="after")
    def _consistent(self):
        m = self.method
        ppcl = m in ("ppcl", "ppcl-hybrid")
        if m == "depth" and (self.remove is None) == (self.ratio is None):
            raise ValueError("depth: give exactly one of `remove` (block indices) or `ratio` (0 < ratio < 1)")
        if m != "depth" and self.remove is not None:
            raise ValueError(f"`remove` belongs to method depth, not {m}")
        if m != "depth" and self.ratio is None:
            raise ValueError(f"{m}: `ratio` is required")
        if self.remove is not None and len(set(self.remove)) != len(self.remove):
            raise ValueError(f"`remove` lists a block twice: {self.remove}")
        if not ppcl and (self.ratios or self.intervals or self.max_interval):
            raise ValueError(f"`ratios`, `intervals` and `max_interval` belong to the ppcl methods, not {m}")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"`ratios` must lie strictly between 0 and 1: {self.ratios}")
        if m == "ppcl" and any(r >= self.ratio for r in self.ratios):
            raise ValueError(f"ppcl: `ratios` {self.ratios} are smaller plugs of the intervals `ratio` "
                             f"({self.ratio}) trains; each must be below it")
        if self.intervals and any(len(iv) != 2 or iv[0] >= iv[1] for iv in self.intervals):
            raise ValueError(f"`intervals` entries are [first, last] with first < last: {self.intervals}")
        if m != "ppcl" and self.replace_ffn:
            raise ValueError(f"`replace_ffn` belongs to method ppcl, not {m}")
        if m != "ppcl-hybrid" and self.contiguous_weight is not None:
            raise ValueError(f"`contiguous_weight` belongs to method ppcl-hybrid, not {m}")
        if m == "width" and self.width is not None and (self.width.heads or self.width.ffn):
            raise ValueError("width: the fractions follow from `ratio`; set only `width.importance`")
        if m in ("depth", "ppcl") and self.width is not None:
            raise ValueError(f"{m}: `width` (Torch-Pruning) belongs to methods ppcl-hybrid and width"
                             + ("; PPCL's own width is `replace_ffn`" if m == "ppcl" else ""))
        if ppcl and self.recover is None:
            raise ValueError(f"{m}: `recover` is its contiguous-layer distillation and cannot be null")
        if m == "ppcl" and self.recover.trainable != ["*"]:
            raise ValueError("ppcl: what trains is the method's (its new blocks and FFN maps); "
                             "leave `recover.trainable` unset")
        return self

    def longest_interval(self) -> int:
        return self.max_interval or (10 if self.method == "ppcl" else 2)

    def block_weight(self) -> float:
        return 0.1 if self.contiguous_weight is None else self.contiguous_weight

    def all_ratios(self) -> list[float]:
        return sorted({self.ratio, *self.ratios}) if self.ratio is not None else []
