"""The `moe` stage: Dense2MoE's FFN -> mixture of experts with its distillation.

Plan: Taylor scores on calibration data split each FFN's neurons into a shared expert and
routed experts (the neuron indices are the plan), and a router fitted by ridge regression is
its initial value (`Plan.init`). Every FFN converts, Flux single blocks' fused MLPs included
(`fused.py`). Build: the MoE layers holding exactly the dense weights.
Phases (schedule `paper`, the default): "shared", the shared experts alone run and train
(output MSE + block features); "experts", the shared experts frozen, routed experts and routers
train (output MSE + block features + load balance, 0.01). Schedule `joint`: one phase, every
parameter, load balance 0.05. Finish: the expert load, and activated parameters counted over
every FFN of the model, converted or not.
The result keeps every parameter (capacity) but runs only shared + top_k experts per token.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ...core.stage import Phase, Plan, Stage, StageContext, seed_of, seeded
from ...data.calibration import CalibrationSet
from ...fileio import save_figure
from ...models.families import FamilyAdapter
from ...train.distill import OutputFeatureObjective
from .config import MoEConfig
from .convert import build_moe, dense_ffn_at, dense_ffns, ffn_parameters, record_ffns, replace_module_, split_neurons
from .fused import separate_mlp_
from .layer import MoEFeedForward

log = logging.getLogger("dit_compress")

SHARED = ("shared_up.weight", "shared_up.bias", "shared_down.weight", "shared_down.bias")
ROUTED = ("up_weight", "up_bias", "down_weight", "router.weight", "router.bias")


def moe_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEFeedForward)}


class MoEObjective(OutputFeatureObjective):
    """Output + block-feature distillation, plus `balance_weight` x mean load-balancing loss."""

    def __init__(self, adapter, layer_map, feature_weight: float, balance_weight: float):
        super().__init__(adapter, layer_map, feature_weight)
        self.balance_weight = balance_weight

    def describe(self):
        return f"{super().describe()} balance {self.balance_weight}"

    def attach(self, teacher, student):
        super().attach(teacher, student)
        self.layers = list(moe_layers(student).values())
        for m in self.layers:
            m.track = True

    def loss(self, step, batch, teacher, student):
        loss, out_loss = super().loss(step, batch, teacher, student)
        if self.balance_weight > 0:
            loss = loss + self.balance_weight * torch.stack([m.balance_loss() for m in self.layers]).mean()
        return loss, out_loss

    def close(self):
        super().close()
        for m in self.layers:
            m.track = False


class SharedExpertObjective(OutputFeatureObjective):
    """The paper's first stage: output + block-feature distillation with only the shared experts running."""

    def describe(self):
        return f"shared experts only; {super().describe()}"

    def attach(self, teacher, student):
        super().attach(teacher, student)
        self.layers = list(moe_layers(student).values())
        for m in self.layers:
            m.shared_only = True

    def close(self):
        super().close()
        for m in self.layers:
            m.shared_only = False


@torch.no_grad()
def expert_load(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, batches: int = 8,
                batch_size: int = 64) -> dict[str, list[float]]:
    """Share of routed token slots each expert receives on calibration inputs, per MoE layer."""
    layers = moe_layers(model)
    counts = {n: torch.zeros(m.num_experts) for n, m in layers.items()}
    for m in layers.values():
        m.track = True
    try:
        for k in range(batches):
            b = calib.batch(calib.stream("moe/expert-load") + k, batch_size)
            adapter.denoise(model, b.x_t, b.t, b.cond)
            for n, m in layers.items():
                counts[n] += m.last_counts.float()
    finally:
        for m in layers.values():
            m.track = False
    return {n: [round(v, 5) for v in (c / c.sum()).tolist()] for n, c in counts.items()}


def activation_stats(model: nn.Module, notes: dict) -> dict:
    """Parameters that exist vs parameters one token activates: the whole model, and every FFN of it
    (the FFNs this stage left dense count in full)."""
    layers = moe_layers(model).values()
    total = sum(p.numel() for p in model.parameters())
    moe_total = sum(sum(p.numel() for p in m.parameters()) for m in layers)
    moe_active = sum(m.activated_parameters() for m in layers)
    ffn_active = moe_active + notes["ffn_unconverted_parameters"]
    active = total - moe_total + moe_active
    return {"parameters": total, "activated_parameters": int(active), "activated_ratio": round(active / total, 4),
            "ffn_dense_parameters": notes["ffn_dense_parameters"], "ffn_activated_parameters": ffn_active,
            "ffn_activated_ratio": round(ffn_active / notes["ffn_dense_parameters"], 4),
            "ffns": notes["ffns"], "ffns_converted": notes["ffns_converted"]}


def _block_pairs(adapter: FamilyAdapter, model: nn.Module) -> list[tuple[str, str]]:
    blocks = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
    return list(zip(blocks, blocks))


