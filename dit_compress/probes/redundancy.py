"""Redundancy of transformer blocks (the first step of PPCL), from their boundary states.

On teacher calibration inputs across timesteps, `boundaries.boundary_states` records the
image-stream hidden state at every block boundary h_0 (input of block 0) .. h_L (output of
the last block); this module then measures

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

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data.calibration import CalibrationSet
from ..fileio import save_figure
from ..models.families import FamilyAdapter
from .boundaries import boundary_states

def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019) of two (tokens, features) sets."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-12))


def cka_matrix(h: Sequence[torch.Tensor]) -> list[list[float]]:
    """Linear CKA between every pair of boundaries: each boundary's self-similarity norm once,
    each cross term once (the matrix is symmetric), two boundaries in memory at a time."""
    n = len(h)

    def centred(i):
        return h[i] - h[i].mean(0, keepdim=True)

    self_norm = [float((c.T @ c).norm()) for c in map(centred, range(n))]
    m = [[1.0] * n for _ in range(n)]
    for i in tqdm(range(n), desc="probe: CKA between block boundaries", leave=False, disable=n < 3):
        x = centred(i)
        for j in range(i + 1, n):
            cross = float((centred(j).T @ x).norm() ** 2)
            m[i][j] = m[j][i] = cross / max(self_norm[i] * self_norm[j], 1e-12)
    return m


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
                       batches: int = 4, batch_size: int = 64, folder: Path | None = None) -> RedundancyAnalysis:
    """The analysis on calibration batches; with `folder`, boundary states stream through disk."""
    states = boundary_states(model, adapter, calib, batches, batch_size, folder=folder)
    analysis = analyse_states(states, model, adapter)
    if folder is not None:
        shutil.rmtree(folder)
    return analysis


def analyse_states(h: Sequence[torch.Tensor], model: nn.Module, adapter: FamilyAdapter) -> RedundancyAnalysis:
    """The analysis of boundary states `h` (from `boundary_states`) of `model`'s blocks."""
    names = [f"{g.attr}.{i}" for g, i, _ in adapter.blocks(model)]
    protected = {f"{g}.{i}" for g, i in adapter.protected_blocks(model)}
    removable = [n not in protected for n in names]
    cosine, cka, r2 = [], [], []
    for i in tqdm(range(len(names)), desc="probe: block similarity and linear probes", leave=False):
        cosine.append(float(torch.cosine_similarity(h[i], h[i + 1], dim=-1).mean()))
        cka.append(linear_cka(h[i], h[i + 1]))
        r2.append(probe_r2(h[i], h[i + 1]))
    matrix = cka_matrix(h)
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
    save_figure(fig, path)
    plt.close(fig)
