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
from .width import QKV, attention_modules, ffn_inputs, require_width_support, width_prune_

__all__ = ["PruneStage", "remove_blocks_", "uniform_width_fractions"]

log = logging.getLogger("dit_compress")

ALL_FAMILIES = ("dit", "pixart", "sd3", "flux", "sana")
# Torch-Pruning traces softmax attention and FeedForward FFNs only (`width.unsupported` says why not
# Flux: rotary embedding, fused single blocks; nor Sana: linear attention, convolutional FFN).
WIDTH_FAMILIES = ("dit", "pixart", "sd3")
# PPCL's FFN maps replace diffusers FeedForward modules (Flux: double blocks'; Sana's FFN is convolutional).
FFN_LINEAR_FAMILIES = ("dit", "pixart", "sd3", "flux")


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
    require_width_support(adapter, model)  # else the arithmetic below runs on layers it cannot prune
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
        if config.replace_ffn:
            return FFN_LINEAR_FAMILIES
        return WIDTH_FAMILIES if uses_width else ALL_FAMILIES

    def adapter_allowed(self, config: PruneConfig) -> bool:
        return config.method not in ("ppcl", "ppcl-hybrid")  # their distillation trains the new blocks

    def is_stock(self, plan: dict) -> bool:
        return not plan.get("width") and not plan.get("ffn")

    # -- plan ------------------------------------------------------------------------
    def plan(self, model, adapter, calibration, config: PruneConfig, ctx: StageContext) -> Plan:
        if config.method == "ppcl":
            return self._plan_ppcl(model, adapter, calibration, config, ctx)
        if config.method == "ppcl-hybrid":
            return self._plan_hybrid(model, adapter, calibration, config, ctx)
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

    def _block_counts(self, names: list[str], config: PruneConfig) -> dict[float, int]:
        savings = {r: round(r * len(names)) for r in config.all_ratios()}
        zero = [r for r, s in savings.items() if s == 0]
        if zero:
            raise RecipeError(f"prune.ratio: {zero[0]} of {len(names)} blocks removes no block")
        if len(set(savings.values())) != len(savings):
            raise RecipeError(f"prune.ratios: {sorted(savings)} round to the same block counts "
                              f"{list(savings.values())} for {len(names)} blocks")
        return savings

    def _allowed(self, names: list[str], config: PruneConfig) -> list[tuple[int, int]] | None:
        if not config.intervals:
            return None
        bad = [iv for iv in config.intervals if not 0 <= iv[0] < iv[1] < len(names)]
        if bad:
            raise RecipeError(f"prune.intervals: {bad[0]} is outside blocks 0..{len(names) - 1}")
        return [tuple(iv) for iv in config.intervals]

    def _states(self, model, adapter, calib, ctx: StageContext):
        log.info("ppcl: probing %d blocks for redundant intervals", len(block_names(adapter, model)))
        # streamed through disk (one or two layers in memory at a time), by every process for itself
        shards = process_local(ctx.work_dir / "boundary-states")
        return boundary_states(model, adapter, calib, folder=shards), shards

    def _plan_ppcl(self, model, adapter, calib, config: PruneConfig, ctx: StageContext) -> Plan:
        from .ffn_linear import ffn_modules, ffn_shape, fit_ffns
        from .intervals import candidate_costs, plan_to_json, proxy_curves, select_intervals

        names = block_names(adapter, model)
        groups = [g.attr for g, _, _ in adapter.blocks(model)]
        protected = protected_indices(adapter, model)
        savings = self._block_counts(names, config)
        allowed = self._allowed(names, config)
        longest = max([config.longest_interval()] + [b - a + 1 for a, b in allowed or []])
        states, shards = self._states(model, adapter, calib, ctx)
        curves = proxy_curves(states, groups, longest)
        costs = candidate_costs(curves, protected, config.turn)
        if allowed is not None:  # the user's intervals, costed by their proxies
            costs = {(a, b): max(0.0, 1.0 - curves.cka[a][b - a]) for a, b in allowed
                     if b - a < len(curves.cka[a]) and len(protected & set(range(a, b + 1))) <= 1}
        order, plugs = select_intervals(costs, len(names), list(savings.values()), protected)
        analysis = analyse_states(states, model, adapter).to_json()
        del states
        shutil.rmtree(shards, ignore_errors=True)
        plugs = {f"{r:g}": plugs[savings[r]] for r in config.all_ratios()}
        ffn, init, errors = {}, {}, {}
        if config.replace_ffn:
            inside = {i for iv in order for i in iv.blocks()}
            every = ffn_modules(adapter, model)
            outside = ffn_modules(adapter, model, set(range(len(names))) - inside)
            n = round(config.replace_ffn * len(every))
            if n > len(outside):
                raise RecipeError(f"prune.replace_ffn: {n} of {len(every)} FFNs asked for, but only "
                                  f"{len(outside)} lie outside the collapsed intervals")
            log.info("ppcl: fitting least-squares maps for %d FFNs", len(outside))
            fits = fit_ffns(model, adapter, calib, list(outside))
            errors = {p: round(f["error"], 6) for p, f in fits.items()}
            for path in sorted(fits, key=lambda p: (fits[p]["error"], p))[:n]:
                ffn[path] = list(ffn_shape(outside[path]))
                init[f"{path}.weight"], init[f"{path}.bias"] = fits[path]["weight"], fits[path]["bias"]
        choices = {"ratios": config.all_ratios(), "names": names, "intervals": plan_to_json(order),
                   "plugs": plugs, "ffn": ffn}
        return Plan(choices, init, notes={"proxy_cka": curves.to_json(), "analysis": analysis,
                                          "interval_costs": [{"blocks": list(k), "cost": round(v, 6)}
                                                             for k, v in sorted(costs.items())],
                                          "ffn_errors": errors, "turn": config.turn})

    def _plan_hybrid(self, model, adapter, calib, config: PruneConfig, ctx: StageContext) -> Plan:
        from .hybrid import costs_to_json, make_plans
        from .intervals import plan_to_json

        names = block_names(adapter, model)
        groups = [g.attr for g, _, _ in adapter.blocks(model)]
        protected = protected_indices(adapter, model)
        ratios = config.all_ratios()
        savings = self._block_counts(names, config)
        allowed = self._allowed(names, config)
        states, shards = self._states(model, adapter, calib, ctx)
        plans, costs = make_plans(states, groups, protected, sorted(savings.values()), config.longest_interval(),
                                  allowed)
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
        deployed = "ratio" in plan.choices  # a finished PPCL student (restore), not its training
        if config.method == "ppcl" and not deployed:
            from .ffn_linear import replace_ffns_
            from .intervals import plan_from_json
            from .ppcl import PPCLStudent

            replace_ffns_(model, plan["ffn"], plan.init or None)
            names = plan["names"]
            ffn_blocks = sorted({names.index(p.rpartition(".")[0]) for p in plan["ffn"]})
            return PPCLStudent(model, adapter, plan_from_json(plan["intervals"]), ffn_blocks)
        if config.method == "ppcl-hybrid" and not deployed:
            from .hybrid import PluggableSupernet
            from .intervals import plan_from_json

            # ratios in the order of the blocks they remove (the training schedule's weights)
            plans = sorted((plan_from_json(p) for p in plan["plans"].values()), key=lambda p: sum(iv.saves for iv in p))
            return PluggableSupernet(model, adapter, plans)
        remove_blocks_(model, adapter, plan["removed"])
        if plan.get("ffn_deployed"):
            from .ffn_linear import replace_ffns_

            replace_ffns_(model, plan["ffn_deployed"])
        return model

    # -- training --------------------------------------------------------------------
    def phases(self, config: PruneConfig, plan: Plan, adapter) -> list[Phase]:
        if config.recover is None:
            return []
        if config.method == "ppcl":
            from .ppcl import ContiguousLayerDistillation

            trainable = ["replacements.*", *[f"model.{p}.*" for p in plan["ffn"]]]
            return [Phase("ppcl", config.recover, lambda teacher_adapter, student: ContiguousLayerDistillation(
                teacher_adapter, student), trainable=trainable)]
        if config.method == "ppcl-hybrid":
            from .hybrid import ContiguousLayerObjective

            return [Phase("ppcl-hybrid", config.recover, lambda teacher_adapter, supernet: ContiguousLayerObjective(
                teacher_adapter, supernet, config.block_weight(), config.recover.feature_weight))]
        return [Phase("recover", config.recover, layer_map=self.layer_map(plan.choices))]

    def finish(self, model, adapter, ctx: StageContext, config: PruneConfig, plan: Plan):
        if config.method not in ("ppcl", "ppcl-hybrid"):
            return model, plan.choices, {}
        from .intervals import plan_from_json, run_map

        def adapter_for(m):
            return ctx.teacher.with_model(m).adapter

        names = plan["names"]
        result = None
        for r in plan["ratios"]:
            if config.method == "ppcl":
                keys = plan["plugs"][f"{r:g}"]
                intervals = [iv for iv in plan_from_json(plan["intervals"]) if iv.key in keys]
                extra = {"plugged": keys}
            else:
                intervals = plan_from_json(plan["plans"][f"{r:g}"])
                extra = {"intervals": plan["plans"][f"{r:g}"]}
            deployed, removed = model.deploy(intervals, adapter_for)
            pairs = run_map(intervals, names, block_names(adapter_for(deployed), deployed))
            if plan.get("ffn"):
                extra["ffn_deployed"] = deployed_paths(plan["ffn"], names, removed)
            choices = {**plan.choices, **extra, "ratio": r, "removed": removed,
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

    def _chosen(self, summary) -> list[list[int]]:
        plugged = summary.get("plugged")
        return [iv[:2] for iv in summary.get("intervals", []) if plugged is None or f"{iv[0]}-{iv[1]}" in plugged]

    def pictures(self, summary, out, prefix):
        pictures = {}
        if summary.get("analysis"):
            from ...probes.redundancy import plot_analysis

            pictures["analysis"] = f"analysis-{prefix}.png"
            plot_analysis(summary["analysis"], out / pictures["analysis"], self._chosen(summary))
        if summary.get("proxy_cka"):
            from .intervals import ProxyCurves, plot_search

            pictures["search"] = f"ppcl-search-{prefix}.png"
            plot_search(ProxyCurves.from_json(summary["proxy_cka"]), self._chosen(summary), summary["turn"],
                        summary["analysis"]["block_names"], out / pictures["search"])
        return pictures

    def report_lines(self, summary, pictures):
        if "analysis" not in pictures:
            return []
        costs = {tuple(c["blocks"]): c["cost"] for c in summary.get("interval_costs", [])}
        lines = ["", "## Redundancy analysis (prune)", ""]
        if "search" in pictures:
            plugged = summary.get("plugged") or []
            lines += ["PPCL's search: a residual linear probe per block, the proxy that replaces blocks u..k "
                      "by their probes, its linear CKA against the teacher after block k, and the CKA's "
                      f"first-order differential; a drop above {summary['turn']:g} ends an interval.", "",
                      f"![search]({pictures['search']})", "",
                      "| interval | into block | CKA lost (1 - CKA) | plugged in this model |", "|---|---|---|---|",
                      *[f"| {a}..{b} | {anchor} | {costs.get((a, b), 'n/a')} | {'yes' if f'{a}-{b}' in plugged else 'no'} |"
                        for a, b, anchor in summary.get("intervals", [])], ""]
            if summary.get("ffn"):
                errors = summary.get("ffn_errors", {})
                lines += ["FFNs replaced by least-squares linear maps (relative error of the fit):", "",
                          *[f"- `{p}`: {errors.get(p, 'n/a')}" for p in summary["ffn"]], ""]
        lines += ["Teacher hidden states at block boundaries on calibration inputs across timesteps: "
                  "cosine and linear CKA of each block's input and output, linear-probe R², the "
                  "first-order differential of CKA, and the CKA matrix. Shaded: flat high-similarity "
                  "intervals; dashed: the intervals this model collapsed.", "",
                  f"![analysis]({pictures['analysis']})", ""]
        if "search" not in pictures:
            lines += ["| run collapsed | into block | probe cost (1 - R²) |", "|---|---|---|",
                      *[f"| {a}..{b} | {anchor} | {costs.get((a, b), 'n/a')} |"
                        for a, b, anchor in summary.get("intervals", [])]]
        return lines

    def layer_map(self, plan):
        return list(zip(plan["student_blocks"], plan["teacher_targets"]))


def deployed_paths(ffn: dict[str, list[int]], names: list[str], removed: list[int]) -> dict[str, list[int]]:
    """FFN paths renamed for the model with `removed` blocks gone (block indices shift down)."""
    out = {}
    for path, shape in ffn.items():
        block, _, sub = path.rpartition(".")
        i = names.index(block)
        group = block.rpartition(".")[0]
        j = sum(1 for k, n in enumerate(names[:i]) if n.rpartition(".")[0] == group and k not in removed)
        out[f"{group}.{j}.{sub}"] = shape
    return out
