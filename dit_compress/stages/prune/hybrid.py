"""`ppcl-hybrid`: this project's first PPCL, kept under its own name (the paper's PPCL is ppcl.py).

It departs from the paper in the search (a ridge R² per pair of boundaries and a dynamic
programme), the initialisation (the run's first block), what trains (every block) and the loss
(output + chained block matching + teacher-input block matching); docs/methods/ppcl.md compares.

1. Plan. Every contiguous run of blocks [a..b] (2..max_len blocks, within one block list,
   at most one architecturally protected block) is a candidate to collapse into one block.
   Its cost is 1 - R² of a linear probe from the teacher's hidden state entering the run to the
   one leaving it: a run that a linear map can stand in for is one a single block can learn.
   For each requested ratio, a dynamic programme picks the disjoint runs of least total cost
   that remove exactly that many blocks.
2. Supernet. The student keeps a copy of every teacher block, plus one replacement block per
   planned run (initialised from the run's first block, or its protected one), all
   optionally width-pruned first (heads and FFN channels, Torch-Pruning).
3. Contiguous-layer distillation, one phase for all ratios and for depth and width together:
   - non-sequential block losses: every student block and every replacement is fed the
     teacher's hidden states at its run's input and matched to the teacher's hidden states at
     its run's output, so errors cannot accumulate along the depth and each replacement can be
     plugged in independently of the others;
   - distillation of assembled students: each step assembles the student of one ratio, i.e.
     teacher-initialised blocks interleaved with the replacements of that ratio's runs, and
     matches the teacher's prediction and, at every block, the teacher's hidden state where
     that block's run ends. Ratios alternate in a fixed interleaved schedule in proportion to
     the blocks they remove, so deeper cuts get more of the budget.
4. Deployment. Any trained ratio assembles into a plain model without further training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...errors import RecipeError
from ...models.families import FamilyAdapter
from ...train.distill import Objective, normalised_mse
from ...probes.redundancy import probe_r2
from .intervals import Interval, plan_removal, plan_to_json, streams
from .student import IntervalStudent, record_blocks


def interval_costs(states: Sequence[torch.Tensor], groups: list[str], protected: set[int], max_len: int,
                   allowed: list[tuple[int, int]] | None = None) -> dict[tuple[int, int], float]:
    """1 - held-out R² of a linear probe across each candidate run [a..b]."""
    L = len(groups)
    spans = allowed if allowed is not None else [
        (a, b) for a in range(L) for b in range(a + 1, min(L, a + max_len))]
    costs = {}
    for a, b in spans:
        if len(set(groups[a:b + 1])) > 1 or len(protected & set(range(a, b + 1))) > 1:
            continue
        costs[(a, b)] = max(0.0, 1.0 - probe_r2(states[a], states[b + 1]))
    return costs


def make_plans(states: Sequence[torch.Tensor], groups: list[str], protected: set[int], savings: list[int],
               max_len: int, allowed: list[tuple[int, int]] | None = None
               ) -> tuple[dict[int, list[Interval]], dict[tuple[int, int], float]]:
    """For each number of blocks to remove, the runs to collapse (with their anchors)."""
    costs = interval_costs(states, groups, protected, max_len, allowed)
    plans = {}
    for saves in savings:
        runs = plan_removal(costs, len(groups), saves)
        if not runs:
            raise RecipeError(
                f"prune (ppcl): no set of runs removes {saves} of {len(groups)} blocks with at most "
                f"{max_len} blocks per run; raise max_interval or lower the ratio")
        plans[saves] = []
        for a, b in runs:
            # The replacement receives the run's input, which is what the run's first block was
            # trained on (measured on the digits DiT's pairs: started from the second, more
            # influential block, the 50 % student ends 13 % worse in Fréchet distance).
            plans[saves].append(Interval(a, b, min(protected & set(range(a, b + 1)), default=a)))
    return plans, costs


class PluggableSupernet(IntervalStudent):
    """A student holding a copy of every teacher block plus one replacement per planned run."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, plans: list[list[Interval]]):
        super().__init__(model, adapter, sorted({iv for plan in plans for iv in plan}, key=lambda iv: (iv.first, iv.last)))
        self.plans = plans
        # Blocks that some ratio keeps; the others only ever serve as anchors' initialisation.
        self.kept_somewhere = [i for i in range(len(self.blocks()))
                               if any(all(i not in iv.blocks() for iv in plan) for plan in plans)]

    def forward(self, x, t, cond, calls: list[tuple[tuple, dict]], plan_index: int):
        """The assembled student of one plan: its prediction and each block's output with the
        teacher block where that block's run ends; then every block's output on teacher inputs."""
        plan = self.plans[plan_index]
        chain: list[tuple[object, int]] = []
        hooks = [m.register_forward_hook(lambda _m, _a, out, end=end: chain.append((out, end)))
                 for _, m, end in self._assembly(plan)]
        try:
            with self.assembled(plan):
                pred = self.adapter.denoise(self.model, x, t, cond)
        finally:
            for h in hooks:
                h.remove()
        blocks = self.blocks()
        outputs = {f"block{i}": blocks[i](*calls[i][0], **calls[i][1]) for i in self.kept_somewhere}
        for iv in self.intervals:
            args, kwargs = calls[iv.first]
            outputs[iv.key] = self.replacements[iv.key](*args, **kwargs)
        return pred, chain, outputs

    def targets(self) -> dict[str, int]:
        """Which teacher block's output each student module must reproduce."""
        t = {f"block{i}": i for i in self.kept_somewhere}
        t.update({iv.key: iv.last for iv in self.intervals})
        return t


