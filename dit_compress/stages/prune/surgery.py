"""Block naming and width slicing: the surgery the `prune` stage builds from its plan (block removal: depth.py)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ...models.families import FamilyAdapter


def block_names(adapter: FamilyAdapter, model: nn.Module) -> list[str]:
    return [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]


def protected_indices(adapter: FamilyAdapter, model: nn.Module) -> set[int]:
    names = block_names(adapter, model)
    return {names.index(f"{g}.{i}") for g, i in adapter.protected_blocks(model)}


def _kept(full: torch.Tensor, part: torch.Tensor, dim: int) -> list[int]:
    """Indices along `dim` of `full` whose slices form `part`, in order (pruning keeps the order)."""
    f, p = full.movedim(dim, 0), part.movedim(dim, 0)
    kept, i = [], 0
    for j in range(p.shape[0]):
        while i < f.shape[0] and not torch.equal(f[i], p[j]):
            i += 1
        if i == f.shape[0]:
            raise RuntimeError("width pruning changed values, not only shapes")
        kept.append(i)
        i += 1
    return kept


def width_choices(model: nn.Module, prune_) -> dict:
    """Run `prune_(copy)` (a width pruner) on a copy of `model` and record what it kept:
    {"keep": {parameter: [dim, indices]}, "heads": {attention: heads}}. The model is unchanged."""
    pruned = copy.deepcopy(model)
    record = prune_(pruned)
    full = dict(model.named_parameters())
    keep = {}
    for name, p in pruned.named_parameters():
        dims = [d for d in range(p.dim()) if p.shape[d] != full[name].shape[d]]
        if len(dims) > 1:
            raise RuntimeError(f"width pruning shrank {name} along several dimensions")
        if dims:
            keep[name] = [dims[0], _kept(full[name].detach(), p.detach(), dims[0])]
    return {"keep": keep, "heads": record["heads"]}


def slice_width_(model: nn.Module, record: dict) -> None:
    """Keep the recorded channels of every pruned parameter and set the recorded head counts
    (on the meta device this gives the shapes, and the weights load afterwards)."""
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    for name, (dim, kept) in record["keep"].items():
        owner, _, attr = name.rpartition(".")
        module, p = modules[owner], params[name]
        sliced = p.detach().index_select(dim, torch.tensor(kept, device=p.device))
        setattr(module, attr, nn.Parameter(sliced, requires_grad=False))
        if isinstance(module, nn.Linear) and attr == "weight":
            module.out_features, module.in_features = sliced.shape
    for name, heads in record["heads"].items():
        modules[name].heads = heads
