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

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...data.calibration import CalibrationSet
from ...errors import UnsupportedModelError
from ...models.families import FamilyAdapter
from ...probes.capture import Capture
from ...probes.taylor import task_losses
from .layer import MoEFeedForward



@dataclass(frozen=True)
class DenseFFN:
    """A dense GELU FFN to convert: `up`, GELU, then the down-projection `down_weight` (dim, hidden)
    with `down_bias`. Either a diffusers FeedForward (down = net.2) or a Flux single block's MLP
    (`fused`: up = proj_mlp, down = the MLP columns of proj_out, which also carries the bias)."""

    path: str                   # the module the MoE layer replaces: the FeedForward, or the block's proj_mlp
    up: nn.Linear
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    approximate: str
    hidden_at: tuple[nn.Module, str]  # where the hidden activations are seen: (module, "input" | "output")
    fused: bool = False

    @property
    def parameters(self) -> int:
        bias = 0 if self.down_bias is None else self.down_bias.numel()
        return sum(p.numel() for p in self.up.parameters()) + self.down_weight.numel() + bias


def dense_ffn_at(model: nn.Module, path: str, fused: bool = False) -> DenseFFN:
    """The dense FFN a MoE layer at `path` replaces (`fused`: `path` is a Flux single block's proj_mlp)."""
    if fused:
        block = model.get_submodule(path.rpartition(".")[0])
        up, act, out = block.proj_mlp, getattr(block, "act_mlp", None), block.proj_out
        if not (isinstance(up, nn.Linear) and isinstance(act, nn.GELU) and isinstance(out, nn.Linear)
                and out.in_features == up.in_features + up.out_features):
            raise UnsupportedModelError(f"{path}: a fused MLP converts from proj_mlp -> GELU -> proj_out columns; "
                                        f"found {type(up).__name__} / {type(act).__name__} / {type(out).__name__}")
        return DenseFFN(path, up, out.weight[:, up.in_features:], out.bias, act.approximate, (act, "output"), True)
    return feedforward(model.get_submodule(path), path)


def feedforward(ff: nn.Module, path: str = "ff") -> DenseFFN:
    """A diffusers GELU FeedForward module as a DenseFFN."""
    act = getattr(ff, "net", [None])[0]
    if not (isinstance(getattr(act, "proj", None), nn.Linear) and hasattr(act, "approximate")
            and isinstance(ff.net[2], nn.Linear)):
        found = type(act).__name__ if act is not None else type(ff).__name__
        raise UnsupportedModelError(f"{path}: only GELU FeedForward layers convert to MoE, found {found}")
    return DenseFFN(path, act.proj, ff.net[2].weight, ff.net[2].bias, act.approximate, (ff.net[2], "input"))


def dense_ffns(model: nn.Module, adapter: FamilyAdapter, targets: tuple[str, ...]) -> dict[str, DenseFFN]:
    """The FFNs named `targets` in their blocks ("ff", "ff_context"; "mlp": a Flux single block's
    fused MLP), by the path of the module their MoE layer replaces."""
    found = {}
    for view in adapter.layout(model).ffns():
        if view.name not in targets:
            continue
        if view.form == "replaced":
            raise UnsupportedModelError(f"{view.path}: already replaced by an earlier stage")
        if view.form not in ("feedforward", "fused"):
            raise UnsupportedModelError(f"{view.path}: only GELU FeedForward layers convert to MoE, "
                                        f"found a {view.form} FFN")
        ffn = dense_ffn_at(model, view.up if view.form == "fused" else view.path, view.form == "fused")
        found[ffn.path] = ffn
    if not found:
        raise UnsupportedModelError(f"{adapter.family}: no FFN named {list(targets)} in its blocks")
    return found


def ffn_parameters(model: nn.Module, adapter: FamilyAdapter) -> dict[str, tuple[int, int]]:
    """(parameters, parameters one token activates) of every FFN of the model, converted or not."""
    counts = {}
    for view in adapter.layout(model).ffns():
        if view.form == "fused":
            ffn = dense_ffn_at(model, view.up, fused=True)
            counts[ffn.path] = (ffn.parameters, ffn.parameters)
            continue
        module = model.get_submodule(view.path)
        total = sum(p.numel() for p in module.parameters())
        sparse = getattr(module, "activated_parameters", None)  # an earlier stage's mixture of experts
        counts[view.path] = (total, sparse() if sparse else total)
    return counts


def record_ffns(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, ffns: dict[str, DenseFFN],
                batches: int = 4, batch_size: int = 32, max_tokens: int = 1024) -> dict[str, dict]:
    """Per FFN: inputs x (T, dim), activations a (T, H), Taylor profiles (T, H), Taylor scores (H),
    on the first `max_tokens` tokens of each calibration draw (scores on all of them)."""
    data = {n: {"x": [], "a": [], "g": [], "score": 0.0} for n in ffns}

    def inputs(name, x):
        data[name]["x"].append(x.detach().reshape(-1, x.shape[-1])[:max_tokens])

    def hidden(name, a):  # the FFN's hidden activations (after the GELU)
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
        with Capture({n: f.up for n, f in ffns.items()}, at="input", on=inputs), \
                Capture({n: f.hidden_at[0] for n, f in ffns.items()}, at={n: f.hidden_at[1] for n, f in ffns.items()},
                        on=hidden):
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


def build_moe(ffn: DenseFFN, split: dict, top_k: int, stats: dict | None = None, ridge: float = 1e-2
              ) -> MoEFeedForward:
    """The MoE layer holding exactly the dense FFN's weights, partitioned by `split`."""
    up, down = ffn.up, ffn.down_weight
    dim, experts = up.in_features, split["experts"]
    moe = MoEFeedForward(dim, len(split["shared"]), len(experts), len(experts[0]), top_k, ffn.approximate)
    moe = moe.to(device=up.weight.device)
    with torch.no_grad():
        s = torch.tensor(split["shared"])
        moe.shared_up.weight.copy_(up.weight[s])
        moe.shared_up.bias.copy_(up.bias[s])
        moe.shared_down.weight.copy_(down[:, s])
        if ffn.down_bias is None:
            moe.shared_down.bias.zero_()
        else:
            moe.shared_down.bias.copy_(ffn.down_bias)
        for e, neurons in enumerate(experts):
            idx = torch.tensor(neurons)
            moe.up_weight[e].copy_(up.weight[idx].t())
            moe.up_bias[e, 0].copy_(up.bias[idx])
            moe.down_weight[e].copy_(down[:, idx].t())
        if stats is not None:
            init_router_(moe, stats, experts, down, ridge)
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
