"""The projections around joint text-image attention, shared by LiT and CLEAR.

`project` reproduces what the family's processor does before attention (Q/K/V of both
streams, q/k norms, the rotary embedding) and hands back image and text parts separately,
each (B, heads, tokens, head_dim); `finish` reproduces what it does after (output
projections, and the outputs the block expects). Only the attention in between changes.

Both read the attention module's own parts, so one code path serves every joint attention:
- with encoder states (MMDiT joint blocks: SD3, Flux double-stream), the text stream has its
  own projections (`add_*_proj`, `to_add_out`; none after the last SD3 block, whose text
  output is unused) and the block gets (image, text) back;
- without (Flux single-stream blocks), the block has already concatenated [text, image]; the
  attention has no output projection (the block's proj_out follows) and returns the sequence.
A rotary embedding (Flux) covers the [text, image] sequence.
"""

from __future__ import annotations

import torch


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def project(attn, hidden, encoder, rotary, grid: tuple[int, int]):
    """((q, k, v) of the image tokens, (q, k, v) of the text tokens)."""
    heads = lambda x: x.unflatten(-1, (attn.heads, -1))  # noqa: E731  (B, N, h, d)
    q, k, v = heads(attn.to_q(hidden)), heads(attn.to_k(hidden)), heads(attn.to_v(hidden))
    q, k = _norm(getattr(attn, "norm_q", None), q), _norm(getattr(attn, "norm_k", None), k)
    if encoder is not None:
        tq, tk, tv = (heads(f(encoder)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        tq, tk = _norm(getattr(attn, "norm_added_q", None), tq), _norm(getattr(attn, "norm_added_k", None), tk)
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
    if rotary is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    text = q.shape[2] - grid[0] * grid[1]
    return (q[:, :, text:], k[:, :, text:], v[:, :, text:]), (q[:, :, :text], k[:, :, :text], v[:, :, :text])


def finish(attn, image: torch.Tensor, text: torch.Tensor, has_encoder: bool):
    """The processor's output from the attention outputs (B, tokens, width) of both streams."""
    to_out = getattr(attn, "to_out", None)
    if not has_encoder:
        return attn.to_out[1](attn.to_out[0](image)) if to_out is not None else torch.cat([text, image], dim=1)
    to_add_out = getattr(attn, "to_add_out", None)
    return attn.to_out[1](attn.to_out[0](image)), (text if to_add_out is None else to_add_out(text))