class ContiguousLayerObjective(Objective):
    """For the assembled student of the step's ratio: output MSE + feature_weight x the
    teacher-normalised MSE of each block's output against the teacher's where its run ends;
    plus contiguous_weight x the same for every block / replacement fed teacher hidden states."""

    def __init__(self, adapter: FamilyAdapter, supernet: PluggableSupernet, contiguous_weight: float,
                 feature_weight: float):
        self.adapter, self.weight, self.feature_weight = adapter, contiguous_weight, feature_weight
        self.targets = supernet.targets()
        self.schedule = plan_schedule([sum(iv.saves for iv in plan) for plan in supernet.plans])
        self.plans = [plan_to_json(plan) for plan in supernet.plans]

    def describe(self):
        return f"ppcl {self.weight} {self.feature_weight} {self.plans}"

    def attach(self, teacher, student):
        blocks = [b for _, _, b in self.adapter.blocks(teacher)]
        self.calls: list = [None] * len(blocks)
        self.outs: list = [None] * len(blocks)
        everything = range(len(blocks))
        self.handles = record_blocks(blocks, self.calls, self.outs, everything, everything)

    def loss(self, step, batch, teacher, student):
        x, t, cond = batch.x_t, batch.t, batch.cond
        with torch.no_grad():
            target = self.adapter.denoise(teacher, x, t, cond)
        pred, chain, outputs = student(x, t, cond, self.calls, self.schedule[step % len(self.schedule)])
        out_loss = torch.mean((pred - target) ** 2)
        chained = [self._nmse(out, end) for out, end in chain]
        forced = [self._nmse(out, self.targets[key]) for key, out in outputs.items()]
        loss = out_loss + self.feature_weight * torch.stack(chained).mean() + self.weight * torch.stack(forced).mean()
        return loss, out_loss

    def _nmse(self, output, teacher_block: int) -> torch.Tensor:
        """Teacher-normalised MSE over every stream (image, and text where the block has one)."""
        return torch.stack([normalised_mse(s, t)
                            for s, t in zip(streams(output), streams(self.outs[teacher_block]))]).mean()

    def close(self):
        for h in self.handles:
            h.remove()


def plan_schedule(weights: list[int]) -> list[int]:
    """A cycle visiting plan i weights[i] times, evenly interleaved ([2, 4] -> [1, 0, 1, 1, 0, 1])."""
    slots = [((k + 0.5) / w, -w, i) for i, w in enumerate(weights) for k in range(w)]
    return [i for _, _, i in sorted(slots)]


def costs_to_json(costs: dict[tuple[int, int], float]) -> list[dict]:
    return [{"blocks": [a, b], "cost": round(c, 6)} for (a, b), c in sorted(costs.items())]

