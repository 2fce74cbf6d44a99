"""Attention stages: `lit` (linear attention, hybrid distillation) and `clear` (local attention,
distilled on teacher samples). Both convert the image attention of every (or the chosen)
block: self-attention in DiT/PixArt (cross-attention untouched), the image part of the joint
text-image attention in SD3/Flux (both of Flux's block lists, counted in order)."""

from __future__ import annotations

import logging

import torch.nn as nn

from ...core.stage import Stage, StageContext
from ...errors import UnsupportedModelError
from ...models.families import JOINT_ATTENTION, SELF_ATTENTION, FamilyAdapter
from ...train.distill import Distiller
from .config import CLEARConfig, LiTConfig
from .lit import LiTJointProcessor, LiTProcessor
from .local import CLEARJointProcessor, CLEARProcessor
from .objective import CLEARObjective, HybridObjective

log = logging.getLogger(__name__)


def image_attentions(model: nn.Module, adapter: FamilyAdapter, blocks: list[int] | None, stage: str
                     ) -> dict[str, nn.Module]:
    """{path: attention module} the stage converts: each chosen block's image attention (its joint
    attention in MMDiT and Flux blocks, else its self-attention), by block index in forward order."""
    layout = adapter.layout(model)
    views = [b.image_attention() for b in layout.blocks]
    if any(v.linear for v in views):
        raise UnsupportedModelError(f"{stage} converts softmax attention; {adapter.family}'s image attention is "
                                    f"already linear: {adapter.family} is not supported")
    chosen = list(range(len(views))) if blocks is None else blocks
    bad = [i for i in chosen if not 0 <= i < len(views)]
    if bad:
        raise UnsupportedModelError(f"{stage}.blocks: {bad} out of range; the model has {len(views)} blocks")
    out = {}
    for i in chosen:
        view = views[i]
        if view.kind == SELF_ATTENTION and view.qk_norm:
            raise UnsupportedModelError(f"{view.path}: {stage} needs plain self-attention (no q/k norm)")
        if layout.blocks[i].dual_attention:
            raise UnsupportedModelError(f"{view.path}: dual attention (SD3.5) is not supported by {stage}")
        out[view.path] = view.module
    return out


def image_projections(model: nn.Module, adapter: FamilyAdapter, paths: list[str]) -> list[nn.Module]:
    """The image stream's Q/K/V/out projections of the attentions at `paths` (Flux single-stream
    blocks project the attention output in the block)."""
    layout = adapter.layout(model)
    return [model.get_submodule(q) for p in paths for q in layout.attention(p).image_projections]


def _install(model: nn.Module, adapter: FamilyAdapter, paths: list[str], make) -> None:
    """Give each attention at `paths` the processor `make(attention, joint)`."""
    layout = adapter.layout(model)
    for path in paths:
        view = layout.attention(path)
        view.module.set_processor(make(view.module, view.kind == JOINT_ATTENTION))


def lit_(model, paths, adapter, heads, grid, kernel) -> None:
    _install(model, adapter, paths, lambda a, joint: (LiTJointProcessor if joint else LiTProcessor)(
        a.to_q.out_features, heads, grid, kernel))


def clear_(model, paths, adapter, grid, radius, tile) -> None:
    _install(model, adapter, paths, lambda a, joint: (CLEARJointProcessor if joint else CLEARProcessor)(
        grid, radius, tile))


class _AttentionStage(Stage):
    def recovery(self, config):
        return None  # the method's distillation runs in `apply`

    def is_stock(self, metadata):
        return False


