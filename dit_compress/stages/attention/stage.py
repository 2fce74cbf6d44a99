"""Attention stages: `lit` (linear attention, hybrid distillation) and `clear` (local attention,
distilled on teacher samples). Both convert the image attention of every (or the chosen)
block: self-attention in DiT/PixArt (cross-attention untouched), the image part of the joint
text-image attention in SD3/Flux (both of Flux's block lists, counted in order)."""

from __future__ import annotations

import logging

import torch.nn as nn

from ...core.stage import Phase, Plan, Stage, StageContext, seed_of, seeded
from ...errors import RecipeError, UnsupportedModelError
from ...models.families import JOINT_ATTENTION, SELF_ATTENTION, SINGLE_BLOCK, FamilyAdapter
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


def clear_(model, paths, adapter, grid, radius, tile, down_factor: int = 1) -> None:
    _install(model, adapter, paths, lambda a, joint: (CLEARJointProcessor if joint else CLEARProcessor)(
        grid, radius, tile, down_factor))


def official_loss_layers(adapter: FamilyAdapter, model: nn.Module, converted: list[str]) -> list[str]:
    """The attentions CLEAR's official code matches: counting every attention of the model in
    order, each 4th (index % 4 == 0) that sits in a single-stream block (every 4th of all where the
    model has none); every converted layer where that picks none of them (models under 4 blocks)."""
    layout = adapter.layout(model)
    kinds = [g.kind for g, _, _ in adapter.blocks(model)]
    paths = [b.image_attention().path for b in layout.blocks]
    single = SINGLE_BLOCK in kinds
    chosen = [p for i, (p, kind) in enumerate(zip(paths, kinds))
              if i % 4 == 0 and (kind == SINGLE_BLOCK or not single) and p in converted]
    return chosen or list(converted)


def _block_pairs(adapter, model) -> list[tuple[str, str]]:
    blocks = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
    return list(zip(blocks, blocks))


class _AttentionStage(Stage):
    families = ("dit", "pixart", "sd3", "flux")  # softmax image attention (Sana's is linear already)

    def is_stock(self, plan):
        return False

    def _layers(self, model, adapter, config) -> dict:
        attns = image_attentions(model, adapter, config.blocks, self.name)
        return {"layers": list(attns), "grid": list(adapter.token_grid())}


class LiTStage(_AttentionStage):
    name = "lit"
    config_cls = LiTConfig

    def plan(self, model, adapter, calibration, config: LiTConfig, ctx: StageContext) -> Plan:
        return Plan({**self._layers(model, adapter, config), "heads": config.heads, "kernel": config.kernel,
                     "inherited_projections": config.inherit_projections, "seed": ctx.seed})

    def build(self, model, adapter, config: LiTConfig, plan: Plan):
        # LiT: attention weights start fresh, everything else inherited; drawn from the plan's seed
        with seeded(seed_of(self.name, plan["seed"], plan["layers"])):
            if not plan["inherited_projections"]:
                for lin in image_projections(model, adapter, plan["layers"]):
                    lin.reset_parameters()
            lit_(model, plan["layers"], adapter, plan["heads"], tuple(plan["grid"]), plan["kernel"])
        log.info("lit: %d attentions -> linear attention (%d heads, %dx%d grid, kernel %d)",
                 len(plan["layers"]), plan["heads"], *plan["grid"], plan["kernel"])
        return model

    def phases(self, config: LiTConfig, plan: Plan, adapter) -> list[Phase]:
        return [Phase("distill", config.recover, lambda teacher_adapter, student: HybridObjective(
            teacher_adapter, _block_pairs(teacher_adapter, student), config.recover.feature_weight,
            config.output_weight, config.variance_weight))]

    def report_lines(self, summary, pictures):
        g = summary["grid"]
        return ["", "## Linear attention (lit)", "",
                f"{len(summary['layers'])} attentions on a {g[0]}x{g[1]} token grid became ReLU linear attention with "
                f"{summary['heads']} heads and a {summary['kernel']}x{summary['kernel']} depthwise convolution of "
                f"the values; Q/K/V/out {'inherited' if summary['inherited_projections'] else 'started fresh'}, "
                "every other weight inherited; hybrid distillation (task + teacher output)."]


