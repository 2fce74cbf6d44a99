"""The `prune` stage: PPCL, and the depth / width baselines it is measured against.

Plan: the removed blocks (depth), the kept channels and heads (width), or the runs each ratio
collapses (PPCL), with the width pruning's kept channels. Build: that surgery; for PPCL on a plan
without a deployed ratio, the pluggable supernet that one distillation trains for every ratio.
Finish (PPCL): deploy every ratio, the main one recorded in the plan, the others as variants.
"""

from __future__ import annotations

import logging
import shutil

import torch.nn as nn

from ...core.processes import process_local
from ...core.stage import Phase, Plan, Stage, StageContext
from ...errors import RecipeError
from ...models.families import FamilyAdapter
from ...probes.boundaries import block_influence, boundary_states
from ...probes.redundancy import analyse_states
from .config import PruneConfig
from .depth import remove_blocks_
from .surgery import block_names, protected_indices, slice_width_, width_choices
from .width import QKV, attention_modules, ffn_inputs, width_prune_

__all__ = ["PruneStage", "remove_blocks_", "uniform_width_fractions"]

log = logging.getLogger("dit_compress")

ALL_FAMILIES = ("dit", "pixart", "sd3", "flux", "sana")
# Torch-Pruning traces softmax attention and FeedForward FFNs only (`width.unsupported` says why not
# Flux: rotary embedding, fused single blocks; nor Sana: linear attention, convolutional FFN).
WIDTH_FAMILIES = ("dit", "pixart", "sd3")


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


def _width(model, adapter, calib, heads: float, ffn: float, importance: str) -> dict:
    return width_choices(model, lambda m: width_prune_(m, adapter, calib, heads, ffn, importance))


