"""Width pruning of attention heads and FFN channels with Torch-Pruning's dependency graph.

Each transformer block is traced on its own (with the arguments the model really passes it),
so Torch-Pruning sees exactly the coupled layers of one block: q/k/v (and the joint-attention
text projections) with the output projection, and each FFN's up- and down-projections. Every
other layer is ignored, so the residual width, the modulation (adaLN) layers and the
positional embeddings keep their sizes. Whole heads are removed (head_dim is fixed), which
keeps multi-head structure consistent and rotary / QK-norm layers untouched: a per-head q/k norm
(SD3.5's `qk_norm: rms_norm`, or layer_norm) has head_dim weights shared by every head, so it is
hidden from the trace (Torch-Pruning would otherwise couple it with the projections and skip or
break the head group) and stays as it is; a norm across all heads is refused.

The result is recorded as parameter shapes and head counts, from which `replay_width_`
rebuilds the architecture on a fresh base model (weights are loaded afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Literal

import torch
import torch.nn as nn

from ...data.calibration import CalibrationSet
from ...errors import RecipeError, UnsupportedModelError
from ...models.families import SINGLE_BLOCK, FamilyAdapter
from ...probes.boundaries import block_calls
from ...probes.taylor import task_losses

log = logging.getLogger("dit_compress")

Importance = Literal["l2", "taylor"]
QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
TAYLOR_BATCHES, TAYLOR_BATCH_SIZE = 2, 32
# An FFN narrower than this is refused (a handful of channels cannot carry the block's MLP), and
# one narrower than WARN_CHANNELS or 1/WARN_SHARE of its width is warned about, naming the layer.
MIN_CHANNELS, WARN_CHANNELS, WARN_SHARE = 4, 8, 16


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


def _head_dim(attn: nn.Module) -> int:
    return attn.to_q.out_features // attn.heads


def check_qk_norms(attns: list[tuple[str, nn.Module]], where: str) -> None:
    """Head pruning keeps q/k norms only where they normalise each head on its own (head_dim weights)."""
    for name, a in attns:
        for n in QK_NORMS:
            weight = getattr(getattr(a, n, None), "weight", None)
            if weight is not None and weight.numel() != _head_dim(a):
                raise UnsupportedModelError(
                    f"width pruning: {where}.{name}.{n} normalises across all heads ({weight.numel()} weights, "
                    f"head_dim {_head_dim(a)}); head pruning supports per-head q/k norms only; use depth pruning")


@contextlib.contextmanager
def qk_norms_hidden(attns: list[tuple[str, nn.Module]]):
    """Per-head q/k norms replaced by identities while Torch-Pruning traces and prunes the block."""
    saved = [(a, n, getattr(a, n)) for _, a in attns for n in QK_NORMS if getattr(a, n, None) is not None]
    for a, n, _ in saved:
        setattr(a, n, nn.Identity())
    try:
        yield
    finally:
        for a, n, norm in saved:
            setattr(a, n, norm)


def require_width_support(adapter: FamilyAdapter, model: nn.Module) -> None:
    """Refuse a model Torch-Pruning cannot prune, before any ratio arithmetic on its layers."""
    reasons = unsupported(adapter, model)
    if reasons:
        raise UnsupportedModelError(
            f"width pruning supports softmax attention and FeedForward FFNs, not {adapter.family}: "
            + "; ".join(reasons) + "; use depth pruning instead")


def check_ffn_floor(ffns: list[tuple[str, int, int]], ffn: float, warn: bool = True) -> None:
    """`ffns`: (FFN layer, hidden channels kept, channels before). Refuse a pruned layer left below
    MIN_CHANNELS; warn, naming the first, about layers below WARN_CHANNELS or 1/WARN_SHARE."""
    pruned = [(n, k, w) for n, k, w in ffns if k < w]
    for name, kept, width in pruned:
        if kept < MIN_CHANNELS:
            raise RecipeError(f"width pruning: FFN fraction {ffn:.3g} leaves {name} with {kept} of {width} hidden "
                              f"channels (minimum {MIN_CHANNELS}); lower prune.ratio (or width.ffn)")
    thin = [(n, k, w) for n, k, w in pruned if k < WARN_CHANNELS or k * WARN_SHARE < w]
    if thin and warn:
        name, kept, width = thin[0]
        log.warning("width pruning leaves %s with %d of %d hidden channels (%d FFN(s) below %d channels or 1/%d "
                    "of their width); expect a large quality loss", name, kept, width, len(thin), WARN_CHANNELS,
                    WARN_SHARE)


def _kept_channels(widths: list[int], ffn: float) -> int:
    """What Torch-Pruning keeps of one block's FFNs (one scope): int(total x (1 - ffn))."""
    return int(sum(widths) * (1 - ffn)) if ffn > 0 else sum(widths)


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

    require_width_support(adapter, model)
    all_blocks = [b for _, _, b in adapter.blocks(model)]
    names = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
    attentions, ffns = attention_modules(adapter, model), ffn_inputs(adapter, model)
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    paths = {m: n for n, m in model.named_modules()}
    ffn_widths = [[(paths[u], u.out_features) for u in ups] for ups in ffns]
    # Before any tracing: the channels each FFN would keep (a block's FFNs share one scope, so
    # each is estimated at its share; the check after pruning sees the real counts).
    check_ffn_floor([(name, _kept_channels([w], ffn), w) for widths in ffn_widths for name, w in widths],
                    ffn, warn=False)
    if heads > 0:
        for i, attns in enumerate(attentions):
            check_qk_norms(attns, names[i])
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
        head_dims = {name: _head_dim(a) for name, a in attns}
        with warnings.catch_warnings(), qk_norms_hidden(attns):
            warnings.filterwarnings("ignore", message="Unwrapped parameters")
            pruner = tp.pruner.MetaPruner(
                block, example_inputs=(args, kwargs), forward_fn=lambda m, inp: m(*inp[0], **inp[1]),
                output_transform=_sum_outputs, importance=imp, ignored_layers=ignored,
                pruning_ratio_dict={tuple(up): ffn} if up else {}, pruning_ratio=heads,
                num_heads=num_heads, prune_num_heads=heads > 0, prune_head_dims=False,
                head_pruning_ratio=heads)
            pruner.step()
        widths, kept = [w for _, w in ffn_widths[i]], sum(u.out_features for u in up)
        if abs(kept - _kept_channels(widths, ffn)) > len(up):  # a group Torch-Pruning skipped (rounding aside)
            raise RuntimeError(f"width pruning kept {kept} of {sum(widths)} FFN channels in {names[i]}, "
                               f"expected {_kept_channels(widths, ffn)}")
        for name, a in attns:
            if pruner.num_heads[a.to_q] < 1:
                raise RecipeError(f"width pruning: heads={heads} removes every head of {names[i]}.{name}")
            a.heads = pruner.num_heads[a.to_q]
            head_counts[f"{names[i]}.{name}"] = a.heads
            # head_dim is fixed: a head count that changed without its projections would silently
            # re-split the same channels into wider heads (what a traced-but-skipped group does)
            head_dim = head_dims[name]
            bad = [p for p in QKV if isinstance(getattr(a, p, None), nn.Linear)
                   and getattr(a, p).out_features != a.heads * head_dim]
            if bad:
                raise RuntimeError(f"width pruning left {names[i]}.{name} with {a.heads} heads of "
                                   f"{head_dim} channels but projections {bad} of other widths")
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False).train(was_training)
    check_ffn_floor([(name, up.out_features, width) for ups, widths in zip(ffns, ffn_widths)
                     for up, (name, width) in zip(ups, widths)], ffn)
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
