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
from ...models.families import FamilyAdapter

Importance = Literal["l2", "taylor"]
WIDTH_FAMILIES = ("dit", "pixart", "sd3")
_UNSUPPORTED = {
    "flux": "Torch-Pruning's trace couples Flux's rotary embedding and its fused attention+MLP output "
            "projection with unrelated channels",
    "sana": "Sana blocks use linear attention and a convolutional GLU FFN",
}
QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def attention_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Multi-head attentions of a block: modules with q/k/v projections and a head count."""
    return [(n, m) for n, m in block.named_modules()
            if all(isinstance(getattr(m, p, None), nn.Linear) for p in QKV[:3]) and hasattr(m, "heads")]


def ffn_inputs(block: nn.Module) -> list[nn.Linear]:
    """The first projection of each FFN (diffusers' FeedForward: net.0.proj)."""
    return [m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n.endswith("net.0.proj")]


def capture_block_calls(model: nn.Module, adapter: FamilyAdapter, x, t, cond) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each block receives in one forward pass."""
    blocks = [b for _, _, b in adapter.blocks(model)]
    calls: list = [None] * len(blocks)

    def hook(i):
        def pre(_m, args, kwargs):
            calls[i] = (args, kwargs)
        return pre

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            adapter.denoise(model, x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return calls


def _sum_outputs(out) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(o.float().sum() for o in outs if torch.is_tensor(o))


def taylor_gradients_(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, batches: int = 2,
                      batch_size: int = 32) -> None:
    """Accumulate gradients of the flow-matching task loss (v = noise - x0) for Taylor importance.

    A copy of the teacher matches the teacher exactly, so a distillation loss would have zero
    gradient; the task loss on teacher-generated x0 is what the teacher was trained on."""
    model.zero_grad(set_to_none=True)
    for k in range(batches):
        g = torch.Generator().manual_seed(30_000_000 + k)
        idx = torch.randint(0, len(calib), (batch_size,), generator=g)
        x0 = calib.x0[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = calib.schedule.draw_timesteps(batch_size, g)
        cond = {key: v[idx] for key, v in calib.cond.items()}
        pred = adapter.denoise(model, calib.schedule.add_noise(x0, noise, t), t, cond)
        (torch.mean((pred - calib.schedule.target(x0, noise)) ** 2) / batches).backward()


def width_prune_(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, heads: float, ffn: float,
                 importance: Importance = "l2") -> dict:
    """Remove a fraction of heads and FFN channels in every block.

    Returns {"shapes": {param: shape}, "heads": {attention module: heads}} for `replay_width_`."""
    import torch_pruning as tp

    if adapter.family not in WIDTH_FAMILIES:
        raise UnsupportedModelError(
            f"width pruning supports {', '.join(WIDTH_FAMILIES)}, not {adapter.family}: "
            + _UNSUPPORTED.get(adapter.family, "") + "; use depth pruning instead")
    all_blocks = [b for _, _, b in adapter.blocks(model)]
    names = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    x, t, cond = adapter.example_inputs(2)
    calls = capture_block_calls(model, adapter, x, t, cond)
    was_training = model.training
    model.requires_grad_(True)
    if importance == "taylor":
        taylor_gradients_(model, adapter, calib)
        imp = tp.importance.GroupTaylorImportance()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    head_counts: dict[str, int] = {}
    for i, block in enumerate(all_blocks):
        attns = attention_modules(block)
        roots = {getattr(a, p) for _, a in attns for p in QKV if isinstance(getattr(a, p, None), nn.Linear)}
        num_heads = {getattr(a, p): a.heads for _, a in attns for p in QKV
                     if isinstance(getattr(a, p, None), nn.Linear)}
        up = ffn_inputs(block)
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