class CLEARStage(_AttentionStage):
    name = "clear"
    config_cls = CLEARConfig

    def plan(self, model, adapter, calibration, config: CLEARConfig, ctx: StageContext) -> Plan:
        grid = adapter.token_grid()
        reach = range(-config.radius + 1, config.radius)
        window = sum(1 for dy in reach for dx in reach if dy * dy + dx * dx < config.radius ** 2)
        layers = self._layers(model, adapter, config)
        layout = adapter.layout(model)
        # what the phase trains by default: the image stream's Q/K/V/out projections (the paper's choice)
        projections = [q for p in layers["layers"] for q in layout.attention(p).image_projections]
        f = config.down_factor
        if f > 1 and (grid[0] % f or grid[1] % f):
            raise RecipeError(f"clear.down_factor: {f} does not divide the {grid[0]}x{grid[1]} token grid "
                              f"(pooled cells must tile it); choose a divisor or 1")
        loss_layers = (official_loss_layers(adapter, model, layers["layers"]) if config.attention_loss == "every_4th"
                       else layers["layers"])
        return Plan({**layers, "radius": config.radius, "tile": config.tile, "down_factor": f,
                     "loss_layers": loss_layers},
                    notes={"image_keys_per_query": min(window, grid[0] * grid[1]),
                           "pooled_keys_per_query": grid[0] * grid[1] // (f * f) if f > 1 else 0,
                           "image_projections": projections})

    def build(self, model, adapter, config: CLEARConfig, plan: Plan):
        # plans from before the down-sampled tokens had none
        clear_(model, plan["layers"], adapter, tuple(plan["grid"]), plan["radius"], plan["tile"],
               plan.get("down_factor", 1))
        log.info("clear: %d attentions -> local attention (radius %d on a %dx%d grid, pooled tokens every %d)",
                 len(plan["layers"]), plan["radius"], *plan["grid"], plan.get("down_factor", 1))
        return model

    def phases(self, config: CLEARConfig, plan: Plan, adapter) -> list[Phase]:
        trainable = None
        if config.recover.trainable == ["*"]:  # the paper: the image stream's projections (and the pooling)
            trainable = [f"{path}.*" for path in plan.notes["image_projections"]]
            trainable += [f"{path}.processor.spatial_weight" for path in plan["layers"]]
        return [Phase("distill", config.recover, lambda teacher_adapter, student: CLEARObjective(
            teacher_adapter, plan.get("loss_layers", plan["layers"]), config.output_weight,
            config.attention_weight), trainable=trainable)]

    def summary(self, config, plan, stats):
        return {**plan, **{k: v for k, v in stats.items() if k != "image_projections"}}

    def report_lines(self, summary, pictures):
        g = summary["grid"]
        return ["", "## Local attention (clear)", "",
                f"{len(summary['layers'])} attentions on a {g[0]}x{g[1]} token grid became local attention: an image "
                f"token sees the image tokens closer than {summary['radius']} ({summary['image_keys_per_query']} "
                f"of {g[0] * g[1]} at most), every text token"
                + (f" and the image tokens pooled over {summary['down_factor']}x{summary['down_factor']} cells "
                   f"({summary.get('pooled_keys_per_query')} keys, learned weighting)" if summary.get("down_factor", 1) > 1
                   else "")
                + f"; computed in {summary['tile']}x{summary['tile']} query tiles over their halo windows. Distilled "
                f"with task + output + attention-output losses (on {len(summary.get('loss_layers', summary['layers']))} "
                "layers), training the image stream's Q/K/V/out (and the pooling weights) only."]
