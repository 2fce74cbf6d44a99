"""Dense FFN -> MoE: Taylor-scored neuron split, balanced expert grouping, regression-initialised router.

1. Taylor importance of each hidden neuron, |a * dL/da| summed over calibration tokens, with
   L the flow-matching task loss the teacher was trained on (a copy of the teacher matches it
   exactly, so a distillation loss would have no gradient).
2. The most important neurons form the shared expert. The rest are grouped into equally sized
   routed experts by balanced k-means over their per-token Taylor profiles, so neurons that
   matter for the same tokens sit in the same expert and routing one expert covers them.
3. The router starts as a ridge regression from the FFN input to each expert's contribution
   mass (sum over its neurons of |a_j| * ||W_down[:, j]||): it picks, per token, the experts
   whose absence would cost most, so the converted model starts close to the dense one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...data.calibration import CalibrationSet
from ...errors import UnsupportedModelError
from ...models.families import FamilyAdapter
from ...probes.capture import Capture
from ...probes.taylor import task_losses
from .layer import MoEFeedForward



def dense_ffns(model: nn.Module, adapter: FamilyAdapter, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """The FFNs named `targets` in their blocks (e.g. "ff", "ff_context"), by module path."""
    found = {}
    for view in adapter.layout(model).ffns():
        if view.name not in targets:
            continue
        ff = model.get_submodule(view.path)
        act = ff.net[0] if view.form == "feedforward" else None
        if not (isinstance(getattr(act, "proj", None), nn.Linear) and hasattr(act, "approximate")
                and isinstance(ff.net[2], nn.Linear)):
            found_type = type(act).__name__ if act is not None else f"{type(ff).__name__} ({view.form})"
            raise UnsupportedModelError(
                f"{view.path}: only GELU FeedForward layers convert to MoE, found {found_type}")
        found[view.path] = ff
    if not found:
        raise UnsupportedModelError(f"{adapter.family}: no FeedForward named {list(targets)} in its blocks")
    return found


def record_ffns(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, ffns: dict[str, nn.Module],
                batches: int = 4, batch_size: int = 32, max_tokens: int = 1024) -> dict[str, dict]:
    """Per FFN: inputs x (T, dim), activations a (T, H), Taylor profiles (T, H), Taylor scores (H),
    on the first `max_tokens` tokens of each calibration draw (scores on all of them)."""
    data = {n: {"x": [], "a": [], "g": [], "score": 0.0} for n in ffns}

    def inputs(name, x):
        data[name]["x"].append(x.detach().reshape(-1, x.shape[-1])[:max_tokens])

    def hidden(name, a):  # the down-projection's input: the FFN's hidden activations
        d = data[name]
        d["a"].append(a.detach().reshape(-1, a.shape[-1])[:max_tokens])

        def grad_hook(g):
            taylor = (a.detach() * g).abs().reshape(-1, a.shape[-1])
            d["score"] = d["score"] + taylor.sum(0)
            d["g"].append(taylor[:max_tokens])
        a.register_hook(grad_hook)

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(True)  # activations need a graph to have gradients
    try:
        with Capture(ffns, at="input", on=inputs), \
                Capture({n: ff.net[2] for n, ff in ffns.items()}, at="input", on=hidden):
            for loss in task_losses(model, adapter, calib, batches, batch_size, "moe/taylor"):
                loss.backward()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
    return {n: {"x": torch.cat(d["x"]), "a": torch.cat(d["a"]), "profile": torch.cat(d["g"]), "score": d["score"]}
            for n, d in data.items()}


def balanced_groups(features: torch.Tensor, groups: int, iters: int = 15, seed: int = 0) -> list[list[int]]:
    """Balanced k-means of the rows of `features` into `groups` equal groups (cosine similarity)."""
    n = features.shape[0]
    if n % groups:
        raise ValueError(f"{n} neurons do not split into {groups} equal experts")
    cap = n // groups
    f = torch.nn.functional.normalize(features, dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(n, generator=g)[:groups]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = f @ centroids.t()  # (n, groups)
        order = sim.flatten().argsort(descending=True)
        assign.fill_(-1)
        filled = torch.zeros(groups, dtype=torch.long)
        for flat in order.tolist():  # greedy: best remaining (neuron, expert) pair with room
            i, e = divmod(flat, groups)
            if assign[i] < 0 and filled[e] < cap:
                assign[i], filled[e] = e, filled[e] + 1
        new = torch.stack([f[assign == e].mean(0) for e in range(groups)])
        if torch.allclose(new, centroids):
            break
        centroids = torch.nn.functional.normalize(new, dim=1)
    return [sorted((assign == e).nonzero().flatten().tolist()) for e in range(groups)]


def split_neurons(stats: dict, segments: int, shared_segments: int) -> dict:
    """{"shared": [neurons], "experts": [[neurons], ...]} from one FFN's recorded statistics."""
    hidden = stats["score"].numel()
    if hidden % segments:
        raise ValueError(f"FFN width {hidden} is not divisible by segments={segments}")
    n_shared = hidden // segments * shared_segments
    order = stats["score"].argsort(descending=True)
    shared, routed = order[:n_shared], order[n_shared:]
    profile = stats["profile"][:, routed].t()  # (routed neurons, tokens)
    groups = balanced_groups(profile, segments - shared_segments)
    return {"shared": sorted(shared.tolist()), "experts": [[int(routed[j]) for j in grp] for grp in groups]}


