"""CLEAR on CUDA through FlexAttention: the neighbourhood as a block-sparse mask.

FlexAttention's fused kernel skips every (128 x 128) query/key block that its BlockMask marks
empty, so the work grows with the neighbourhood, not with the square of the token count. In
row-major token order the mask is already banded: a block of queries spans a few grid rows and
needs only the key blocks within `radius` rows of them, about (2r - 1) / side of all blocks.
Text keys (joint attention) come after the image keys and are always visible.

The tile path in `local.py` stays the CPU and ONNX path: an exported graph cannot hold a
FlexAttention kernel, and without torch.compile FlexAttention materialises every score.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@functools.lru_cache(maxsize=32)
def neighbourhood_mask(grid: tuple[int, int], radius: int, text: int, device: str) -> BlockMask:
    """Image query i sees image key j when their grid distance is below `radius`, and every text key."""
    gh, gw = grid
    n = gh * gw

    def near(b, h, q, kv):
        dy, dx = q // gw - kv // gw, q % gw - kv % gw
        return (kv >= n) | (dy * dy + dx * dx < radius * radius)

    # Compiled on CUDA: evaluated block by block instead of as one (N, N) tensor (gigabytes at 64k tokens).
    return create_block_mask(near, None, None, n, n + text, device=device, _compile=device.startswith("cuda"))


@functools.cache
def _compiled():
    # One compiled kernel per shape (dynamic=False keeps the block sizes static, as the kernel wants).
    # Sampling, distillation batches and resolutions each bring a shape: past dynamo's default of
    # 8 recompiles it would silently fall back to the unfused kernel that materialises every score.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def flex_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], radius: int,
                         text_k: torch.Tensor | None = None, text_v: torch.Tensor | None = None,
                         compiled: bool = True) -> torch.Tensor:
    """`local.local_attention`'s result, computed by FlexAttention; q, k, v (B, h, N, d)."""
    text = 0 if text_k is None else text_k.shape[2]
    if text:
        k, v = torch.cat([k, text_k], 2), torch.cat([v, text_v], 2)
    mask = neighbourhood_mask(tuple(grid), radius, text, str(q.device))
    return (_compiled() if compiled else flex_attention)(q, k, v, block_mask=mask)