class PruneStage(Stage):
    name = "prune"
    config_cls = PruneConfig
    families = ALL_FAMILIES

    def supported_families(self, config: PruneConfig):
        uses_width = config.method == "width" or (config.width is not None and (config.width.heads or config.width.ffn))
        return WIDTH_FAMILIES if uses_width else ALL_FAMILIES

    def adapter_allowed(self, config: PruneConfig) -> bool:
        return config.method != "ppcl"  # PPCL's distillation trains its new replacement blocks

    def is_stock(self, plan: dict) -> bool:
        return not plan.get("width")

    # -- plan ------------------------------------------------------------------------
    def plan(self, model, adapter, calibration, config: PruneConfig, ctx: StageContext) -> Plan:
        if config.method == "ppcl":
            return self._plan_ppcl(model, adapter, calibration, config, ctx)
        if config.method == "width":
            return self._plan_width(model, adapter, calibration, config)
        return self._plan_depth(model, adapter, calibration, config)

    def _plan_depth(self, model, adapter, calib, config: PruneConfig) -> Plan:
        names = block_names(adapter, model)
        protected = protected_indices(adapter, model)
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
                scores = block_influence(model, adapter, calib)
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
        groups = [g.attr for g, _, _ in adapter.blocks(model)]
        student = [f"{groups[i]}.{sum(groups[k] == groups[i] for k in kept[:j])}" for j, i in enumerate(kept)]
        choices = {"removed": removed, "teacher_targets": [names[i] for i in ends], "student_blocks": student}
        return Plan(choices, notes={"block_influence": [round(s, 6) for s in scores] if scores else None})

    def _plan_width(self, model, adapter, calib, config: PruneConfig) -> Plan:
        total = sum(p.numel() for p in model.parameters())
        head_fraction, ffn_fraction = uniform_width_fractions(adapter, model, config.ratio)
        importance = config.width.importance if config.width else "l2"
        width = _width(model, adapter, calib, head_fraction, ffn_fraction, importance)
        removed = sum(p.numel() for n, p in model.named_parameters() if n in width["keep"])
        kept = sum(len(kept) * p.numel() // p.shape[dim]
                   for n, p in model.named_parameters() if n in width["keep"] for dim, kept in [width["keep"][n]])
        names = block_names(adapter, model)
        return Plan({"removed": [], "student_blocks": names, "teacher_targets": names, "width": width,
                     "head_fraction": round(head_fraction, 4), "ffn_fraction": round(ffn_fraction, 4),
                     "importance": importance},
                    notes={"parameter_ratio": round((total - removed + kept) / total, 4)})

    def _plan_ppcl(self, model, adapter, calib, config: PruneConfig, ctx: StageContext) -> Plan:
        from .ppcl import costs_to_json, make_plans, plan_to_json

        names = block_names(adapter, model)
        groups = [g.attr for g, _, _ in adapter.blocks(model)]
        protected = protected_indices(adapter, model)
        ratios = config.all_ratios()
        savings = {r: round(r * len(names)) for r in ratios}
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
        states = boundary_states(model, adapter, calib, folder=shards)
        plans, costs = make_plans(states, groups, protected, sorted(savings.values()), config.max_interval, allowed)
        analysis = analyse_states(states, model, adapter).to_json()
        del states
        shutil.rmtree(shards, ignore_errors=True)
        width = config.width
        record = None
        if width and (width.heads or width.ffn):
            log.info("ppcl: width pruning (heads %.0f%%, FFN %.0f%%, %s)", 100 * width.heads, 100 * width.ffn,
                     width.importance)
            record = _width(model, adapter, calib, width.heads, width.ffn, width.importance)
        choices = {"ratios": ratios, "names": names,
                   "plans": {f"{r:g}": plan_to_json(plans[savings[r]]) for r in ratios},
                   "width": record, "width_config": width.model_dump() if width else None}
        return Plan(choices, notes={"interval_costs": costs_to_json(costs), "analysis": analysis})

    # -- build -----------------------------------------------------------------------
    def build(self, model, adapter, config: PruneConfig, plan: Plan):
        if plan.get("width"):
            slice_width_(model, plan["width"])
        if config.method == "ppcl" and "ratio" not in plan.choices:
            from .ppcl import PluggableSupernet, plan_from_json

            # ratios in the order of the blocks they remove (the training schedule's weights)
            plans = sorted((plan_from_json(p) for p in plan["plans"].values()), key=lambda p: sum(iv.saves for iv in p))
            return PluggableSupernet(model, adapter, plans)
        remove_blocks_(model, adapter, plan["removed"])
        return model

    # -- training --------------------------------------------------------------------
    def phases(self, config: PruneConfig, plan: Plan, adapter) -> list[Phase]:
        if config.recover is None:
            return []
        if config.method == "ppcl":
            from .ppcl import ContiguousLayerObjective

            return [Phase("ppcl", config.recover, lambda teacher_adapter, supernet: ContiguousLayerObjective(
                teacher_adapter, supernet, config.contiguous_weight, config.recover.feature_weight))]
        return [Phase("recover", config.recover, layer_map=self.layer_map(plan.choices))]

    def finish(self, model, adapter, ctx: StageContext, config: PruneConfig, plan: Plan):
        if config.method != "ppcl":
            return model, plan.choices, {}
        from .ppcl import plan_from_json, run_map

        def adapter_for(m):
            return ctx.teacher.with_model(m).adapter

        names = plan["names"]
        result = None
        for r in plan["ratios"]:
            intervals = plan_from_json(plan["plans"][f"{r:g}"])
            deployed, removed = model.deploy(intervals, adapter_for)
            pairs = run_map(intervals, names, block_names(adapter_for(deployed), deployed))
            choices = {**plan.choices, "ratio": r, "intervals": plan["plans"][f"{r:g}"], "removed": removed,
                       "student_blocks": [s for s, _ in pairs], "teacher_targets": [t for _, t in pairs]}
            if r == config.ratio:
                result = deployed, choices
            elif ctx.save_variant is not None:
                ctx.save_variant(f"ratio-{r:g}", deployed, choices)
        return result[0], result[1], {}

    # -- report ----------------------------------------------------------------------
    def summary(self, config: PruneConfig, plan: dict, stats: dict) -> dict:
        out = {k: v for k, v in plan.items() if k not in ("width", "plans", "names")}
        if plan.get("width"):
            out["width"] = {"heads": plan["width"]["heads"], "pruned_parameters": len(plan["width"]["keep"])}
        return {**out, **stats}

    def pictures(self, summary, out, prefix):
        if not summary.get("analysis"):
            return {}
        from ...probes.redundancy import plot_analysis

        name = f"analysis-{prefix}.png"
        plot_analysis(summary["analysis"], out / name, [iv[:2] for iv in summary.get("intervals", [])])
        return {"analysis": name}

    def report_lines(self, summary, pictures):
        if "analysis" not in pictures:
            return []
        costs = {tuple(c["blocks"]): c["cost"] for c in summary.get("interval_costs", [])}
        return ["", "## Redundancy analysis (prune)", "",
                "Teacher hidden states at block boundaries on calibration inputs across timesteps: "
                "cosine and linear CKA of each block's input and output, linear-probe R², the "
                "first-order differential of CKA, and the CKA matrix. Shaded: flat high-similarity "
                "intervals; dashed: the runs this plan collapsed.", "",
                f"![analysis]({pictures['analysis']})", "",
                "| run collapsed | into block | probe cost (1 - R²) |", "|---|---|---|",
                *[f"| {a}..{b} | {anchor} | {costs.get((a, b), 'n/a')} |"
                  for a, b, anchor in summary.get("intervals", [])]]

    def layer_map(self, plan):
        return list(zip(plan["student_blocks"], plan["teacher_targets"]))
