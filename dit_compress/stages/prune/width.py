"""Width pruning of attention heads and FFN channels with Torch-Pruning's dependency graph.

Each transformer block is traced on its own (with the arguments the model really passes it),
so Torch-Pruning sees exactly the coupled layers of one block: q/k/v (and the joint-attention
text projections) with the output projection, and each FFN's up- and down-projections. Every
other layer is ignored, so the residual width, the modulation (adaLN) layers and the
positional embeddings keep their sizes. Whole heads are removed (head_dim is fixed), which
keeps multi-head structure consistent and rotary / QK-norm layers untouched.

The result is recorded as parameter shapes and head counts, from which `replay_width_`
rebuilds the architecture on a fresh base model (weights are loaded afterwards).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn as nn

from ...data.calibration import CalibrationSet
from ...errors import RecipeError, UnsupportedModelError
from ...models.families import SINGLE_BLOCK, FamilyAdapter
from ...probes.boundaries import block_calls
from ...probes.taylor import task_losses

Importance = Literal["l2", "taylor"]
QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
TAYLOR_BATCHES, TAYLOR_BATCH_SIZE = 2, 32


def attention_modules(adapter: FamilyAdapter, model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Per block: its attentions as (path within the block, module)."""
    return [[(a.path[len(b.path) + 1:], a.module) for a in b.attentions] for b in adapter.layout(model).blocks]


def ffn_inputs(adapter: FamilyAdapter, model: nn.Module) -> list[list[nn.Linear]]:
    """Per block: the first projection of each FeedForward FFN (the FFNs Torch-Pruning can trace)."""
    return [[model.get_submodule(f.up) for f in b.ffns if f.form == "feedforward"]
            for b in adapter.layout(model).blocks]


def unsupported(adapter: FamilyAdapter, model: nn.Module) -> list[str]:
    """Why Torch-Pruning cannot prune this model's width (nothing when it can)."""
    layout = adapter.layout(model)
    reasons = []
    if adapter.rotary:
        reasons.append("Torch-Pruning's trace couples the rotary position embedding with unrelated channels")
    if layout.blocks_of(SINGLE_BLOCK):
        reasons.append("single-stream blocks fuse the attention and MLP output projections into one proj_out")
    if any(a.linear for a in layout.attentions()):
        reasons.append("its blocks use linear attention")
    if any(f.form != "feedforward" for f in layout.ffns()):
        reasons.append(f"its FFNs are {sorted({f.form for f in layout.ffns()} - {'feedforward'})}, not FeedForward")
    return reasons


def _sum_outputs(out) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(o.float().sum() for o in outs if torch.is_tensor(o))


def taylor_gradients_(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet) -> None:
    """Accumulate gradients of the mean task loss over the Taylor draws (for Taylor importance)."""
    model.zero_grad(set_to_none=True)
    for loss in task_losses(model, adapter, calib, TAYLOR_BATCHES, TAYLOR_BATCH_SIZE, "prune/width-taylor"):
        (loss / TAYLOR_BATCHES).backward()


def width_prune_(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, heads: float, ffn: float,
                 importance: Importance = "l2") -> dict:
    """Remove a fraction of heads and FFN channels in every block.

    Returns {"shapes": {param: shape}, "heads": {attention module: heads}} for `replay_width_`."""
    import torch_pruning as tp

    reasons = unsupported(adapter, model)
    if reasons:
        raise UnsupportedModelError(
            f"width pruning supports softmax attention and FeedForward FFNs, not {adapter.family}: "
            + "; ".join(reasons) + "; use depth pruning instead")
    all_blocks = [b for _, _, b in adapter.blocks(model)]
    names = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
    attentions, ffns = attention_modules(adapter, model), ffn_inputs(adapter, model)
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    calls = block_calls(model, adapter, *adapter.example_inputs(2))
    was_training = model.training
    model.requires_grad_(True)
    if importance == "taylor":
        taylor_gradients_(model, adapter, calib)
        imp = tp.importance.GroupTaylorImportance()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    head_counts: dict[str, int] = {}
    for i, block in enumerate(all_blocks):
        attns = attentions[i]
        roots = {getattr(a, p) for _, a in attns for p in QKV if isinstance(getattr(a, p, None), nn.Linear)}
        num_heads = {getattr(a, p): a.heads for _, a in attns for p in QKV
                     if isinstance(getattr(a, p, None), nn.Linear)}
        up = ffns[i]
        roots |= set(up)
        ignored = [m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in roots]
        args, kwargs = calls[i]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters")
            pruner = tp.pruner.MetaPruner(
                block, example_inputs=(args, kwargs), forward_fn=lambda m, inp: m(*inp[0], **inp[1]),
                output_transform=_sum_outputs, importance=imp, ignored_layers=ignored,
                pruning_ratio_dict={tuple(up): ffn} if up else {}, pruning_ratio=heads,
                num_heads=num_heads, prune_num_heads=heads > 0, prune_head_dims=False,
                head_pruning_ratio=heads)
            pruner.step()
        for name, a in attns:
            if pruner.num_heads[a.to_q] < 1:
                raise RecipeError(f"width pruning: heads={heads} removes every head of {names[i]}.{name}")
            a.heads = pruner.num_heads[a.to_q]
            head_counts[f"{names[i]}.{name}"] = a.heads
            head_dim = a.to_q.out_features // a.heads
            bad = [p for p in QKV if isinstance(getattr(a, p, None), nn.Linear)
                   and getattr(a, p).out_features != a.heads * head_dim]
            if bad or a.to_q.out_features % a.heads:
                raise RuntimeError(f"width pruning left {names[i]}.{name} with inconsistent heads ({bad})")
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False).train(was_training)
    shapes = {n: list(p.shape) for n, p in model.named_parameters() if tuple(p.shape) != before[n]}
    return {"shapes": shapes, "heads": head_counts}


def replay_width_(model: nn.Module, record: dict) -> None:
    """Give parameters their pruned shapes and attentions their head counts (weights load later)."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for name, shape in record["shapes"].items():
        if name not in params:
            raise KeyError(f"width record names parameter {name!r}, which the model does not have")
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        setattr(module, attr, nn.Parameter(torch.empty(shape, dtype=params[name].dtype), requires_grad=False))
        if isinstance(module, nn.Linear) and attr == "weight":
            module.out_features, module.in_features = shape
    for name, heads in record["heads"].items():
        modules[name].heads = heads