class LiTStage(_AttentionStage):
    name = "lit"
    config_cls = LiTConfig

    def apply(self, model, config: LiTConfig, ctx: StageContext):
        adapter = ctx.teacher.with_model(model).adapter
        attns = image_attentions(model, adapter, config.blocks, "lit")
        grid = ctx.teacher.adapter.token_grid()
        if not config.inherit_projections:  # LiT: attention weights start fresh, everything else inherited
            for lin in image_projections(model, adapter, list(attns)):
                lin.reset_parameters()
        lit_(model, list(attns), adapter, config.heads, grid, config.kernel)
        log.info("lit: %d attentions -> linear attention (%d heads, %dx%d grid, kernel %d)",
                 len(attns), config.heads, *grid, config.kernel)
        blocks = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
        objective = HybridObjective(ctx.teacher.adapter, list(zip(blocks, blocks)), config.recover.feature_weight,
                                    config.output_weight, config.variance_weight)
        training = Distiller(ctx.teacher.model, model, ctx.teacher.adapter, ctx.calibration, config.recover,
                             ctx.work_dir, desc="lit distill", objective=objective).run()
        model.eval().requires_grad_(False)
        return model, {"layers": list(attns), "family": adapter.family, "heads": config.heads, "grid": list(grid),
                       "kernel": config.kernel, "inherited_projections": config.inherit_projections,
                       "training": training}

    def report_lines(self, metadata, pictures):
        g = metadata["grid"]
        return ["", "## Linear attention (lit)", "",
                f"{len(metadata['layers'])} attentions on a {g[0]}x{g[1]} token grid became ReLU linear attention with "
                f"{metadata['heads']} heads and a {metadata['kernel']}x{metadata['kernel']} depthwise convolution of "
                f"the values; Q/K/V/out {'inherited' if metadata['inherited_projections'] else 'started fresh'}, "
                "every other weight inherited; hybrid distillation (task + teacher output)."]

    def restore(self, model, config, metadata, adapter):
        lit_(model, metadata["layers"], adapter, metadata["heads"], tuple(metadata["grid"]),
             metadata["kernel"])
        return model


class CLEARStage(_AttentionStage):
    name = "clear"
    config_cls = CLEARConfig

    def apply(self, model, config: CLEARConfig, ctx: StageContext):
        adapter = ctx.teacher.with_model(model).adapter
        attns = image_attentions(model, adapter, config.blocks, "clear")
        grid = ctx.teacher.adapter.token_grid()
        clear_(model, list(attns), adapter, grid, config.radius, config.tile)
        log.info("clear: %d attentions -> local attention (radius %d on a %dx%d grid)", len(attns), config.radius,
                 *grid)
        recover = config.recover
        if recover.trainable == ["*"]:  # the paper trains the image stream's projections only
            names = {m: n for n, m in model.named_modules()}
            projections = image_projections(model, adapter, list(attns))
            recover = recover.model_copy(update={"trainable": [f"{names[m]}.*" for m in projections]})
        objective = CLEARObjective(ctx.teacher.adapter, list(attns), config.output_weight, config.attention_weight)
        training = Distiller(ctx.teacher.model, model, ctx.teacher.adapter, ctx.calibration, recover,
                             ctx.work_dir, desc="clear distill", objective=objective).run()
        model.eval().requires_grad_(False)
        reach = range(-config.radius + 1, config.radius)
        window = sum(1 for dy in reach for dx in reach if dy * dy + dx * dx < config.radius ** 2)
        return model, {"layers": list(attns), "family": adapter.family, "grid": list(grid), "radius": config.radius,
                       "tile": config.tile, "image_keys_per_query": min(window, grid[0] * grid[1]),
                       "training": training}

    def report_lines(self, metadata, pictures):
        g = metadata["grid"]
        return ["", "## Local attention (clear)", "",
                f"{len(metadata['layers'])} attentions on a {g[0]}x{g[1]} token grid became local attention: an image "
                f"token sees the image tokens closer than {metadata['radius']} ({metadata['image_keys_per_query']} "
                f"of {g[0] * g[1]} at most) and every text token; computed in {metadata['tile']}x{metadata['tile']} "
                "query tiles over their halo windows. Distilled with task + output + attention-output losses, "
                "training the image stream's Q/K/V/out only."]

    def restore(self, model, config, metadata, adapter):
        clear_(model, metadata["layers"], adapter, tuple(metadata["grid"]), metadata["radius"],
               metadata["tile"])
        return model
