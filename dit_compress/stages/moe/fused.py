"""A Flux single-stream block's fused MLP made into a stand-alone FFN, so that it converts like any other.

The block computes `proj_out(cat([attn, gelu(proj_mlp(h))]))`: its MLP is proj_mlp, the GELU and
the MLP columns of proj_out. After `separate_mlp_` the block's own forward (unchanged diffusers
code) computes the same sum in another order: `proj_mlp` is the whole MLP (up, GELU, down, proj_out's
bias; here a mixture of experts), `act_mlp` is the identity, and `proj_out` projects the attention
columns and adds the MLP's output: `W_a attn + (W_m gelu(...) + b)`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class AttentionOutput(nn.Module):
    """proj_out of a single block whose MLP carries its own down-projection: input [attn, mlp output]."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, mlp = x.split(self.attn.in_features, dim=-1)
        return self.attn(attn) + mlp


def separate_mlp_(block: nn.Module, mlp: nn.Module) -> None:
    """Put `mlp` (dim -> dim, equal to gelu(proj_mlp) through proj_out's MLP columns plus its bias)
    in place of `block.proj_mlp` and keep only proj_out's attention columns."""
    dim = block.proj_mlp.in_features
    out = AttentionOutput(dim).to(device=block.proj_out.weight.device, dtype=block.proj_out.weight.dtype)
    with torch.no_grad():
        out.attn.weight.copy_(block.proj_out.weight[:, :dim])
    block.proj_mlp, block.act_mlp, block.proj_out = mlp, nn.Identity(), out
