"""LiT (Wang et al., 2025): ReLU linear attention plus a depthwise convolution on the value map.

    O = phi(Q) (phi(K)^T V) / (phi(Q) . sum_j phi(K_j)) + DWConv_k(V on the token grid),  phi = ReLU

phi(K)^T V is a (head_dim x head_dim) summary per head, so cost and memory grow linearly with
the number of tokens. The depthwise convolution restores the local detail that linear
attention's low-rank mixing loses. LiT uses few heads (2-4): head count sets the size of the
summaries and adds cost without adding quality. The processor is an `nn.Module` set on a
diffusers `Attention` (`attn.set_processor`), so its weights live in the model's state dict at
`...attn1.processor.*` and the projections it reads are the Attention's own `to_q/k/v/out`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LiTProcessor(nn.Module):
    def __init__(self, inner_dim: int, heads: int, grid: tuple[int, int], kernel: int = 5, eps: float = 1e-6):
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"LiT heads={heads} must divide the attention width {inner_dim}")
        if kernel % 2 == 0:
            raise ValueError(f"LiT kernel={kernel} must be odd (a centred window)")
        self.heads, self.grid, self.eps = heads, tuple(grid), eps
        self.dwc = nn.Conv2d(inner_dim, inner_dim, kernel, padding=kernel // 2, groups=inner_dim)

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("LiT replaces self-attention only; cross-attention keeps its softmax")
        b, n, _ = hidden_states.shape
        gh, gw = self.grid
        if n != gh * gw:
            raise ValueError(f"LiT was built for a {gh}x{gw} token grid ({gh * gw} tokens), got {n} tokens")
        v = attn.to_v(hidden_states)
        heads = lambda z: z.view(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731  (b, h, n, d)
        q, k, vh = F.relu(heads(attn.to_q(hidden_states))), F.relu(heads(attn.to_k(hidden_states))), heads(v)
        kv = k.transpose(-1, -2) @ vh                                   # (b, h, d, d): linear in n
        norm = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)         # (b, h, n, 1)
        out = (q @ kv) / (norm + self.eps)
        out = out.transpose(1, 2).reshape(b, n, -1)
        local = self.dwc(v.transpose(1, 2).reshape(b, -1, gh, gw)).flatten(2).transpose(1, 2)
        return attn.to_out[1](attn.to_out[0](out + local))
