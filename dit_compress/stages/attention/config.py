"""Config of the `lit` stage (linear attention). Defaults follow the LiT paper."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...config import StrictConfig
from ...train.distill import DistillConfig


class LiTConfig(StrictConfig):
    heads: int = Field(2, ge=1, description="heads of the linear attention (the paper: 2-4 suffice)")
    kernel: int = Field(5, ge=1, description="depthwise convolution kernel over the value map")
    inherit_projections: bool = Field(False, description=(
        "start Q/K/V/out from the teacher's softmax attention (default: fresh, as in the paper)"))
    blocks: list[int] | None = Field(None, description="block indices to convert (default: every block)")
    output_weight: float = Field(0.5, ge=0, description="lambda_1: match the teacher's prediction")
    variance_weight: float = Field(0.05, ge=0, description="lambda_2: match learned-variance channels")
    recover: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=2000))


class CLEARConfig(StrictConfig):
    radius: int = Field(8, ge=2, description="image tokens attend to image tokens closer than this (grid units)")
    down_factor: int = Field(4, ge=1, le=64, description=(
        "image queries also attend to keys/values pooled over down_factor x down_factor cells by a learned "
        "weighting (the official code's remedy for repetitive patterns at small windows); 1: none"))
    attention_loss: Literal["every_4th", "all"] = Field("every_4th", description=(
        "layers whose attention output is matched: every_4th as the official code (the single-stream blocks "
        "at every 4th attention of the model; every 4th attention where a model has no single-stream blocks), "
        "or every converted layer"))
    tile: int = Field(8, ge=1, description="query tile side of the neighbourhood computation (speed only)")
    blocks: list[int] | None = Field(None, description="block indices to convert (default: every block)")
    output_weight: float = Field(0.5, ge=0, description="weight of ||v_S - v_T||^2 (the teacher's prediction)")
    attention_weight: float = Field(0.5, ge=0, description="weight of ||A_S - A_T||^2 on the converted layers")
    # Only the image stream's Q/K/V/out projections train (the paper's choice); override `trainable` to change.
    recover: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=1500))
