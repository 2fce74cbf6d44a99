"""The `moe` stage: Dense2MoE's FFN -> mixture of experts with its multi-step distillation.

Step 1 initialises the experts from the dense FFN (Taylor split, balanced grouping, fitted
router; `convert.py`). Step 2 distils the converted model from the teacher: output MSE,
teacher-normalised block-output matching, and a load-balancing loss on every router.
The result keeps every parameter (capacity) but runs only shared + top_k experts per token.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ...core.stage import Stage, StageContext
from ...data.calibration import CalibrationSet
from ...models.families import FamilyAdapter
from ...train.distill import Distiller, OutputFeatureObjective
from .blocks import MixtureOfBlocks
from .config import MoBConfig, MoEConfig
from .convert import build_moe, dense_ffns, record_ffns, replace_module_, replay_moe_, split_neurons
from .layer import MoEFeedForward

log = logging.getLogger("dit_compress")


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
            b = calib.batch(50_000_000 + k, batch_size)
            adapter.denoise(model, b.x_t, b.t, b.cond)
            for n, m in layers.items():
                counts[n] += m.last_counts.float()
    finally:
        for m in layers.values():
            m.track = False
    return {n: [round(v, 5) for v in (c / c.sum()).tolist()] for n, c in counts.items()}


def wrap_blocks_(model: nn.Module, record: dict) -> MixtureOfBlocks:
    """Put the recorded Mixture of Blocks in place (its routers live at `model.mob`)."""
    mob = MixtureOfBlocks(record["dim"], record["routed"], record["group_size"], record["active"])
    model.add_module("mob", mob)
    mob.wrap_(getattr(model, record["attr"]))
    return mob


@torch.no_grad()
def block_activation(model: nn.Module, mob: MixtureOfBlocks, adapter: FamilyAdapter, calib: CalibrationSet,
                     batches: int = 8, batch_size: int = 64) -> tuple[dict[str, float], dict]:
    """Share of calibration samples each routed block runs for: overall, and per noise level (timestep
    terciles), since the router reads the noise level and may spend blocks differently across it."""
    ran, steps = [], []
    for k in range(batches):
        b = calib.batch(55_000_000 + k, batch_size)
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


def _block_params(block: nn.Module) -> int:
    """Parameters one token activates in a block (MoE layers count shared + top_k experts)."""
    moes = [m for m in block.modules() if isinstance(m, MoEFeedForward)]
    inner = sum(sum(p.numel() for p in m.parameters()) - m.activated_parameters() for m in moes)
    return sum(p.numel() for p in block.parameters()) - inner


def activation_stats(model: nn.Module, dense_ffn_params: int, mob: dict | None = None,
                     block_rates: dict[str, float] | None = None) -> dict:
    """Parameters that exist vs parameters one token activates on average (whole model and FFNs).

    With a Mixture of Blocks, a routed block counts with the share of samples it runs for."""
    layers = moe_layers(model).values()
    total = sum(p.numel() for p in model.parameters())
    ffn_total = sum(sum(p.numel() for p in m.parameters()) for m in layers)
    ffn_active = sum(m.activated_parameters() for m in layers)
    active = total - ffn_total + ffn_active
    if mob is not None:
        blocks = getattr(model, mob["attr"])
        active -= sum((1 - rate) * _block_params(blocks[int(i)]) for i, rate in block_rates.items())
    return {"parameters": total, "activated_parameters": int(active),
            "ffn_dense_parameters": dense_ffn_params, "ffn_activated_parameters": ffn_active,
            "ffn_activated_ratio": round(ffn_active / dense_ffn_params, 4)}


class MoEStage(Stage):
    name = "moe"
    config_cls = MoEConfig

    def recovery(self, config: MoEConfig):
        return None  # the distillation (with load balancing) is part of the method: it runs in `apply`

    def is_stock(self, metadata: dict) -> bool:
        return False

    def apply(self, model, config: MoEConfig, ctx: StageContext):
        adapter = ctx.teacher.with_model(model).adapter
        ffns = dense_ffns(model, adapter, config.targets)
        dense_params = sum(sum(p.numel() for p in ff.parameters()) for ff in ffns.values())
        log.info("moe: Taylor scores and router fit on %d FFNs", len(ffns))
        stats = record_ffns(model, adapter, ctx.calibration, ffns, batches=config.taylor_batches)
        record = {}
        for path, ff in ffns.items():
            split = split_neurons(stats[path], config.segments, config.shared_segments)
            replace_module_(model, path, build_moe(ff, split, config.top_k, stats[path]))
            record[path] = {"shared": len(split["shared"]), "experts": len(split["experts"]),
                            "expert_size": len(split["experts"][0]), "top_k": config.top_k}
        metadata = {"moe": record, "conversion_error": _relative_error(ctx, model, adapter)}
        log.info("moe: relative output error right after conversion %.4f", metadata["conversion_error"])
        if config.recover is not None:
            blocks = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
            objective = MoEObjective(ctx.teacher.adapter, list(zip(blocks, blocks)), config.recover.feature_weight,
                                     config.balance_weight)
            metadata["training"] = Distiller(ctx.teacher.model, model, ctx.teacher.adapter, ctx.calibration,
                                             config.recover, ctx.work_dir, desc="moe distill",
                                             objective=objective).run()
            model.eval().requires_grad_(False)
        if config.mob is not None:
            metadata.update(self._mob(model, adapter, config.mob, ctx))
        metadata["activation"] = activation_stats(model, dense_params, metadata.get("mob"),
                                                  metadata.get("block_activation"))
        metadata["expert_load"] = expert_load(model, adapter, ctx.calibration)
        metadata["max_load_over_fair"] = round(max(max(v) * len(v) for v in metadata["expert_load"].values()), 4)
        return model, metadata

    def _mob(self, model, adapter, config: MoBConfig, ctx: StageContext) -> dict:
        """Step 3: wrap the blocks in a Mixture of Blocks and optimise it with the group feature loss."""
        from ...probes.boundaries import block_influence, hidden_width

        group = adapter.block_groups[0]
        blocks = getattr(model, group.attr)
        protected = {i for attr, i in adapter.protected_blocks(model) if attr == group.attr}
        routed = [i for i in range(len(blocks)) if i not in protected]
        influence = block_influence(model, adapter, ctx.calibration, batches=2)[:len(blocks)]
        record = {"attr": group.attr, "routed": routed, "group_size": config.group_size, "active": config.active,
                  "dim": hidden_width(model, adapter)}
        mob = wrap_blocks_(model, record)
        with torch.no_grad():  # start from each group's most influential blocks
            for k, router in enumerate(mob.routers):
                members = routed[k * config.group_size:(k + 1) * config.group_size]
                router.proj.bias.copy_(torch.tensor([influence[i] for i in members]))
        ends = [f"{group.attr}.{g[-1]}" for g in
                (routed[s:s + config.group_size] for s in range(0, len(routed), config.group_size))]
        objective = OutputFeatureObjective(ctx.teacher.adapter, list(zip(ends, ends)), config.recover.feature_weight)
        training = Distiller(ctx.teacher.model, model, ctx.teacher.adapter, ctx.calibration, config.recover,
                             ctx.work_dir / "mob", desc="mob distill", objective=objective).run()
        model.eval().requires_grad_(False)
        rates, by_noise = block_activation(model, mob, adapter, ctx.calibration)
        return {"mob": record, "mob_training": training, "block_activation": rates,
                "block_activation_by_noise": by_noise,
                "block_activation_fraction": round(sum(rates.values()) / len(rates), 4)}

    def restore(self, model, config, metadata, adapter):
        replay_moe_(model, metadata["moe"])
        if metadata.get("mob"):
            wrap_blocks_(model, metadata["mob"])
        return model

    def layer_map(self, metadata):
        return []  # same block structure as the teacher: the stage matches blocks itself

    def pictures(self, metadata, out, prefix):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        load = metadata["expert_load"]
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
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        pictures = {"expert_load": name}
        if metadata.get("block_activation_by_noise"):
            pictures["block_activation"] = _block_activation_picture(metadata, out, prefix, plt)
        return pictures

    def report_lines(self, metadata, pictures):
        act = metadata["activation"]
        return ["", "## Mixture of experts (moe)", "",
                f"{len(metadata['moe'])} FFNs converted; per token {act['ffn_activated_parameters']:,} of "
                f"{act['ffn_dense_parameters']:,} dense FFN parameters run (**{act['ffn_activated_ratio']}**); "
                f"whole model: {act['activated_parameters']:,} activated of {act['parameters']:,}. Relative output "
                f"error right after conversion, before distillation: {metadata['conversion_error']}. Busiest "
                f"expert: {metadata['max_load_over_fair']}x its fair share of tokens on calibration inputs.", "",
                *([f"![expert load]({pictures['expert_load']})"] if "expert_load" in pictures else []),
                *self._mob_lines(metadata, pictures)]

    @staticmethod
    def _mob_lines(metadata, pictures) -> list[str]:
        if not metadata.get("mob"):
            return []
        mob, act = metadata["mob"], metadata["activation"]
        return ["", "### Mixture of blocks", "",
                f"Routed blocks {mob['routed']} in groups of {mob['group_size']}, {mob['active']} active per group; "
                f"on calibration inputs the routed blocks ran for **{metadata['block_activation_fraction']}** of "
                f"samples on average (rates by noise level: timestep terciles split at "
                f"{metadata['block_activation_by_noise']['timestep_edges']}).", "",
                *([f"![block activation]({pictures['block_activation']})"] if "block_activation" in pictures
                  else [])]


def _block_activation_picture(metadata: dict, out, prefix: str, plt) -> str:
    """Per routed block: share of samples it ran for, overall and per noise tercile."""
    blocks = list(metadata["block_activation"])
    noise = metadata["block_activation_by_noise"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(blocks) + 2), 3.2))
    width = 0.2
    x = torch.arange(len(blocks)).float()
    labels = ["low noise", "mid noise", "high noise"]
    for q, rates in enumerate(noise["rates"]):
        ax.bar((x + (q - 1.5) * width).numpy(), rates, width, label=labels[q])
    ax.bar((x + 1.5 * width).numpy(), list(metadata["block_activation"].values()), width, color="black",
           label="all")
    ax.axhline(metadata["block_activation_fraction"], color="red", linestyle="--", linewidth=1,
               label=f"mean {metadata['block_activation_fraction']:.2f}")
    ax.set_xticks(x.numpy(), blocks)
    ax.set_xlabel("routed block")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of samples it ran for")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    name = f"block-activation-{prefix}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


@torch.no_grad()
def _relative_error(ctx: StageContext, model: nn.Module, adapter: FamilyAdapter) -> float:
    b = ctx.calibration.batch(60_000_000, 64)
    ref = ctx.teacher.adapter.denoise(ctx.teacher.model, b.x_t, b.t, b.cond)
    got = adapter.denoise(model, b.x_t, b.t, b.cond)
    return round(((got - ref).norm() / ref.norm()).item(), 5)
