"""CLEAR (Liu et al., 2024): each image token attends only to image tokens closer than `radius`
on the token grid (Euclidean distance strictly below r), and, in joint-attention models, to
every text token; text tokens still attend to everything. With `down_factor` f > 1 (the
official code's down-sampled key/value tokens) every image query also attends to the image keys
and values pooled over f x f cells, each cell a learned weighting of its f^2 positions
(initialised to their mean); text queries do not see them.

The neighbourhood is computed, not masked out of a dense matrix: the grid is cut into
`tile` x `tile` query tiles, and each tile attends to its own halo window of
(tile + 2(r-1))^2 keys, where a fixed mask keeps the keys within distance r. Work and memory
grow linearly with the number of tokens, in PyTorch and in the exported ONNX graph (windows
are static gathers; there is no data-dependent shape). On CUDA the same attention runs as a
FlexAttention block-sparse kernel instead (`flex.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_MASKED = -1.0e4  # finite (fp16-safe): a padded query with no valid key stays finite


def _disc(tile: int, radius: int) -> torch.Tensor:
    """(tile^2, window^2) bool: key offset within the halo window is closer than `radius` to the query."""
    reach = radius - 1
    window = tile + 2 * reach
    qy, qx = torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(window) - reach, torch.arange(window) - reach, indexing="ij")
    d2 = (qy.reshape(-1, 1) - ky.reshape(1, -1)) ** 2 + (qx.reshape(-1, 1) - kx.reshape(1, -1)) ** 2
    return d2 < radius ** 2


def _window_index(rows: int, cols: int, size: int, stride: int) -> torch.Tensor:
    """(tiles * size^2,) positions in a row-major (rows x cols) map of every `size` window, every `stride`."""
    ty, tx = torch.arange(0, rows - size + 1, stride), torch.arange(0, cols - size + 1, stride)
    oy, ox = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    top = (ty[:, None] * cols + tx[None, :]).reshape(-1, 1)       # window origins, row-major
    return (top + (oy * cols + ox).reshape(1, -1)).reshape(-1)


def _tiles(x: torch.Tensor, grid: tuple[int, int], size: int, stride: int, pad: tuple[int, int, int, int]):
    """(B, h, N, d) grid tokens -> (B, h, tiles, size^2, d): windows of `size`, every `stride` tokens.
    A static gather (one index_select), which exports as a single Gather."""
    b, h, _, d = x.shape
    left, right, top, bottom = pad
    m = F.pad(x.view(b, h, *grid, d), (0, 0, left, right, top, bottom))
    rows, cols = grid[0] + top + bottom, grid[1] + left + right
    idx = _window_index(rows, cols, size, stride).to(x.device)
    return m.reshape(b, h, rows * cols, d).index_select(2, idx).view(b, h, -1, size * size, d)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], radius: int,
                    tile: int = 8, text_k: torch.Tensor | None = None, text_v: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Softmax attention of image queries q (B, h, N, d) over image keys within `radius` on the
    grid (and over all text keys, when given); returns (B, h, N, d)."""
    if radius < 1:
        raise ValueError(f"CLEAR radius must be >= 1, got {radius}")
    if q.is_cuda and not torch.onnx.is_in_onnx_export():
        from .flex import flex_local_attention

        return flex_local_attention(q, k, v, grid, radius, text_k, text_v)
    gh, gw = grid
    b, h, n, d = q.shape
    reach, window = radius - 1, tile + 2 * (radius - 1)
    ph, pw = -gh % tile, -gw % tile                                # pad the grid to whole tiles
    qt = _tiles(q * (1.0 / math.sqrt(d)), grid, tile, tile, (0, pw, 0, ph))  # (B, h, L, T^2, d), pre-scaled
    halo = (reach, reach + pw, reach, reach + ph)
    kt, vt = _tiles(k, grid, window, tile, halo), _tiles(v, grid, window, tile, halo)  # (B, h, L, W^2, d)
    inside = _tiles(torch.ones(1, 1, n, 1, device=q.device), grid, window, tile, halo)[0, 0, :, :, 0] > 0  # (L, W^2)
    keep = _disc(tile, radius).to(q.device)[None] & inside[:, None]  # (L, T^2, W^2)
    scores = (qt @ kt.transpose(-1, -2)).masked_fill(~keep, _MASKED)
    if text_k is not None:
        text_scores = torch.einsum("bhltd,bhsd->bhlts", qt, text_k)
        p = torch.cat([scores, text_scores], dim=-1).softmax(dim=-1)
        out = p[..., :window * window] @ vt + torch.einsum("bhlts,bhsd->bhltd", p[..., window * window:], text_v)
    else:
        out = scores.softmax(dim=-1) @ vt                         # (B, h, L, T^2, d)
    tiles_h, tiles_w = (gh + ph) // tile, (gw + pw) // tile
    out = out.view(b, h, tiles_h, tiles_w, tile, tile, d).permute(0, 1, 2, 4, 3, 5, 6)
    out = out.reshape(b, h, gh + ph, gw + pw, d)[:, :, :gh, :gw]
    return out.reshape(b, h, n, d)


