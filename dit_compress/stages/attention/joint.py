"""The projections around joint text-image attention, per family, shared by LiT and CLEAR.

`project` reproduces what diffusers' processor does before attention (Q/K/V of both streams,
q/k norms, Flux's rotary embedding) and hands back image and text parts separately, each
(B, heads, tokens, head_dim); `finish` reproduces what it does after (output projections, and
the stream order the block expects). Only the attention in between changes.

SD3 (JointAttnProcessor2_0): sequence [image, text]; returns (image, text).
Flux (FluxAttnProcessor): sequence [text, image], rotary embedding on both; double-stream
blocks return (image, text), single-stream blocks (no encoder states: the block already
concatenated [text, image]) return the unprojected sequence.
"""

from __future__ import annotations

import torch

JOINT_FAMILIES = ("sd3", "flux")


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def project(family: str, attn, hidden, encoder, rotary, grid: tuple[int, int]):
    """((q, k, v) of the image tokens, (q, k, v) of the text tokens)."""
    if family == "sd3":
        h = attn.heads
        q, k, v = (_split(f(hidden), h) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder is None:
            empty = q[:, :, :0]
            return (q, k, v), (empty, empty, empty)
        tq, tk, tv = (_split(f(encoder), h) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        return (q, k, v), (tq, tk, tv)
    if family == "flux":
        from diffusers.models.embeddings import apply_rotary_emb

        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  (B, N, h, d)
        q, k, v = heads(attn.to_q(hidden)), heads(attn.to_k(hidden)), heads(attn.to_v(hidden))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder is not None:
            tq, tk, tv = (heads(f(encoder)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
        if rotary is not None:
            q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        text = q.shape[2] - grid[0] * grid[1]
        return (q[:, :, text:], k[:, :, text:], v[:, :, text:]), (q[:, :, :text], k[:, :, :text], v[:, :, :text])
    raise ValueError(f"no joint attention projections for family {family!r}")


def finish(family: str, attn, image: torch.Tensor, text: torch.Tensor, has_encoder: bool):
    """The family processor's output from the attention outputs (B, tokens, width) of both streams."""
    if family == "sd3":
        out = attn.to_out[1](attn.to_out[0](image))
        if not has_encoder:
            return out
        # The last SD3 block (context_pre_only) has no text output projection and ignores its text output.
        return out, (text if attn.context_pre_only else attn.to_add_out(text))
    if not has_encoder:  # Flux single-stream block: its proj_out follows
        return torch.cat([text, image], dim=1)
    return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)
