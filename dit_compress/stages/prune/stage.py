"""The `prune` stage: PPCL, and the depth / width baselines it is measured against."""

from __future__ import annotations

import logging
import shutil

import torch.nn as nn

from ...core.processes import process_local
from ...core.stage import Stage, StageContext
from ...errors import RecipeError
from ...models.families import FamilyAdapter
from ...probes.boundaries import block_influence, boundary_states
from ...probes.redundancy import analyse_states
from ...train.distill import Distiller
from .config import PruneConfig
from .depth import remove_blocks_
from .width import QKV, attention_modules, ffn_inputs, replay_width_, width_prune_

log = logging.getLogger("dit_compress")


def _block_names(adapter: FamilyAdapter, model: nn.Module) -> list[str]:
    return [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]


def _protected(adapter: FamilyAdapter, model: nn.Module) -> set[int]:
    names = _block_names(adapter, model)
    return {names.index(f"{g}.{i}") for g, i in adapter.protected_blocks(model)}


def width_record(model: nn.Module, adapter: FamilyAdapter, teacher: nn.Module, teacher_adapter: FamilyAdapter,
                 sources: list[int]) -> dict:
    """Parameter shapes and head counts of `model` that differ from the teacher blocks they came
    from (`sources[j]`: the teacher block index of student block j)."""
    t_names = _block_names(teacher_adapter, teacher)
    rename = dict(zip(_block_names(adapter, model), (t_names[k] for k in sources)))

    def source(name: str) -> str:
        parts = name.split(".")
        block = ".".join(parts[:2])
        return ".".join([rename[block], *parts[2:]]) if block in rename else name

    t_params, t_mods = dict(teacher.named_parameters()), dict(teacher.named_modules())
    shapes = {n: list(p.shape) for n, p in model.named_parameters()
              if tuple(p.shape) != tuple(t_params[source(n)].shape)}
    heads = {}
    for (g, i, _), attns in zip(adapter.blocks(model), attention_modules(adapter, model)):
        for name, attn in attns:
            full = f"{g.attr}.{i}.{name}"
            if attn.heads != t_mods[source(full)].heads:
                heads[full] = attn.heads
    return {"shapes": shapes, "heads": heads}


def _prunable_parameters(adapter: FamilyAdapter, model: nn.Module) -> tuple[int, int, int]:
    """(attention, FFN) parameters that head and channel pruning shrink in proportion, and the
    smallest head count of any attention."""
    attn_params = ffn_params = 0
    heads = []
    for attns, ups in zip(attention_modules(adapter, model), ffn_inputs(adapter, model)):
        for _, attn in attns:
            heads.append(attn.heads)
            attn_params += sum(p.numel() for q in QKV if isinstance(getattr(attn, q, None), nn.Linear)
                               for p in getattr(attn, q).parameters())
            outs = [getattr(attn, "to_out", [None])[0], getattr(attn, "to_add_out", None)]
            attn_params += sum(o.weight.numel() for o in outs if isinstance(o, nn.Linear))
        for up in ups:
            ffn_params += 2 * up.weight.numel() + up.bias.numel()
    return attn_params, ffn_params, min(heads) if heads else 0


def uniform_width_fractions(adapter: FamilyAdapter, model: nn.Module, ratio: float) -> tuple[float, float]:
    """Head and FFN fractions that remove `ratio` of all parameters: the same share of each
    where head granularity allows (at least one head stays), FFN channels making up the rest."""
    attn, ffn, heads = _prunable_parameters(adapter, model)
    target = ratio * sum(p.numel() for p in model.parameters())
    share = target / max(1, attn + ffn)
    head_fraction = min(int(share * heads), heads - 1) / heads if heads else 0.0
    ffn_fraction = (target - head_fraction * attn) / max(1, ffn)
    if ffn_fraction >= 0.99:
        raise RecipeError(
            f"prune.ratio: removing {ratio:.0%} of the parameters by width alone would take "
            f"{ffn_fraction:.0%} of every FFN's channels (limit 99%); lower the ratio")
    return head_fraction, max(0.0, ffn_fraction)


