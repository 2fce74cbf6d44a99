"""Redundancy analysis of transformer blocks (the first step of PPCL).

On teacher calibration inputs across timesteps it records the image-stream hidden state at
every block boundary h_0 (input of block 0) .. h_L (output of the last block), then measures

- per block i: mean token cosine(h_i, h_{i+1}) and linear CKA(h_i, h_{i+1});
- linear CKA between every pair of boundaries;
- linear probes: a ridge-regression map h_i -> h_{i+1} fitted on half the tokens, its R²
  on the other half (how well a linear layer could stand in for the block);
- the first-order differential of the block-similarity curve.

Redundant intervals are maximal runs of removable blocks whose similarity is high and whose
trend is flat (small first-order differential); each interval is scored by a linear probe
across the whole interval, h_start -> h_end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ...data.calibration import CalibrationSet
from ...models.families import FamilyAdapter
from ...train.distill import image_hidden


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019) of two (tokens, features) sets."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-12))


def probe_r2(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> float:
    """Held-out R² of a ridge-regression linear probe y ≈ x W + b (fit on even rows, test on odd)."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double()
    y = y.double()
    fit, test = slice(0, None, 2), slice(1, None, 2)
    gram = xa[fit].T @ xa[fit]
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xa[fit].T @ y[fit])
    resid = ((xa[test] @ w - y[test]) ** 2).sum()
    total = ((y[test] - y[test].mean(0)) ** 2).sum()
    return float(1 - resid / total.clamp_min(1e-12))


@dataclass
class RedundancyAnalysis:
    block_names: list[str]
    removable: list[bool]
    cosine: list[float]
    cka: list[float]
    probe_r2: list[float]
    trend: list[float]  # first-order differential of `cka` (len L-1)
    cka_matrix: list[list[float]]
    intervals: list[dict]  # {"blocks": [a..b], "probe_r2": r, "mean_cka": c}, best first

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def boundary_states(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, batches: int = 4,
                    batch_size: int = 64, max_tokens: int | None = 8192,
                    first_batch: int = 20_000_000) -> list[torch.Tensor]:
    """Image hidden states (tokens, features) at every block boundary, on calibration batches.

    Batch indices start at `first_batch`, far from the indices distillation trains on."""
    blocks = [b for _, _, b in adapter.blocks(model)]
    states: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]

    def pre(_m, args, kwargs):
        states[0].append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).flatten(0, -2))

    def post(i):
        def hook(_m, _args, output):
            states[i + 1].append(image_hidden(output).flatten(0, -2))
        return hook

    handles = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        for k in range(batches):
            b = calib.batch(first_batch + k, batch_size)
            adapter.denoise(model, b.x_t, b.t, b.cond)
    finally:
        for h in handles:
            h.remove()
    out = [torch.cat(s).float() for s in states]
    if max_tokens is None or len(out[0]) <= max_tokens:
        return out
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(out[0]), generator=g)[:max_tokens]
    return [s[keep] for s in out]


def block_influence(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet,
                    batches: int = 4, batch_size: int = 64) -> list[float]:
    """Block Influence (ShortGPT): 1 - mean token cosine(input, output) of each block's image
    stream. A block whose output is nearly its input changes little and goes first."""
    h = boundary_states(model, adapter, calib, batches, batch_size, max_tokens=None, first_batch=10_000_000)
    return [float(1 - torch.cosine_similarity(h[i], h[i + 1], dim=-1).mean()) for i in range(len(h) - 1)]


