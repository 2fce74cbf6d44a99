"""PPCL's search for redundant intervals: residual linear probes, a proxy model, CKA and its trend.

For every block i a residual linear probe P_i(x) = x + W_i x + b_i stands in for the block; it is
fitted in closed form (ridge-regularised least squares) from the teacher's hidden state entering
the block to the one leaving it, on half the calibration tokens. The proxy that replaces blocks
u..k by their probes, chained from the teacher's state at u, is compared with the teacher's state
after block k by linear CKA on the other half of the tokens: CKA(u, k). Its first-order
differential Δ(u, k) = CKA(u, k-1) - CKA(u, k) is the similarity a run loses by growing one block;
a turning point (a drop above `turn`) ends the interval that starts at u. Intervals are 2..max_len
blocks, within one block list, and never overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import RecipeError
from ...fileio import save_figure
from ...probes.redundancy import linear_cka


@dataclass(frozen=True)
class Interval:
    """Teacher blocks first..last (global indices) collapse into one block initialised from `anchor`."""

    first: int
    last: int
    anchor: int

    @property
    def key(self) -> str:
        return f"{self.first}-{self.last}"

    @property
    def saves(self) -> int:
        return self.last - self.first

    def blocks(self) -> range:
        return range(self.first, self.last + 1)

    def to_json(self) -> list[int]:
        return [self.first, self.last, self.anchor]


def plan_to_json(plan: list[Interval]) -> list[list[int]]:
    return [iv.to_json() for iv in plan]


def plan_from_json(plan: list[list[int]]) -> list[Interval]:
    return [Interval(*iv) for iv in plan]


def run_map(plan: list[Interval], names: list[str], student_names: list[str]) -> list[tuple[str, str]]:
    """(student block, teacher block) pairs: each student block ends where its run ends."""
    ends = []
    for i in range(len(names)):
        run = next((iv for iv in plan if i in iv.blocks()), None)
        if run is None:
            ends.append(i)
        elif i == run.anchor:
            ends.append(run.last)
    return list(zip(student_names, [names[e] for e in ends]))


def streams(output) -> list[torch.Tensor]:
    outs = output if isinstance(output, (tuple, list)) else (output,)
    return [o for o in outs if torch.is_tensor(o)]


def fit_probe(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Closed-form residual probe: [W; b] minimising |x W + b - (y - x)|² + ridge (float64)."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double()
    gram = xa.T @ xa
    lam = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xa.T @ (y - x).double())


def apply_probe(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x + x @ w[:-1] + w[-1]


@dataclass
class ProxyCurves:
    """CKA(u, k) of the probe proxy over blocks u..k against the teacher after block k."""

    cka: dict[int, list[float]]  # start u -> [CKA(u, u), CKA(u, u+1), ...] up to max_len blocks

    def trend(self, u: int) -> list[float]:
        c = self.cka[u]
        return [c[j - 1] - c[j] for j in range(1, len(c))]  # Δ(u, u+j)

    def to_json(self) -> dict:
        return {str(u): [round(v, 6) for v in c] for u, c in self.cka.items()}

    @classmethod
    def from_json(cls, d: dict) -> "ProxyCurves":
        return cls({int(u): list(c) for u, c in d.items()})


def proxy_curves(states: Sequence[torch.Tensor], groups: list[str], max_len: int) -> ProxyCurves:
    """Fit a probe per block (even token rows) and track each proxy's CKA (odd rows)."""
    L = len(groups)
    fit, test = slice(0, None, 2), slice(1, None, 2)
    probes = [fit_probe(states[i][fit], states[i + 1][fit]) for i in range(L)]
    cka = {}
    for u in range(L):
        z, curve = states[u][test].double(), []
        for k in range(u, min(L, u + max_len)):
            if groups[k] != groups[u]:
                break
            z = apply_probe(probes[k], z)
            curve.append(linear_cka(z, states[k + 1][test].double()))
        cka[u] = curve
    return ProxyCurves(cka)


def interval_end(curve: list[float], turn: float, min_len: int = 2) -> int:
    """Blocks past the start where the interval from this start ends: just before the first
    turning point (a CKA drop above `turn`), at least `min_len` blocks long, at most the curve."""
    for j in range(1, len(curve)):
        if curve[j - 1] - curve[j] > turn:
            return max(min_len - 1, j - 1)
    return len(curve) - 1


def candidate_costs(curves: ProxyCurves, protected: set[int], turn: float, min_len: int = 2
                    ) -> dict[tuple[int, int], float]:
    """Every interval [u, k] that ends at or before u's turning point, at least `min_len` blocks,
    holding at most one protected block; its cost is the CKA its proxy loses, 1 - CKA(u, k)."""
    costs = {}
    for u, curve in curves.cka.items():
        if len(curve) < min_len:
            continue
        for j in range(min_len - 1, interval_end(curve, turn, min_len) + 1):
            if len(protected & set(range(u, u + j + 1))) <= 1:
                costs[(u, u + j)] = max(0.0, 1.0 - curve[j])
    return costs


