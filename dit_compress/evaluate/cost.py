"""Cost metrics: parameters, MACs, latency (PyTorch and ONNX Runtime) and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.families import FamilyAdapter
from ..timing import paired_latency, time_calls


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def macs_per_sample(model: nn.Module, adapter: FamilyAdapter, inputs: tuple | None = None, batch: int = 16) -> int:
    """Multiply-accumulates per sample of one forward on `inputs` (x, t, cond), by default random
    ones at `batch` (PyTorch's FLOP counter / 2).

    Not at batch 1: routed models (experts, blocks) do work that depends on how a batch's
    tokens and samples spread over the routes, and one sample is not a representative batch."""
    x, t, cond = inputs if inputs is not None else adapter.example_inputs(batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        adapter.denoise(model, x, t, cond)
    return int(counter.get_total_flops() // 2 // x.shape[0])


@torch.no_grad()
def torch_latency(model: nn.Module, adapter: FamilyAdapter, batch: int, repeats: int) -> dict:
    x, t, cond = adapter.example_inputs(batch)
    return {"batch": batch, **time_calls(lambda: adapter.denoise(model, x, t, cond), repeats)}


@torch.no_grad()
def paired_torch_latency(a, b, batch: int, repeats: int, inputs: tuple | None = None) -> tuple[dict, dict]:
    """Latency of LoadedModels a and b on the same inputs (x, t, cond), timed in alternation."""
    x, t, cond = inputs if inputs is not None else a.adapter.example_inputs(batch)
    la, lb = paired_latency(lambda: a.adapter.denoise(a.model, x, t, cond),
                            lambda: b.adapter.denoise(b.model, x, t, cond), repeats)
    return {"batch": batch, **la}, {"batch": batch, **lb}


def paired_onnx_latency(path_a, path_b, adapter: FamilyAdapter, batch: int, repeats: int,
                        inputs: tuple | None = None) -> tuple[dict, dict]:
    from ..export.onnx import ort_feeds, ort_session

    sa, sb = ort_session(path_a), ort_session(path_b)
    feeds = ort_feeds(*(inputs if inputs is not None else adapter.example_inputs(batch)))
    la, lb = paired_latency(lambda: sa.run(None, feeds), lambda: sb.run(None, feeds), repeats)
    return {"batch": batch, **la}, {"batch": batch, **lb}


def onnx_latency(onnx_path, adapter: FamilyAdapter, batch: int, repeats: int, threads: int | None = None) -> dict:
    from ..export.onnx import ort_feeds, ort_session

    sess = ort_session(onnx_path, threads)
    feeds = ort_feeds(*adapter.example_inputs(batch))
    return {"batch": batch, **time_calls(lambda: sess.run(None, feeds), repeats)}


def peak_memory(checkpoint: str, batch: int) -> dict:
    """Peak resident memory of a fresh process that loads `checkpoint` and runs one forward.

    A separate process, because the evaluating process already holds teacher and student."""
    out = subprocess.run([sys.executable, "-m", "dit_compress.evaluate.memory", checkpoint, str(batch)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])
