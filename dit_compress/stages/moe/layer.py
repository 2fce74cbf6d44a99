"""A diffusers FeedForward restructured as a mixture of experts, executed sparsely.

The FFN's hidden neurons are partitioned: a shared expert (always runs) and equally sized
routed experts, of which a linear router picks `top_k` per token. Only the chosen experts
run: tokens are gathered per expert, pushed through that expert's slice of the up/down
projections, weighted and scattered back (index_add) — no dense evaluation under a mask, in
PyTorch and in the exported ONNX graph alike (NonZero / Gather / ScatterND there).

Gates are top_k * softmax over the chosen logits, so with similar logits every chosen
expert gets weight ~1 and the sum of all experts reproduces the dense FFN exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, shared: int, experts: int, expert_size: int, top_k: int,
                 approximate: str = "tanh"):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({experts})")
        self.top_k, self.approximate = top_k, approximate
        self.shared_up = nn.Linear(dim, shared)
        self.shared_down = nn.Linear(shared, dim)  # carries the dense FFN's output bias
        self.up_weight = nn.Parameter(torch.zeros(experts, expert_size, dim))
        self.up_bias = nn.Parameter(torch.zeros(experts, expert_size))
        self.down_weight = nn.Parameter(torch.zeros(experts, dim, expert_size))
        self.router = nn.Linear(dim, experts)
        self.track = False  # training / analysis: keep router statistics of the last call
        self.last_probs: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.up_weight.shape[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, chosen expert ids, gates) for tokens x (N, dim)."""
        logits = self.router(x)
        top, idx = logits.topk(self.top_k, dim=-1)
        return logits, idx, self.top_k * top.softmax(dim=-1)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self.shared_down(F.gelu(self.shared_up(x), approximate=self.approximate))
        logits, idx, gates = self.route(x)
        if self.track:
            self.last_probs = logits.softmax(dim=-1)
            self.last_counts = torch.bincount(idx.flatten(), minlength=self.num_experts)
        for e in range(self.num_experts):
            token, slot = (idx == e).nonzero(as_tuple=True)  # the tokens that chose expert e
            h = F.gelu(x[token] @ self.up_weight[e].t() + self.up_bias[e], approximate=self.approximate)
            y = (h @ self.down_weight[e].t()) * gates[token, slot].unsqueeze(-1)
            out = out.index_add(0, token, y.to(out.dtype))
        return out.reshape(shape)

    def balance_loss(self) -> torch.Tensor:
        """Switch-Transformer load balancing: E * sum_e (token share of e) * (mean router prob of e)."""
        share = self.last_counts.float() / self.last_counts.sum()
        return self.num_experts * (share * self.last_probs.mean(dim=0)).sum()

    def activated_parameters(self) -> int:
        """FFN parameters one token uses: shared expert, router, top_k routed experts."""
        per_expert = self.up_weight[0].numel() + self.up_bias[0].numel() + self.down_weight[0].numel()
        return sum(p.numel() for p in (*self.shared_up.parameters(), *self.shared_down.parameters(),
                                       *self.router.parameters())) + self.top_k * per_expert
