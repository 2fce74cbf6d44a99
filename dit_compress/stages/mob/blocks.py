"""Mixture of Blocks: per sample (and so per timestep), a router runs only some blocks of a group.

Consecutive blocks form groups of `group_size`; at a group's first block a router picks
`active` blocks for each sample. The paper's router (`AdaLNRouter`, the default) scores
TopK(alpha * W_x [x, c] + (1 - alpha) * W_y y + b): x the hidden state entering the group and c
the condition tokens entering it (absent for class-conditional DiT), each averaged over tokens,
and y the model's AdaLN embedding of timestep and condition, read by a forward hook on the
family's embedding module (`EmbeddingTap`). `HiddenRouter` (option `router: hidden`) reads only
the hidden state's mean and spread over tokens.
Only the samples that chose a block are gathered and run through it; the others pass it
unchanged. A chosen block's update is scaled by a straight-through gate (value 1, gradient
of its logit), so the router learns from the distillation loss while outputs stay exact.
The router's bias starts at each block's Block Influence and its weights at zero, so before
training every group keeps its most influential blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class EmbeddingTap:
    """The last output of the module it is hooked on (the AdaLN embedding); shared by the routers."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def keep(self, _module, _args, output) -> None:
        self.value = output


class BlockRouter(nn.Module):
    """Picks `active` of a group's blocks per sample from `logits(hidden, context)`."""

    def __init__(self, active: int):
        super().__init__()
        self.active = active
        self.choice: torch.Tensor | None = None  # (B, group_size) bool, set at the group's first block
        self.gates: torch.Tensor | None = None

    def logits(self, hidden: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> None:
        logits = self.logits(hidden, context)
        top = logits.topk(self.active, dim=-1).indices
        self.choice = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
        self.gates = 1 + logits - logits.detach()  # straight-through: 1 forward, d/dlogit backward


class HiddenRouter(BlockRouter):
    """A linear layer on the mean and spread over tokens of the hidden state entering the group."""

    def __init__(self, dim: int, group_size: int, active: int):
        super().__init__(active)
        self.proj = nn.Linear(2 * dim, group_size)
        nn.init.zeros_(self.proj.weight)

    def logits(self, hidden, context):
        h = hidden.float()
        return self.proj(torch.cat([h.mean(dim=1), h.std(dim=1)], dim=-1).to(self.proj.weight.dtype))


class AdaLNRouter(BlockRouter):
    """alpha * W_x [x, c] + (1 - alpha) * W_y y + b (the paper's router, with a bias to start from)."""

    def __init__(self, dim: int, context_dim: int, embedding_dim: int, group_size: int, active: int,
                 alpha: float, tap: EmbeddingTap):
        super().__init__(active)
        self.alpha, self.context_dim = alpha, context_dim
        self.proj_x = nn.Linear(dim + context_dim, group_size, bias=False)
        self.proj_y = nn.Linear(embedding_dim, group_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(group_size))
        nn.init.zeros_(self.proj_x.weight)
        nn.init.zeros_(self.proj_y.weight)
        self.__dict__["tap"] = tap  # shared with the other routers; not state

    def logits(self, hidden, context):
        y = self.tap.value
        if y is None or y.shape[0] != hidden.shape[0]:
            raise RuntimeError("Mixture of Blocks: the AdaLN embedding was not computed before the routed blocks")
        feats = [hidden.mean(dim=1)]
        if self.context_dim:
            feats.append(context.mean(dim=1))
        dtype = self.proj_x.weight.dtype
        return (self.alpha * self.proj_x(torch.cat(feats, dim=-1).to(dtype))
                + (1 - self.alpha) * self.proj_y(y.to(dtype)) + self.bias)


class RoutedBlock(nn.Module):
    """A transformer block that runs only for the samples its group router chose."""

    def __init__(self, block: nn.Module, router: BlockRouter, position: int):
        super().__init__()
        self.block, self.position = block, position
        self.__dict__["router"] = router  # shared with the group: not a submodule of each block

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. DiT's output head reads transformer_blocks[0].norm1
            return getattr(self.block, name)

    def forward(self, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.position == 0:
            self.router.decide(hidden, kwargs.get("encoder_hidden_states"))
        batch = hidden.shape[0]
        rows = self.router.choice[:, self.position].nonzero().flatten()
        chosen = rows.shape[0]
        # When no sample chose the block it still runs on one discarded row (sample 0): an empty
        # batch would need a data-dependent branch, which the ONNX export cannot trace.
        padded = torch.cat([rows, rows.new_zeros(1)])[:torch.sym_max(chosen, 1)]

        def take(v):
            return v.index_select(0, padded) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v

        out = self.block(*[take(a) for a in args], **{k: take(v) for k, v in kwargs.items()})
        gate = self.router.gates[rows, self.position]
        # Joint blocks (SD3, Flux) return (text, image) and pass both streams through.
        identity = (kwargs.get("encoder_hidden_states"), hidden) if isinstance(out, tuple) else (hidden,)
        outs = out if isinstance(out, tuple) else (out,)
        merged = []
        for full, part in zip(identity, outs):
            if full is None or part is None:
                merged.append(part)
                continue
            g = gate.view(-1, *([1] * (part.dim() - 1))).to(part.dtype)
            update = g * (part[:chosen] - full.index_select(0, rows))
            merged.append(full.index_add(0, rows, update))
        return tuple(merged) if isinstance(out, tuple) else merged[0]


class MixtureOfBlocks(nn.Module):
    """The routers of one block list; `wrap_` puts RoutedBlocks in place of the routed blocks.

    `routed` lists the block indices that may be skipped (protected blocks always run); they
    are grouped `group_size` at a time in order. `router` is "adaln" (the paper's; `tap_` hooks
    it on the embedding module) or "hidden"."""

    def __init__(self, dim: int, routed: list[int], group_size: int, active: int, router: str = "hidden",
                 context_dim: int = 0, embedding_dim: int = 0, alpha: float = 0.5):
        super().__init__()
        if not 1 <= active <= group_size:
            raise ValueError(f"active={active} must be between 1 and group_size={group_size}")
        self.routed, self.group_size = list(routed), group_size
        self.tap = EmbeddingTap()
        groups = [self.routed[s:s + group_size] for s in range(0, len(self.routed), group_size)]

        def make(size: int, keep: int) -> BlockRouter:
            if router == "hidden":
                return HiddenRouter(dim, size, keep)
            return AdaLNRouter(dim, context_dim, embedding_dim, size, keep, alpha, self.tap)
        # A shorter last group keeps the same share of active blocks (at least one).
        self.routers = nn.ModuleList(make(len(g), max(1, round(active * len(g) / group_size))) for g in groups)

    def tap_(self, embedding: nn.Module) -> None:
        """Read the AdaLN embedding from `embedding`'s output on every forward."""
        embedding.register_forward_hook(self.tap.keep)

    def wrap_(self, blocks: nn.ModuleList) -> None:
        for k, i in enumerate(self.routed):
            blocks[i] = RoutedBlock(blocks[i], self.routers[k // self.group_size], k % self.group_size)

    def choices(self) -> torch.Tensor:
        """(batch, routed blocks) bool: which blocks ran for each sample in the last forward."""
        return torch.cat([r.choice for r in self.routers], dim=1)
