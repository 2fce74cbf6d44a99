"""Attention stages: `lit` (linear attention, hybrid distillation) and `clear` (local attention,
distilled on teacher samples)."""

from __future__ import annotations

import logging

import torch.nn as nn

from ...core.stage import Stage, StageContext
from ...errors import UnsupportedModelError
from ...train.distill import Distiller
from .config import CLEARConfig, LiTConfig
from .lit import LiTProcessor
from .local import CLEARJointProcessor, CLEARProcessor
from .objective import CLEARObjective, HybridObjective

log = logging.getLogger(__name__)

SELF_ATTENTION_FAMILIES = ("dit", "pixart")


def token_grid(model: nn.Module, latent_size: int) -> tuple[int, int]:
    patch = int(model.config.patch_size)
    return latent_size // patch, latent_size // patch


def self_attentions(model: nn.Module, family: str, blocks: list[int] | None) -> dict[str, nn.Module]:
    """{path: diffusers Attention} of the blocks' self-attention (`attn1`)."""
    if family not in SELF_ATTENTION_FAMILIES:
        raise UnsupportedModelError(
            f"LiT converts self-attention of {'/'.join(SELF_ATTENTION_FAMILIES)} models; a {family} model's "
            "joint text-image attention is not supported by LiT (use CLEAR)")
    n = len(model.transformer_blocks)
    chosen = list(range(n)) if blocks is None else blocks
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise UnsupportedModelError(f"lit.blocks: {bad} out of range; the model has {n} blocks")
    out = {}
    for i in chosen:
        attn = model.transformer_blocks[i].attn1
        if attn.is_cross_attention or getattr(attn, "norm_q", None) is not None:
            raise UnsupportedModelError(f"transformer_blocks.{i}.attn1: LiT needs plain self-attention "
                                        "(no cross-attention, no q/k norm)")
        out[f"transformer_blocks.{i}.attn1"] = attn
    return out


def convert_(model: nn.Module, paths: list[str], heads: int, grid: tuple[int, int], kernel: int) -> None:
    for path in paths:
        attn = model.get_submodule(path)
        attn.set_processor(LiTProcessor(attn.to_q.out_features, heads, grid, kernel))


class LiTStage(Stage):
    name = "lit"
    config_cls = LiTConfig

    def recovery(self, config):
        return None  # hybrid distillation is part of the method: it runs in `apply`

    def is_stock(self, metadata):
        return False

    def apply(self, model, config: LiTConfig, ctx: StageContext):
        adapter = ctx.teacher.with_model(model).adapter
        attns = self_attentions(model, adapter.family, config.blocks)
        grid = token_grid(model, adapter.latent_size)
        if not config.inherit_projections:  # LiT: attention weights start fresh, everything else inherited
            for attn in attns.values():
                for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                    lin.reset_parameters()
        convert_(model, list(attns), config.heads, grid, config.kernel)
        log.info("lit: %d self-attentions -> linear attention (%d heads, %dx%d grid, kernel %d)",
                 len(attns), config.heads, *grid, config.kernel)
        blocks = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
        objective = HybridObjective(ctx.teacher.adapter, list(zip(blocks, blocks)), config.recover.feature_weight,
                                    config.output_weight, config.variance_weight)
        training = Distiller(ctx.teacher.model, model, ctx.teacher.adapter, ctx.calibration, config.recover,
                             ctx.work_dir, desc="lit distill", objective=objective).run()
        model.eval().requires_grad_(False)
        return model, {"layers": list(attns), "heads": config.heads, "grid": list(grid), "kernel": config.kernel,
                       "inherited_projections": config.inherit_projections, "training": training}

    def restore(self, model, config, metadata, adapter):
        convert_(model, metadata["layers"], metadata["heads"], tuple(metadata["grid"]), metadata["kernel"])
        return model


JOINT_FAMILIES = ("sd3",)


def image_attentions(model: nn.Module, family: str, blocks: list[int] | None) -> dict[str, nn.Module]:
    """{path: Attention} CLEAR converts: self-attention (DiT, PixArt) or joint attention (SD3)."""
    if family in SELF_ATTENTION_FAMILIES:
        return self_attentions(model, family, blocks)
    if family not in JOINT_FAMILIES:
        raise UnsupportedModelError(f"CLEAR supports {'/'.join(SELF_ATTENTION_FAMILIES + JOINT_FAMILIES)} models; "
                                    f"{family} is not supported yet")
    n = len(model.transformer_blocks)
    chosen = list(range(n)) if blocks is None else blocks
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise UnsupportedModelError(f"clear.blocks: {bad} out of range; the model has {n} blocks")
    for i in chosen:
        if getattr(model.transformer_blocks[i], "attn2", None) is not None:
            raise UnsupportedModelError(f"transformer_blocks.{i}: SD3.5 dual attention is not supported by CLEAR")
    return {f"transformer_blocks.{i}.attn": model.transformer_blocks[i].attn for i in chosen}


def localise_(model: nn.Module, paths: list[str], family: str, grid: tuple[int, int], radius: int, tile: int):
    cls = CLEARJointProcessor if family in JOINT_FAMILIES else CLEARProcessor
    for path in paths:
        model.get_submodule(path).set_processor(cls(grid, radius, tile))


class CLEARStage(Stage):
    name = "clear"
    config_cls = CLEARConfig

    def recovery(self, config):
        return None  # distillation with the attention-output loss is part of the method

    def is_stock(self, metadata):
        return False

    def apply(self, model, config: CLEARConfig, ctx: StageContext):
        adapter = ctx.teacher.with_model(model).adapter
        attns = image_attentions(model, adapter.family, config.blocks)
        grid = token_grid(model, adapter.latent_size)
        localise_(model, list(attns), adapter.family, grid, config.radius, config.tile)
        log.info("clear: %d attentions -> local attention (radius %d on a %dx%d grid)", len(attns), config.radius,
                 *grid)
        recover = config.recover
        if recover.trainable == ["*"]:  # the paper trains the image stream's projections only
            recover = recover.model_copy(update={"trainable": [f"{p}.{m}.*" for p in attns
                                                               for m in ("to_q", "to_k", "to_v", "to_out.0")]})
        objective = CLEARObjective(ctx.teacher.adapter, list(attns), config.output_weight, config.attention_weight)
        training = Distiller(ctx.teacher.model, model, ctx.teacher.adapter, ctx.calibration, recover,
                             ctx.work_dir, desc="clear distill", objective=objective).run()
        model.eval().requires_grad_(False)
        window = sum(1 for dy in range(-config.radius + 1, config.radius)
                     for dx in range(-config.radius + 1, config.radius) if dy * dy + dx * dx < config.radius ** 2)
        return model, {"layers": list(attns), "family": adapter.family, "grid": list(grid), "radius": config.radius,
                       "tile": config.tile, "keys_per_query": min(window, grid[0] * grid[1]), "training": training}

    def restore(self, model, config, metadata, adapter):
        localise_(model, metadata["layers"], metadata["family"], tuple(metadata["grid"]), metadata["radius"],
                  metadata["tile"])
        return model
