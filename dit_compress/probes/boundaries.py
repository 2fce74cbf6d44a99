"""Probes of the transformer blocks' image stream on calibration batches.

- `boundary_states`: sampled image tokens at every block boundary h_0 (input of block 0) ..
  h_L (output of the last block), streamed through disk for full-size models;
- `block_influence`: ShortGPT's Block Influence of each block;
- `hidden_width`: the image stream's feature width;
- `block_calls`: the (args, kwargs) each block is called with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data.calibration import CalibrationSet
from ..models.families import FamilyAdapter
from .capture import Capture, image_hidden

# Tokens one probe forward may carry: full-size models at high resolution run calibration
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


def _chunked_batches(adapter: FamilyAdapter, calib: CalibrationSet, batches: int, batch_size: int,
                     stream: str, desc: str):
    """The first `batches` calibration batches of the named stream, in chunks of at most
    FORWARD_TOKENS tokens: (batch k, its sample rows, denoiser inputs), with a progress bar
    saying what is probed."""
    first = calib.stream(stream)
    step = max(1, FORWARD_TOKENS // max(1, math.prod(adapter.token_grid())))
    chunks = [(k, a) for k in range(batches) for a in range(0, batch_size, step)]
    batch, loaded = None, None
    for k, a in tqdm(chunks, desc=desc, leave=False, disable=len(chunks) < 2):
        if loaded != k:
            batch, loaded = calib.batch(first + k, batch_size), k
        sl = slice(a, min(batch_size, a + step))
        yield k, sl, (batch.x_t[sl], batch.t[sl], {c: v[sl] for c, v in batch.cond.items()})


def _image_blocks(model: nn.Module, adapter: FamilyAdapter) -> dict[str, nn.Module]:
    return {f"{g.attr}.{i}": b for g, i, b in adapter.blocks(model)}


@torch.no_grad()
def boundary_states(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet, batches: int = 4,
                    batch_size: int = 64, max_tokens: int | None = 8192, folder: Path | None = None) -> BoundaryStates:
    """Image hidden states at every block boundary on calibration batches, `max_tokens` of them
    drawn at random (seeded) across all batches; streamed to `folder` when given."""
    from safetensors.torch import save_file

    blocks = _image_blocks(model, adapter)
    index = {name: i for i, name in enumerate(blocks)}
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

    def first_input(_name, h):
        now["take"] = rows(h)
        states[0].append(h.flatten(0, -2)[now["take"]].clone())

    def output(name, h):
        states[index[name] + 1].append(h.flatten(0, -2)[now["take"]].clone())

    shards: list = []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    first = dict([next(iter(blocks.items()))])
    with Capture(first, at="input", on=first_input), Capture(blocks, transform=image_hidden, on=output):
        for k, sl, inputs in _chunked_batches(adapter, calib, batches, batch_size, "probe/boundary-states",
                                              "probe: block boundary states"):
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
    return BoundaryStates(len(blocks) + 1, shards, draw.get("order"))


@torch.no_grad()
def block_influence(model: nn.Module, adapter: FamilyAdapter, calib: CalibrationSet,
                    batches: int = 4, batch_size: int = 64) -> list[float]:
    """Block Influence (ShortGPT): 1 - mean token cosine(input, output) of each block's image
    stream. A block whose output is nearly its input changes little and goes first.

    Accumulated as the forward passes, holding only the boundary just left behind."""
    blocks = _image_blocks(model, adapter)
    index = {name: i for i, name in enumerate(blocks)}
    sums, seen = torch.zeros(len(blocks), dtype=torch.float64), [0]
    last: list[torch.Tensor] = []

    def first_input(_name, h):
        last[:] = [h.flatten(0, -2).float()]
        seen[0] += len(last[0])

    def output(name, h):
        h = h.flatten(0, -2).float()
        sums[index[name]] += torch.cosine_similarity(last[0], h, dim=-1).double().sum()
        last[0] = h

    first = dict([next(iter(blocks.items()))])
    with Capture(first, at="input", on=first_input), Capture(blocks, transform=image_hidden, on=output):
        for _, _, inputs in _chunked_batches(adapter, calib, batches, batch_size, "probe/block-influence",
                                             "probe: block influence"):
            adapter.denoise(model, *inputs)
    return [float(1 - v / seen[0]) for v in sums]


@torch.no_grad()
def hidden_width(model: nn.Module, adapter: FamilyAdapter) -> int:
    """Feature width of the image stream entering the first block (one forward of one example)."""
    first = dict([next(iter(_image_blocks(model, adapter).items()))])
    with Capture(first, at="input", transform=lambda h: int(h.shape[-1])) as cap:
        adapter.denoise(model, *adapter.example_inputs(1))
    return next(iter(cap.values.values()))


def block_calls(model: nn.Module, adapter: FamilyAdapter, x, t, cond) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each block receives in one forward pass, in block order."""
    blocks = _image_blocks(model, adapter)
    with Capture(blocks, at="call") as cap, torch.no_grad():
        adapter.denoise(model, x, t, cond)
    return [cap.values[name] for name in blocks]