def plan_removal(costs: dict[tuple[int, int], float], num_blocks: int, saves: int) -> list[tuple[int, int]]:
    """Disjoint intervals removing exactly `saves` blocks at least total cost (dynamic programme)."""
    inf = float("inf")
    best = [[inf] * (saves + 1) for _ in range(num_blocks + 1)]
    choice: list[list[tuple | None]] = [[None] * (saves + 1) for _ in range(num_blocks + 1)]
    best[0][0] = 0.0
    for i in range(num_blocks):
        for s in range(saves + 1):
            if best[i][s] == inf:
                continue
            if best[i][s] < best[i + 1][s]:  # block i stays
                best[i + 1][s], choice[i + 1][s] = best[i][s], (i, s, None)
            for (a, b), c in costs.items():
                if a != i or s + (b - a) > saves:
                    continue
                s2 = s + b - a
                if best[i][s] + c < best[b + 1][s2]:
                    best[b + 1][s2], choice[b + 1][s2] = best[i][s] + c, (i, s, (a, b))
    if best[num_blocks][saves] == inf:
        return []
    runs, i, s = [], num_blocks, saves
    while i > 0:
        pi, ps, run = choice[i][s]
        if run:
            runs.append(run)
        i, s = pi, ps
    return sorted(runs)


def select_intervals(costs: dict[tuple[int, int], float], num_blocks: int, savings: list[int], protected: set[int]
                     ) -> tuple[list[Interval], dict[int, list[str]]]:
    """Intervals for every size, each smaller size a plug (subset) of the deepest one's.

    The deepest size takes the non-overlapping intervals of least total CKA lost that remove
    exactly its blocks; each smaller size the subset of those of least CKA lost that removes
    exactly its own. Where no subset fits, sizes are planned smallest first, each adding
    intervals to the previous. Returns every interval (most redundant per removed block first)
    and, per size, the keys of the intervals it plugs."""
    for plan in (_deepest_first, _smallest_first):
        runs = plan(costs, num_blocks, sorted(savings))
        if runs is not None:
            break
    else:
        raise RecipeError(
            f"prune (ppcl): no set of non-overlapping redundant intervals removes "
            f"{' / '.join(map(str, sorted(savings)))} of {num_blocks} blocks as nested plugs; lower the ratio, "
            f"drop a size from `ratios`, raise `max_interval`, or raise `turn` (the CKA drop that ends an interval)")
    every = sorted({ab for rs in runs.values() for ab in rs}, key=lambda ab: (costs[ab] / (ab[1] - ab[0]), ab))
    order = [_with_anchor(a, b, protected) for a, b in every]
    return order, {s: [iv.key for iv in order if (iv.first, iv.last) in runs[s]] for s in savings}


def _deepest_first(costs, num_blocks: int, savings: list[int]) -> dict[int, set] | None:
    deepest = plan_removal(costs, num_blocks, savings[-1])
    if not deepest:
        return None
    runs = {savings[-1]: set(deepest)}
    for s in savings[:-1]:
        best = None  # the cheapest subset removing exactly s blocks (few intervals: enumerate)
        for mask in range(1, 1 << len(deepest)):
            subset = [ab for k, ab in enumerate(deepest) if mask >> k & 1]
            if sum(b - a for a, b in subset) == s:
                cost = sum(costs[ab] for ab in subset)
                if best is None or cost < best[0]:
                    best = cost, set(subset)
        if best is None:
            return None
        runs[s] = best[1]
    return runs


def _smallest_first(costs, num_blocks: int, savings: list[int]) -> dict[int, set] | None:
    runs, taken = {}, set()
    for s in savings:
        used = {i for a, b in taken for i in range(a, b + 1)}
        free = {ab: c for ab, c in costs.items() if not used & set(range(ab[0], ab[1] + 1))}
        need = s - sum(b - a for a, b in taken)
        more = plan_removal(free, num_blocks, need) if need else []
        if need and not more:
            return None
        taken |= set(more)
        runs[s] = set(taken)
    return runs


def _with_anchor(first: int, last: int, protected: set[int]) -> Interval:
    # The paper initialises the replacement from the middle block; a block the architecture needs
    # in place (DiT's block 0, SD3's last joint block) must be the one kept.
    inside = protected & set(range(first, last + 1))
    return Interval(first, last, min(inside) if inside else (first + last) // 2)


def plot_search(curves: ProxyCurves, chosen: list[list[int]], turn: float, names: list[str], path: Path) -> None:
    """CKA(u, k) of every start's proxy, its first-order differential with the turning threshold,
    and the chosen intervals over the blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (c1, c2, c3) = plt.subplots(1, 3, figsize=(14, 3.8))
    cmap = plt.get_cmap("viridis")
    L = len(names)
    for u, curve in curves.cka.items():
        ks = np.arange(u, u + len(curve))
        c1.plot(ks, curve, "-", color=cmap(u / max(1, L - 1)), lw=1, alpha=0.8)
        if len(curve) > 1:
            c2.plot(ks[1:], np.diff(curve) * -1, "-", color=cmap(u / max(1, L - 1)), lw=1, alpha=0.8)
    c1.set_title("CKA(u, k): probe proxy over u..k vs teacher", fontsize=9)
    c1.set_xlabel("k (last block replaced)")
    c2.axhline(turn, color="tab:red", ls="--", lw=1, label=f"turning point > {turn:g}")
    c2.set_title("Δ(u, k) = CKA(u, k-1) - CKA(u, k)", fontsize=9)
    c2.set_xlabel("k")
    c2.legend(fontsize=7)
    for k, (a, b) in enumerate(chosen):
        c3.barh(0, b - a + 1, left=a - 0.5, color=cmap(k / max(1, len(chosen))), edgecolor="k")
        c3.annotate(f"{a}..{b}", ((a + b) / 2, 0), ha="center", va="center", fontsize=7, color="w")
    c3.set_xlim(-0.5, L - 0.5)
    c3.set_yticks([])
    c3.set_title("intervals collapsed (most redundant first: darker)", fontsize=9)
    c3.set_xlabel("block")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
