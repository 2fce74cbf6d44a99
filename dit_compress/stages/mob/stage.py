"""The `mob` stage: Mixture of Blocks, per sample (and so per timestep) only some blocks run.

Plan: the routed blocks of the first block list (protected blocks always run) in groups, the
router's inputs (the AdaLN embedding module and the widths of hidden state, condition and
embedding), and each router's initial bias, the blocks' Block Influence on calibration data
(`Plan.init`), so that before training every group keeps its most influential blocks. Build: the
routers and routed blocks (`blocks.py`). Phase: the paper's third stage, distillation on the group
feature loss (the hidden state at every group's end; `loss: output+group` adds output MSE).
Finish: how often each routed block ran, overall and by noise level.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...core.stage import Phase, Plan, Stage, StageContext, seed_of, seeded
from ...data.calibration import CalibrationSet
from ...errors import UnsupportedModelError
from ...models.families import FamilyAdapter
from ...probes.boundaries import block_influence, hidden_width
from ...probes.capture import Capture
from ...train.distill import OutputFeatureObjective
from ...fileio import save_figure
from .blocks import MixtureOfBlocks
from .config import MoBConfig

ROUTERS = "mob"  # the model attribute holding the routers


def _groups(plan: dict) -> list[list[int]]:
    routed, size = plan["routed"], plan["group_size"]
    return [routed[s:s + size] for s in range(0, len(routed), size)]


@torch.no_grad()
def block_activation(model: nn.Module, mob: MixtureOfBlocks, adapter: FamilyAdapter, calib: CalibrationSet,
                     batches: int = 8, batch_size: int = 64) -> tuple[dict[str, float], dict]:
    """Share of calibration samples each routed block runs for: overall, and per noise level (timestep
    terciles), since the router reads the noise level and may spend blocks differently across it."""
    ran, steps = [], []
    first = calib.stream("mob/block-activation")
    for k in range(batches):
        b = calib.batch(first + k, batch_size)
        adapter.denoise(model, b.x_t, b.t, b.cond)
        ran.append(mob.choices().float())
        steps.append(b.t.float().flatten())
    ran, steps = torch.cat(ran), torch.cat(steps)
    overall = {str(i): round(float(v), 4) for i, v in zip(mob.routed, ran.mean(0))}
    edges = torch.quantile(steps, torch.tensor([1 / 3, 2 / 3]))
    level = torch.bucketize(steps, edges)
    by_noise = {"timestep_edges": [round(float(e), 3) for e in edges],
                "rates": [[round(float(v), 4) for v in ran[level == q].mean(0)] for q in range(3)]}
    return overall, by_noise


class GroupFeatureObjective(OutputFeatureObjective):
    """The paper's third stage: the teacher-normalised MSE of the hidden state at every group's end,
    alone (so its weight is 1); the output MSE is measured and reported, not trained on."""

    def __init__(self, adapter: FamilyAdapter, layer_map: list[tuple[str, str]]):
        super().__init__(adapter, layer_map, feature_weight=1.0)

    def describe(self):
        return f"group features only; {super().describe()}"

    def loss(self, step, batch, teacher, student):
        _, out_loss = self.predictions(batch, teacher, student)
        return self.feature_loss(), out_loss


def router_inputs(model: nn.Module, adapter: FamilyAdapter, attr: str, first: int) -> dict:
    """What the adaln router reads at block `first` of `attr`: the AdaLN embedding module (the
    family's first timestep / condition embedding, which must run before the block), its width,
    and the width of the condition tokens the block receives (0: none, e.g. class-conditional DiT)."""
    embedding = adapter.layout(model).embedding[0]
    order, values = [], {}

    def keep(name, value):
        order.append(name)
        values.setdefault(name, value)
    with Capture({"embedding": model.get_submodule(embedding)}, at="output", on=keep), \
            Capture({"block": getattr(model, attr)[first]}, at="call", on=keep), torch.no_grad():
        adapter.denoise(model, *adapter.example_inputs(2))
    y = values.get("embedding")
    if not (torch.is_tensor(y) and y.dim() == 2 and "block" in order
            and order.index("embedding") < order.index("block")):
        raise UnsupportedModelError(f"{adapter.family}: {embedding} gives no per-sample embedding before block "
                                    f"{attr}.{first}; use router: hidden")
    context = values["block"][1].get("encoder_hidden_states")
    return {"embedding": embedding, "embedding_dim": int(y.shape[-1]),
            "context_dim": int(context.shape[-1]) if torch.is_tensor(context) else 0}


def _activated(module: nn.Module) -> int:
    """Parameters one token activates in a module (sparse layers, such as MoE FFNs, count their
    `activated_parameters()`)."""
    sparse = [m for m in module.modules() if hasattr(m, "activated_parameters")]
    inner = sum(sum(p.numel() for p in m.parameters()) - m.activated_parameters() for m in sparse)
    return sum(p.numel() for p in module.parameters()) - inner


class MoBStage(Stage):
    name = "mob"
    config_cls = MoBConfig
    families = ("dit", "pixart", "sd3", "flux")

    def is_stock(self, plan: dict) -> bool:
        return False

    def plan(self, model, adapter, calibration, config: MoBConfig, ctx: StageContext) -> Plan:
        group = adapter.block_groups[0]
        blocks = getattr(model, group.attr)
        protected = {i for attr, i in adapter.protected_blocks(model) if attr == group.attr}
        routed = [i for i in range(len(blocks)) if i not in protected]
        influence = block_influence(model, adapter, calibration, batches=2)[:len(blocks)]
        choices = {"attr": group.attr, "routed": routed, "group_size": config.group_size, "active": config.active,
                   "dim": hidden_width(model, adapter), "router": config.router}
        if config.router == "adaln":
            choices.update(router_inputs(model, adapter, group.attr, routed[0]), alpha=config.alpha)
        bias = "proj.bias" if config.router == "hidden" else "bias"
        init = {f"{ROUTERS}.routers.{k}.{bias}": torch.tensor([influence[i] for i in members])
                for k, members in enumerate(_groups(choices))}
        return Plan(choices, init, {"block_influence": [round(v, 6) for v in influence]})

    def build(self, model, adapter, config: MoBConfig, plan: Plan):
        router = plan.get("router", "hidden")  # plans recorded before the adaln router used the hidden one
        with seeded(seed_of(self.name, plan["routed"])):  # the routers' fresh init (the bias is replaced)
            mob = MixtureOfBlocks(plan["dim"], plan["routed"], plan["group_size"], plan["active"], router,
                                  plan.get("context_dim", 0), plan.get("embedding_dim", 0), plan.get("alpha", 0.5))
        if router == "adaln":  # the embedding module, before wrapping moves the blocks that hold it
            mob.tap_(model.get_submodule(plan["embedding"]))
        model.add_module(ROUTERS, mob)
        mob.wrap_(getattr(model, plan["attr"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in plan.init:
                    p.copy_(plan.init[name])
        return model

    def phases(self, config: MoBConfig, plan: Plan, adapter) -> list[Phase]:
        ends = [f"{plan['attr']}.{g[-1]}" for g in _groups(plan.choices)]
        pairs = list(zip(ends, ends))
        if config.loss == "output+group":
            return [Phase("distill", config.recover, layer_map=pairs)]
        return [Phase("distill", config.recover, lambda teacher_adapter, student: GroupFeatureObjective(
            teacher_adapter, pairs))]

    def finish(self, model, adapter, ctx, config, plan):
        mob = getattr(model, ROUTERS)
        rates, by_noise = block_activation(model, mob, adapter, ctx.calibration)
        blocks = getattr(model, plan["attr"])
        total = sum(p.numel() for p in model.parameters())
        active = _activated(model) - sum((1 - rate) * _activated(blocks[int(i)]) for i, rate in rates.items())
        return model, plan.choices, {
            "block_activation": rates, "block_activation_by_noise": by_noise,
            "block_activation_fraction": round(sum(rates.values()) / len(rates), 4),
            "activation": {"parameters": total, "activated_parameters": int(active)}}

    def summary(self, config, plan, stats):
        return {"mob": plan, **stats}

    def pictures(self, summary, out, prefix):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        blocks = list(summary["block_activation"])
        noise = summary["block_activation_by_noise"]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(blocks) + 2), 3.2))
        width = 0.2
        x = torch.arange(len(blocks)).float()
        labels = ["low noise", "mid noise", "high noise"]
        for q, rates in enumerate(noise["rates"]):
            ax.bar((x + (q - 1.5) * width).numpy(), rates, width, label=labels[q])
        ax.bar((x + 1.5 * width).numpy(), list(summary["block_activation"].values()), width, color="black",
               label="all")
        ax.axhline(summary["block_activation_fraction"], color="red", linestyle="--", linewidth=1,
                   label=f"mean {summary['block_activation_fraction']:.2f}")
        ax.set_xticks(x.numpy(), blocks)
        ax.set_xlabel("routed block")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of samples it ran for")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        name = f"block-activation-{prefix}.png"
        save_figure(fig, out / name)
        plt.close(fig)
        return {"block_activation": name}

    def report_lines(self, summary, pictures):
        mob, act = summary["mob"], summary["activation"]
        return ["", "## Mixture of blocks (mob)", "",
                f"Routed blocks {mob['routed']} in groups of {mob['group_size']}, {mob['active']} active per group; "
                f"on calibration inputs the routed blocks ran for **{summary['block_activation_fraction']}** of "
                f"samples on average (rates by noise level: timestep terciles split at "
                f"{summary['block_activation_by_noise']['timestep_edges']}); {act['activated_parameters']:,} of "
                f"{act['parameters']:,} parameters activated per sample on average.", "",
                *([f"![block activation]({pictures['block_activation']})"] if "block_activation" in pictures
                  else [])]