class PruneStage(Stage):
    name = "prune"
    config_cls = PruneConfig

    def recovery(self, config: PruneConfig):
        # PPCL's distillation is part of the method and runs inside `apply`.
        return None if config.method == "ppcl" else config.recover

    def is_stock(self, metadata: dict) -> bool:
        return not (metadata.get("width") or {}).get("shapes")

    def apply(self, model, config: PruneConfig, ctx: StageContext):
        adapter = ctx.teacher.with_model(model).adapter  # the student's own: surgery updates its config
        if config.method == "ppcl":
            return self._ppcl(model, adapter, config, ctx)
        if config.method == "width":
            return self._width(model, adapter, config, ctx)
        return self._depth(model, adapter, config, ctx)

    # -- baselines -------------------------------------------------------------------
    def _depth(self, model, adapter, config: PruneConfig, ctx: StageContext):
        names = _block_names(adapter, model)
        protected = _protected(adapter, model)
        scores = None
        if config.remove is not None:
            bad = [i for i in config.remove if not 0 <= i < len(names)]
            if bad:
                raise RecipeError(f"prune.remove: block index {bad[0]} out of range 0..{len(names) - 1}")
            hit = sorted(protected & set(config.remove))
            if hit:
                raise RecipeError(f"prune.remove: block {hit[0]} ({names[hit[0]]}) is needed by the "
                                  f"{adapter.family} architecture and cannot be removed")
            removed = sorted(config.remove)
        else:
            n_remove = round(config.ratio * len(names))
            candidates = [i for i in range(len(names)) if i not in protected]
            if not 0 < n_remove <= len(candidates):
                raise RecipeError(f"prune.ratio: {config.ratio} removes {n_remove} of {len(names)} blocks "
                                  f"({len(candidates)} removable)")
            if config.select == "block_influence":
                scores = block_influence(model, adapter, ctx.calibration)
                removed = sorted(candidates, key=lambda i: scores[i])[:n_remove]
            elif config.select == "last":
                removed = candidates[-n_remove:]
            else:  # evenly spaced over the removable blocks
                step = len(candidates) / n_remove
                removed = [candidates[int((k + 0.5) * step)] for k in range(n_remove)]
            removed = sorted(removed)
        kept = [i for i in range(len(names)) if i not in removed]
        # Student block j stands in for teacher blocks kept[j] .. kept[j+1]-1, so its output is
        # matched to the teacher's hidden state where that run of blocks ends.
        ends = [k - 1 for k in kept[1:]] + [len(names) - 1]
        remove_blocks_(model, adapter, removed)
        metadata = {
            "removed": removed,
            "teacher_targets": [names[i] for i in ends],
            "student_blocks": _block_names(adapter, model),
            "block_influence": [round(s, 6) for s in scores] if scores else None,
        }
        return model, metadata

    def _width(self, model, adapter, config: PruneConfig, ctx: StageContext):
        total = sum(p.numel() for p in model.parameters())
        head_fraction, ffn_fraction = uniform_width_fractions(adapter, model, config.ratio)
        importance = config.width.importance if config.width else "l2"
        width_prune_(model, adapter, ctx.calibration, head_fraction, ffn_fraction, importance)
        names = _block_names(adapter, model)
        after = sum(p.numel() for p in model.parameters())
        return model, {
            "removed": [], "student_blocks": names, "teacher_targets": names,
            "width": width_record(model, adapter, ctx.teacher.model, ctx.teacher.adapter, list(range(len(names)))),
            "head_fraction": round(head_fraction, 4), "ffn_fraction": round(ffn_fraction, 4),
            "importance": importance,
            "parameter_ratio": round(after / total, 4),
        }

    # -- PPCL ------------------------------------------------------------------------
    def _ppcl(self, model, adapter, config: PruneConfig, ctx: StageContext):
        from .ppcl import ContiguousLayerObjective, PluggableSupernet, costs_to_json, make_plans, plan_to_json, \
            run_map

        names = _block_names(adapter, model)
        groups = [g.attr for g, _, _ in adapter.blocks(model)]
        protected = _protected(adapter, model)
        ratios = config.all_ratios()
        savings = {r: round(r * len(names)) for r in ratios}
        order = sorted(savings.values())
        zero = [r for r, s in savings.items() if s == 0]
        if zero:
            raise RecipeError(f"prune.ratio: {zero[0]} of {len(names)} blocks removes no block")
        if len(set(savings.values())) != len(savings):
            raise RecipeError(f"prune.ratios: {ratios} round to the same block counts {list(savings.values())} "
                              f"for {len(names)} blocks")
        allowed = None
        if config.intervals:
            bad = [iv for iv in config.intervals if not 0 <= iv[0] < iv[1] < len(names)]
            if bad:
                raise RecipeError(f"prune.intervals: {bad[0]} is outside blocks 0..{len(names) - 1}")
            allowed = [tuple(iv) for iv in config.intervals]
        log.info("ppcl: probing %d blocks for redundant runs", len(names))
        # streamed through disk (one or two layers in memory at a time), by every process for itself
        shards = process_local(ctx.work_dir / "boundary-states")
        states = boundary_states(model, adapter, ctx.calibration, folder=shards)
        plans, costs = make_plans(states, groups, protected, order, config.max_interval, allowed)
        analysis = analyse_states(states, model, adapter).to_json()
        del states
        shutil.rmtree(shards, ignore_errors=True)

        width = config.width
        if width and (width.heads or width.ffn):
            log.info("ppcl: width pruning (heads %.0f%%, FFN %.0f%%, %s)", 100 * width.heads, 100 * width.ffn,
                     width.importance)
            width_prune_(model, adapter, ctx.calibration, width.heads, width.ffn, width.importance)
        supernet = PluggableSupernet(model, adapter, [plans[s] for s in order])
        supernet.requires_grad_(True)
        objective = ContiguousLayerObjective(adapter, supernet, config.contiguous_weight,
                                             config.recover.feature_weight)
        training = Distiller(ctx.teacher.model, supernet, ctx.teacher.adapter, ctx.calibration, config.recover,
                             ctx.work_dir, desc="ppcl distill", objective=objective).run()
        supernet.eval().requires_grad_(False)

        def adapter_for(m):
            return ctx.teacher.with_model(m).adapter

        shared = {"interval_costs": costs_to_json(costs), "ratios": ratios,
                  "width_config": width.model_dump() if width else None}
        result = None
        for r in ratios:
            plan = plans[savings[r]]
            deployed, removed = supernet.deploy(plan, adapter_for)
            d_adapter = adapter_for(deployed)
            sources = [i for i in range(len(names)) if i not in removed]
            student_names = _block_names(d_adapter, deployed)
            pairs = run_map(plan, names, student_names)
            metadata = {
                "ratio": r, "intervals": plan_to_json(plan), "removed": removed,
                "student_blocks": student_names, "teacher_targets": [t for _, t in pairs],
                "width": width_record(deployed, d_adapter, ctx.teacher.model, ctx.teacher.adapter, sources),
                **shared,
            }
            if r == config.ratio:
                result = (deployed, {**metadata, "analysis": analysis, "training": training})
            elif ctx.save_variant is not None:
                ctx.save_variant(f"ratio-{r:g}", deployed, metadata)
        return result

    def restore(self, model, config, metadata, adapter):
        remove_blocks_(model, adapter, metadata["removed"])
        if metadata.get("width"):
            replay_width_(model, metadata["width"])
        return model

    def pictures(self, metadata, out, prefix):
        if not metadata.get("analysis"):
            return {}
        from ...probes.redundancy import plot_analysis

        name = f"analysis-{prefix}.png"
        plot_analysis(metadata["analysis"], out / name, [iv[:2] for iv in metadata.get("intervals", [])])
        return {"analysis": name}

    def report_lines(self, metadata, pictures):
        if "analysis" not in pictures:
            return []
        costs = {tuple(c["blocks"]): c["cost"] for c in metadata.get("interval_costs", [])}
        return ["", "## Redundancy analysis (prune)", "",
                "Teacher hidden states at block boundaries on calibration inputs across timesteps: "
                "cosine and linear CKA of each block's input and output, linear-probe R², the "
                "first-order differential of CKA, and the CKA matrix. Shaded: flat high-similarity "
                "intervals; dashed: the runs this plan collapsed.", "",
                f"![analysis]({pictures['analysis']})", "",
                "| run collapsed | into block | probe cost (1 - R²) |", "|---|---|---|",
                *[f"| {a}..{b} | {anchor} | {costs.get((a, b), 'n/a')} |"
                  for a, b, anchor in metadata.get("intervals", [])]]

    def layer_map(self, metadata):
        return list(zip(metadata["student_blocks"], metadata["teacher_targets"]))