class _Heads:
    """(B, N, h*d) <-> (B, h, N, d)."""

    @staticmethod
    def split(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    @staticmethod
    def merge(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class CLEARProcessor(nn.Module):
    """Image self-attention (DiT, PixArt) restricted to the grid neighbourhood (plus the pooled
    tokens). A module, so that the pooling weights train and save with the model."""

    def __init__(self, grid: tuple[int, int], radius: int, tile: int, down_factor: int = 1):
        super().__init__()
        self.grid, self.radius, self.tile, self.down_factor = tuple(grid), radius, tile, down_factor
        if down_factor > 1:
            f = down_factor
            self.spatial_weight = nn.Parameter(torch.full((1, 1, 1, f, 1, f, 1), 1.0 / (f * f)))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, N, d) image tokens -> (B, h, N / f^2, d): each f x f cell's learned weighting."""
        f, (gh, gw) = self.down_factor, self.grid
        b, h, _, d = x.shape
        return (x.view(b, h, gh // f, f, gw // f, f, d) * self.spatial_weight).sum(dim=(3, 5)).flatten(2, 3)

    def _global(self, k, v, text_k=None, text_v=None):
        """Keys and values every image query sees besides its neighbourhood: text, then pooled tokens."""
        if self.down_factor > 1:
            dk, dv = self.pooled(k), self.pooled(v)
            return (dk, dv) if text_k is None else (torch.cat([text_k, dk], 2), torch.cat([text_v, dv], 2))
        return text_k, text_v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        if encoder_hidden_states is not None:
            raise ValueError("CLEAR's self-attention processor got encoder states: cross-attention stays softmax")
        h = attn.heads
        q, k, v = (_Heads.split(f(hidden_states), h) for f in (attn.to_q, attn.to_k, attn.to_v))
        gk, gv = self._global(k, v)
        out = _Heads.merge(local_attention(q, k, v, self.grid, self.radius, self.tile, text_k=gk, text_v=gv))
        return attn.to_out[1](attn.to_out[0](out))


class CLEARJointProcessor(CLEARProcessor):
    """Joint text-image attention (SD3, Flux): image queries see their neighbourhood, every text
    token (and the pooled tokens); text queries see all text and image tokens, as in the family's
    own processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **_):
        from .joint import finish, project

        (q, k, v), (tq, tk, tv) = project(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.grid)
        gk, gv = self._global(k, v, tk, tv)  # pooled after the rotary embedding, as the official code does
        image = local_attention(q, k, v, self.grid, self.radius, self.tile, text_k=gk, text_v=gv)
        text = F.scaled_dot_product_attention(tq, torch.cat([k, tk], 2), torch.cat([v, tv], 2)) if tq.shape[2] else tq
        return finish(attn, _Heads.merge(image), _Heads.merge(text), encoder_hidden_states is not None)