class MoEStage(Stage):
    name = "moe"
    config_cls = MoEConfig
    families = ("dit", "pixart", "sd3", "flux")  # Sana's FFN is a convolutional GLU

    def is_stock(self, plan: dict) -> bool:
        return False

    def plan(self, model, adapter, calibration, config: MoEConfig, ctx: StageContext) -> Plan:
        ffns = dense_ffns(model, adapter, config.targets)
        counts = ffn_parameters(model, adapter)  # every FFN, before conversion
        log.info("moe: Taylor scores and router fit on %d of %d FFNs", len(ffns), len(counts))
        stats = record_ffns(model, adapter, calibration, ffns, batches=config.taylor_batches)
        splits, init = {}, {}
        for path, ffn in ffns.items():
            split = split_neurons(stats[path], config.segments, config.shared_segments)
            splits[path] = {**split, "top_k": config.top_k, **({"fused": True} if ffn.fused else {})}
            router = build_moe(ffn, split, config.top_k, stats[path]).router  # the fitted initial router
            init[f"{path}.router.weight"], init[f"{path}.router.bias"] = router.weight.detach(), router.bias.detach()
        notes = {"ffn_dense_parameters": sum(total for total, _ in counts.values()),
                 "ffn_unconverted_parameters": sum(active for path, (_, active) in counts.items() if path not in ffns),
                 "ffns": len(counts), "ffns_converted": len(ffns)}
        return Plan({"moe": splits}, init, notes)

    def build(self, model, adapter, config: MoEConfig, plan: Plan):
        with seeded(seed_of(self.name, sorted(plan["moe"]))):  # the router's fresh init, replaced below
            for path, split in plan["moe"].items():
                fused = split.get("fused", False)
                moe = build_moe(dense_ffn_at(model, path, fused), split, split["top_k"])
                if fused:  # a Flux single block: proj_out keeps only the attention columns
                    separate_mlp_(model.get_submodule(path.rpartition(".")[0]), moe)
                else:
                    replace_module_(model, path, moe)
        if plan.init:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in plan.init:
                        p.copy_(plan.init[name])
        return model

    def inspect(self, model, adapter, ctx, config, plan):
        error = _relative_error(ctx, model, adapter)
        log.info("moe: relative output error right after conversion %.4f", error)
        return {"conversion_error": error}

    def phases(self, config: MoEConfig, plan: Plan, adapter) -> list[Phase]:
        if config.recover is None:
            return []
        recover, balance = config.recover, config.balance

        def experts(teacher_adapter, student):
            return MoEObjective(teacher_adapter, _block_pairs(teacher_adapter, student), recover.feature_weight,
                                balance)
        if config.schedule == "joint":
            return [Phase("distill", recover, experts)]
        first = config.shared_recover or recover

        def shared(teacher_adapter, student):
            return SharedExpertObjective(teacher_adapter, _block_pairs(teacher_adapter, student),
                                         first.feature_weight)
        paths = list(plan["moe"])
        return [Phase("shared", first, shared, trainable=[f"{p}.{n}" for p in paths for n in SHARED]),
                Phase("experts", recover, experts, trainable=[f"{p}.{n}" for p in paths for n in ROUTED])]

    def finish(self, model, adapter, ctx, config, plan):
        load = expert_load(model, adapter, ctx.calibration)
        return model, plan.choices, {
            "activation": activation_stats(model, plan.notes),
            "expert_load": load,
            "max_load_over_fair": round(max(max(v) * len(v) for v in load.values()), 4)}

    def summary(self, config, plan, stats):
        moe = {path: {"shared": len(s["shared"]), "experts": len(s["experts"]), "expert_size": len(s["experts"][0]),
                      "top_k": s["top_k"]} for path, s in plan["moe"].items()}
        notes = ("ffn_dense_parameters", "ffn_unconverted_parameters", "ffns", "ffns_converted")
        return {"moe": moe, **{k: v for k, v in stats.items() if k not in notes}}

    def layer_map(self, plan):
        return []  # same block structure as the teacher: the stage matches blocks itself

    def pictures(self, summary, out, prefix):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        load = summary["expert_load"]
        names = list(load)
        shares = torch.tensor([load[n] for n in names]) * len(load[names[0]])  # 1.0 = fair share
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.3 * len(names) + 1.8),
                                   gridspec_kw={"width_ratios": [3, 2]})
        im = a.imshow(shares.numpy(), aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        a.set_yticks(range(len(names)), [n.replace("transformer_blocks", "blk") for n in names], fontsize=7)
        a.set_xlabel("expert")
        a.set_title("token share / fair share (1 = balanced)", fontsize=9)
        fig.colorbar(im, ax=a)
        b.barh(range(len(names)), shares.max(dim=1).values.numpy())
        b.axvline(2.0, color="red", linestyle="--", label="2x fair share")
        b.invert_yaxis()
        b.set_yticks([])
        b.set_title("busiest expert per layer", fontsize=9)
        b.legend(fontsize=7)
        fig.tight_layout()
        name = f"expert-load-{prefix}.png"
        save_figure(fig, out / name)
        plt.close(fig)
        return {"expert_load": name}

    def report_lines(self, summary, pictures):
        act = summary["activation"]
        return ["", "## Mixture of experts (moe)", "",
                f"{act['ffns_converted']} of the model's {act['ffns']} FFNs converted; per token "
                f"{act['ffn_activated_parameters']:,} of {act['ffn_dense_parameters']:,} FFN parameters run, every "
                f"FFN counted, converted or not (**{act['ffn_activated_ratio']}**); whole model: "
                f"{act['activated_parameters']:,} activated of {act['parameters']:,} "
                f"(**{act['activated_ratio']}**). Relative output "
                f"error right after conversion, before distillation: {summary['conversion_error']}. Busiest "
                f"expert: {summary['max_load_over_fair']}x its fair share of tokens on calibration inputs.", "",
                *([f"![expert load]({pictures['expert_load']})"] if "expert_load" in pictures else [])]


@torch.no_grad()
def _relative_error(ctx: StageContext, model: nn.Module, adapter: FamilyAdapter) -> float:
    b = ctx.calibration.batch(ctx.calibration.stream("moe/conversion-error"), 64)
    ref = ctx.teacher.adapter.denoise(ctx.teacher.model, b.x_t, b.t, b.cond)
    got = adapter.denoise(model, b.x_t, b.t, b.cond)
    return round(((got - ref).norm() / ref.norm()).item(), 5)
