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

import math
import shutil
from collections.abc import Sequence
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


def cka_matrix(h: Sequence[torch.Tensor]) -> list[list[float]]:
    """Linear CKA between every pair of boundaries: each boundary's self-similarity norm once,
    each cross term once (the matrix is symmetric), two boundaries in memory at a time."""
    n = len(h)

    def centred(i):
        return h[i] - h[i].mean(0, keepdim=True)

    self_norm = [float((c.T @ c).norm()) for c in map(centred, range(n))]
    m = [[1.0] * n for _ in range(n)]
    for i in range(n):
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


# Tokens one analysis forward may carry: full-size models at high resolution run calibration
# batches in chunks, so that the forward's own activations stay bounded too.
FORWARD_TOKENS = 16384


class BoundaryStates(Sequence):
    """Sampled image tokens at every block boundary h_0 (input of block 0) .. h_L, as (tokens, features).

    With a folder, each calibration batch's samples go to a safetensors shard on disk as the
    forward passes, and `h[i]` reads boundary i from every shard: an analysis holds the one or
    two boundaries it compares (plus a small cache), never every layer's activations. Without a
    folder the samples stay in memory. `order` puts sampled rows back in the order they were drawn."""

    def __init__(self, count: int, shards: list, order: torch.Tensor | None, cache: int = 2):
        self._count, self._shards, self._order = count, shards, order
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_size = cache

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        i = range(self._count)[i]
        if i in self._cache:
            self._cache[i] = self._cache.pop(i)  # most recently used last
        else:
            parts = [_read(shard, f"h{i}") for shard in self._shards]
            h = torch.cat(parts).float()
            if self._order is not None:
                h = h[self._order]
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = h
        return self._cache[i]


def _read(shard, key: str) -> torch.Tensor:
    if isinstance(shard, dict):
        return shard[key]
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return f.get_tensor(key)


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block's forward pre-hook sees (passed by keyword or first)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _chunked_batches(adapter: FamilyAdapter, calib: CalibrationSet, batches: int, batch_size: int,
                     first_batch: int):
    """Calibration batches `first_batch`.. in chunks of at most FORWARD_TOKENS tokens:
    (batch k, its sample rows, denoiser inputs)."""
    step = max(1, FORWARD_TOKENS // max(1, math.prod(adapter.token_grid())))
    for k in range(batches):
        b = calib.batch(first_batch + k, batch_size)
        for a in range(0, batch_size, step):
            sl = slice(a, min(batch_size, a + step))
            yield k, sl, (b.x_t[sl], b.t[sl], {c: v[sl] for c, v in b.cond.items()})


@torch.no_grad()
def boundary_states(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, batches: int = 4,
                    batch_size: int = 64, max_tokens: int | None = 8192, first_batch: int = 20_000_000,
                    folder: Path | None = None) -> BoundaryStates:
    """Image hidden states at every block boundary on calibration batches, `max_tokens` of them
    drawn at random (seeded) across all batches; streamed to `folder` when given.

    Batch indices start at `first_batch`, far from the indices distillation trains on."""
    from safetensors.torch import save_file

    blocks = [b for _, _, b in adapter.blocks(model)]
    states: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    draw: dict = {}  # which rows to keep, fixed once the first forward shows the tokens per sample
    now: dict = {}  # the chunk being run: batch k, sample slice

    def rows(h: torch.Tensor) -> torch.Tensor | slice:
        if not draw:
            per_sample = h.shape[1]
            total = batches * batch_size * per_sample
            draw.update(per_sample=per_sample, keep=None, order=None)
            if max_tokens is not None and total > max_tokens:
                keep = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:max_tokens]
                # stored in row order; `order` puts them back in the order they were drawn
                draw.update(keep=keep.sort().values, order=torch.argsort(torch.argsort(keep)))
        if draw["keep"] is None:
            return slice(None)
        lo = (now["k"] * batch_size + now["rows"].start) * draw["per_sample"]
        hi = lo + (now["rows"].stop - now["rows"].start) * draw["per_sample"]
        keep = draw["keep"]
        return keep[(keep >= lo) & (keep < hi)] - lo

    def pre(_m, args, kwargs):
        h = block_input(args, kwargs)
        now["take"] = rows(h)
        states[0].append(h.flatten(0, -2)[now["take"]].clone())

    def post(i):
        def hook(_m, _args, output):
            states[i + 1].append(image_hidden(output).flatten(0, -2)[now["take"]].clone())
        return hook

    handles = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    shards: list = []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        for k, sl, inputs in _chunked_batches(adapter, calib, batches, batch_size, first_batch):
            now.update(k=k, rows=sl)
            adapter.denoise(model, *inputs)
            if sl.stop < batch_size:
                continue
            shard = {f"h{i}": torch.cat(s) for i, s in enumerate(states)}  # batch k complete: one shard
            for s in states:
                s.clear()
            if folder is not None:
                path = folder / f"batch-{k:04d}.safetensors"
                save_file({key: v.contiguous() for key, v in shard.items()}, str(path))
                shard = path
            shards.append(shard)
    finally:
        for h in handles:
            h.remove()
    return BoundaryStates(len(blocks) + 1, shards, draw.get("order"))


@torch.no_grad()
def block_influence(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet,
                    batches: int = 4, batch_size: int = 64, first_batch: int = 10_000_000) -> list[float]:
    """Block Influence (ShortGPT): 1 - mean token cosine(input, output) of each block's image
    stream. A block whose output is nearly its input changes little and goes first.

    Accumulated as the forward passes, holding only the boundary just left behind."""
    blocks = [b for _, _, b in adapter.blocks(model)]
    sums, seen = torch.zeros(len(blocks), dtype=torch.float64), [0]
    last: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        last[:] = [block_input(args, kwargs).flatten(0, -2).float()]
        seen[0] += len(last[0])

    def post(i):
        def hook(_m, _args, output):
            h = image_hidden(output).flatten(0, -2).float()
            sums[i] += torch.cosine_similarity(last[0], h, dim=-1).double().sum()
            last[0] = h
        return hook

    handles = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        for _, _, inputs in _chunked_batches(adapter, calib, batches, batch_size, first_batch):
            adapter.denoise(model, *inputs)
    finally:
        for h in handles:
            h.remove()
    return [float(1 - v / seen[0]) for v in sums]


@torch.no_grad()
def hidden_width(model: nn.Module, adapter: FamilyAdapter) -> int:
    """Feature width of the image stream entering the first block (one forward of one example)."""
    width: list[int] = []

    def pre(_m, args, kwargs):
        width.append(int(block_input(args, kwargs).shape[-1]))

    handle = adapter.blocks(model)[0][2].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        adapter.denoise(model, *adapter.example_inputs(1))
    finally:
        handle.remove()
    return width[0]


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
    L = len(names)
    cosine = [float(torch.cosine_similarity(h[i], h[i + 1], dim=-1).mean()) for i in range(L)]
    cka = [linear_cka(h[i], h[i + 1]) for i in range(L)]
    r2 = [probe_r2(h[i], h[i + 1]) for i in range(L)]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
