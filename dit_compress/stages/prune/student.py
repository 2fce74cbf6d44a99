"""What both PPCL methods train: the teacher's model plus one replacement block per interval,
and the teacher-side hooks that record what each block receives and returns."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch.nn as nn

from ...models.families import FamilyAdapter
from .depth import remove_blocks_
from .intervals import Interval


class IntervalStudent(nn.Module):
    """The model (a copy of the teacher) and a replacement per interval, initialised from its anchor."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, intervals: list[Interval]):
        super().__init__()
        self.model, self.adapter = model, adapter
        self.intervals = intervals
        blocks = self.blocks()
        self.replacements = nn.ModuleDict({iv.key: copy.deepcopy(blocks[iv.anchor]) for iv in intervals})

    def blocks(self) -> list[nn.Module]:
        return [b for _, _, b in self.adapter.blocks(self.model)]

    def _assembly(self, plan: list[Interval]) -> list[tuple[str, nn.Module, int]]:
        """(block list, module, teacher block where its interval ends) of the student of `plan`."""
        out = []
        for i, (g, _, block) in enumerate(self.adapter.blocks(self.model)):
            run = next((iv for iv in plan if i in iv.blocks()), None)
            if run is None:
                out.append((g.attr, block, i))
            elif i == run.anchor:
                out.append((g.attr, self.replacements[run.key], run.last))
        return out

    @contextmanager
    def assembled(self, plan: list[Interval]):
        """Temporarily the student of `plan`: replacements in place, the rest of each interval out."""
        originals = {g.attr: getattr(self.model, g.attr) for g in self.adapter.block_groups}
        assembly = self._assembly(plan)
        try:
            for attr in originals:
                setattr(self.model, attr, nn.ModuleList([m for a, m, _ in assembly if a == attr]))
            yield self.model
        finally:
            for attr, blocks in originals.items():
                setattr(self.model, attr, blocks)

    def deploy(self, plan: list[Interval], adapter_for) -> tuple[nn.Module, list[int]]:
        """A standalone model of `plan`: its replacements in place, the rest of each interval removed."""
        model = copy.deepcopy(self.model)
        located = [(g.attr, j) for g, j, _ in self.adapter.blocks(model)]
        for iv in plan:
            attr, j = located[iv.anchor]
            getattr(model, attr)[j] = copy.deepcopy(self.replacements[iv.key])
        removed = sorted(i for iv in plan for i in iv.blocks() if i != iv.anchor)
        remove_blocks_(model, adapter_for(model), removed)
        return model.eval().requires_grad_(False), removed


def record_blocks(blocks: list[nn.Module], calls: dict | list, outs: dict | list,
                  inputs_of, outputs_of) -> list:
    """Hooks keeping calls[i] = (args, kwargs) for each block i in `inputs_of` and outs[i] = its
    output for each i in `outputs_of`, on every forward; returns the handles."""
    def pre(i):
        def hook(_m, args, kwargs):
            calls[i] = (args, kwargs)
        return hook

    def post(i):
        def hook(_m, _args, output):
            outs[i] = output
        return hook

    handles = [blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True) for i in inputs_of]
    return handles + [blocks[i].register_forward_hook(post(i)) for i in outputs_of]