def find_intervals(similarity: list[float], removable: list[bool], flat: float | None = None) -> list[list[int]]:
    """Maximal runs of removable blocks with similarity at or above the median and a flat trend.

    A block joins its predecessor's run when the first-order differential between them is
    below `flat` (default: the median absolute differential)."""
    s = np.asarray(similarity)
    diff = np.abs(np.diff(s))
    if flat is None:
        flat = float(np.median(diff)) if len(diff) else 0.0
    high = s >= np.median(s)
    runs: list[list[int]] = []
    for i in range(len(s)):
        if not (high[i] and removable[i]):
            continue
        if runs and runs[-1][-1] == i - 1 and diff[i - 1] <= flat:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def analyse_redundancy(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet,
                       batches: int = 4, batch_size: int = 64) -> RedundancyAnalysis:
    return analyse_states(boundary_states(model, adapter, calib, batches, batch_size), model, adapter)


def analyse_states(h: list[torch.Tensor], model: nn.Module, adapter: FamilyAdapter) -> RedundancyAnalysis:
    """The analysis of boundary states `h` (from `boundary_states`) of `model`'s blocks."""
    names = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
    protected = {f"{g}.{i}" for g, i in adapter.protected_blocks(model)}
    removable = [n not in protected for n in names]
    L = len(names)
    cosine = [float(torch.cosine_similarity(h[i], h[i + 1], dim=-1).mean()) for i in range(L)]
    cka = [linear_cka(h[i], h[i + 1]) for i in range(L)]
    r2 = [probe_r2(h[i], h[i + 1]) for i in range(L)]
    matrix = [[linear_cka(h[i], h[j]) if i != j else 1.0 for j in range(L + 1)] for i in range(L + 1)]
    intervals = []
    for run in find_intervals(cka, removable):
        a, b = run[0], run[-1]
        intervals.append({"blocks": run, "probe_r2": round(probe_r2(h[a], h[b + 1]), 5),
                          "mean_cka": round(float(np.mean([cka[i] for i in run])), 5)})
    intervals.sort(key=lambda iv: -iv["probe_r2"])
    rnd = lambda xs: [round(x, 5) for x in xs]  # noqa: E731
    return RedundancyAnalysis(names, removable, rnd(cosine), rnd(cka), rnd(r2), rnd(np.diff(cka).tolist()),
                              [rnd(row) for row in matrix], intervals)


def plot_analysis(analysis: RedundancyAnalysis | dict, path: Path, chosen: list[list[int]] | None = None) -> None:
    """Similarity curves with the redundant intervals shaded (and the runs a pruning plan chose
    outlined), their first-order differential, and the CKA matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = RedundancyAnalysis(**analysis) if isinstance(analysis, dict) else analysis
    x = np.arange(len(a.block_names))
    fig, (c1, c2, c3) = plt.subplots(1, 3, figsize=(13, 3.6))
    c1.plot(x, a.cka, "o-", label="CKA(in, out)")
    c1.plot(x, a.cosine, "s--", label="cosine(in, out)")
    c1.plot(x, a.probe_r2, "^:", label="linear probe R²")
    for iv in a.intervals:
        c1.axvspan(iv["blocks"][0] - 0.4, iv["blocks"][-1] + 0.4, color="tab:red", alpha=0.15)
    for k, (first, last) in enumerate(chosen or []):
        c1.axvspan(first - 0.45, last + 0.45, fill=False, edgecolor="tab:blue", lw=1.5, ls="--",
                   label="collapsed by the plan" if k == 0 else None)
    for i, ok in enumerate(a.removable):
        if not ok:
            c1.annotate("kept", (i, min(a.cka)), ha="center", fontsize=7)
    c1.set_title("block similarity (shaded: redundant intervals)", fontsize=9)
    c1.set_xlabel("block")
    c1.legend(fontsize=7)
    c2.bar(x[:-1] + 0.5, a.trend)
    c2.axhline(0, color="k", lw=0.5)
    c2.set_title("first-order differential of CKA")
    c2.set_xlabel("between blocks")
    im = c3.imshow(np.array(a.cka_matrix), vmin=0, vmax=1, cmap="viridis")
    c3.set_title("linear CKA between block boundaries")
    c3.set_xlabel("boundary")
    fig.colorbar(im, ax=c3, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