def build_moe(ff: nn.Module, split: dict, top_k: int, stats: dict | None = None, ridge: float = 1e-2
              ) -> MoEFeedForward:
    """The MoE layer holding exactly the dense FFN's weights, partitioned by `split`."""
    up, down = ff.net[0].proj, ff.net[2]
    dim, experts = up.in_features, split["experts"]
    moe = MoEFeedForward(dim, len(split["shared"]), len(experts), len(experts[0]), top_k, ff.net[0].approximate)
    with torch.no_grad():
        s = torch.tensor(split["shared"])
        moe.shared_up.weight.copy_(up.weight[s])
        moe.shared_up.bias.copy_(up.bias[s])
        moe.shared_down.weight.copy_(down.weight[:, s])
        moe.shared_down.bias.copy_(down.bias)
        for e, neurons in enumerate(experts):
            idx = torch.tensor(neurons)
            moe.up_weight[e].copy_(up.weight[idx].t())
            moe.up_bias[e, 0].copy_(up.bias[idx])
            moe.down_weight[e].copy_(down.weight[:, idx].t())
        if stats is not None:
            init_router_(moe, stats, experts, down.weight, ridge)
    return moe.to(up.weight.dtype)


def init_router_(moe: MoEFeedForward, stats: dict, experts: list[list[int]], w_down: torch.Tensor,
                 ridge: float) -> None:
    """Ridge regression from FFN input to each expert's contribution mass on the recorded tokens."""
    x = stats["x"].float()
    norms = w_down.float().norm(dim=0)  # ||W_down[:, j]||: how much neuron j moves the output
    mass = torch.stack([(stats["a"][:, e].abs().float() * norms[e]).sum(1) for e in experts], dim=1)
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    reg = ridge * x1.pow(2).mean() * torch.eye(x1.shape[1])
    sol = torch.linalg.solve(x1.t() @ x1 + reg * len(x1), x1.t() @ mass)  # (dim + 1, experts)
    moe.router.weight.copy_(sol[:-1].t())
    moe.router.bias.copy_(sol[-1])


def replace_module_(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def replay_moe_(model: nn.Module, record: dict) -> None:
    """Put MoE layers of the recorded shapes in place (weights are loaded afterwards)."""
    for path, r in record.items():
        ff = model.get_submodule(path)
        dim = ff.net[0].proj.in_features
        replace_module_(model, path, MoEFeedForward(dim, r["shared"], r["experts"], r["expert_size"], r["top_k"],
                                                    ff.net[0].approximate))
