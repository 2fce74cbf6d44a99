"""PPCL: Pluggable Pruning with Contiguous Layer distillation (Ma et al., 2025), as its official code does it.

1. Search (intervals.py): residual linear probes, a proxy model, CKA(u, k) and its first-order
   differential; turning points bound the candidate intervals (2..max_interval blocks), and the
   non-overlapping ones that lose the least CKA remove the requested number of blocks.
2. Depth: each interval collapses into ONE new block, initialised from its middle block.
   Width (optional, ffn_linear.py): the FFNs a least-squares linear map stands in for best are
   replaced by that map.
3. Contiguous layer distillation: the teacher's blocks stay frozen. In one teacher forward, each
   replacement receives the teacher's hidden states (every stream: image and text) at its
   interval's start and is matched to the teacher's states at its interval's end; each block
   whose FFN became a linear map is matched on its own teacher input and output. The loss is the
   per-token L2-normalised MSE (features normalised per token, squared error summed over features,
   averaged over tokens), summed over intervals and streams, and nothing else: no output loss.
   Only the replacements and the linear maps train.
4. Pluggable: since the teacher's blocks are untouched, any subset of the trained intervals can
   be switched in (plug.py): one training gives a family of sizes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...models.families import FamilyAdapter
from ...train.distill import Objective
from .intervals import Interval, streams
from .student import IntervalStudent, record_blocks


def token_normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The official alignment loss: both states L2-normalised per token, squared error summed over
    features, averaged over tokens."""
    s = student.float() / student.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    t = teacher.float() / teacher.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return ((s - t) ** 2).sum(-1).mean()


class PPCLStudent(IntervalStudent):
    """The teacher's blocks (frozen; FFNs chosen for width already linear maps) plus one trainable
    replacement per interval."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, intervals: list[Interval], ffn_blocks: list[int]):
        super().__init__(model, adapter, intervals)
        self.ffn_blocks = ffn_blocks  # global indices of the blocks whose FFN is a linear map


class ContiguousLayerDistillation(Objective):
    """One teacher forward; each replacement (and each block with a linear FFN) on the teacher's
    input to its span, matched to the teacher's state at the span's end."""

    def __init__(self, adapter: FamilyAdapter, student: PPCLStudent):
        self.adapter = adapter
        self.intervals = student.intervals
        self.ffn_blocks = student.ffn_blocks

    def describe(self):
        return f"ppcl-paper {[iv.to_json() for iv in self.intervals]} ffn {self.ffn_blocks}"

    def attach(self, teacher, student):
        blocks = [b for _, _, b in self.adapter.blocks(teacher)]
        starts = {iv.first for iv in self.intervals} | set(self.ffn_blocks)
        ends = {iv.last for iv in self.intervals} | set(self.ffn_blocks)
        self.calls: dict[int, tuple] = {}
        self.outs: dict[int, object] = {}
        self.handles = record_blocks(blocks, self.calls, self.outs, sorted(starts), sorted(ends))

    def loss(self, step, batch, teacher, student: PPCLStudent):
        x, t, cond = batch.x_t, batch.t, batch.cond
        with torch.no_grad():
            target = self.adapter.denoise(teacher, x, t, cond)
        terms = []
        for iv in self.intervals:
            args, kwargs = self.calls[iv.first]
            terms.append(self._align(student.replacements[iv.key](*args, **kwargs), self.outs[iv.last]))
        blocks = student.blocks()
        for i in self.ffn_blocks:
            args, kwargs = self.calls[i]
            terms.append(self._align(blocks[i](*args, **kwargs), self.outs[i]))
        with torch.no_grad(), student.assembled(self.intervals):  # logged only: the deepest plug's output error
            out_loss = torch.mean((self.adapter.denoise(student.model, x, t, cond) - target) ** 2)
        return torch.stack(terms).sum(), out_loss

    @staticmethod
    def _align(output, teacher_output) -> torch.Tensor:
        return torch.stack([token_normalised_mse(s, t)
                            for s, t in zip(streams(output), streams(teacher_output))]).sum()

    def close(self):
        for h in self.handles:
            h.remove()
