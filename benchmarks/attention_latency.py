"""Softmax vs LiT vs CLEAR attention: latency against the number of tokens, side by side in one run.

One attention layer (projections included) of width --width with --heads softmax heads, on a
square token grid of 256 .. 16 384 tokens, random weights; the same layer with LiT's processor
(--lit-heads heads, 5x5 depthwise conv) and with CLEAR's (radius --radius). Timed in PyTorch
and in ONNX Runtime (each variant exported with the parity check), medians of alternating runs.
The layer's four projections alone are timed beside them: every variant keeps them, so
softmax ms / projection ms bounds the speedup any such attention can reach.
With --model, also a whole random-weight DiT of that width (--layers blocks) per token count.

Usage: python benchmarks/attention_latency.py --out benchmarks/results/attention-latency
Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from _provenance import stamp, with_header

from dit_compress.timing import alternating_latency
from dit_compress.export.onnx import ort_session
from dit_compress.stages.attention.lit import LiTProcessor
from dit_compress.stages.attention.local import CLEARProcessor

KINDS = ("softmax", "lit", "clear")


class Projections(torch.nn.Module):
    """The Q/K/V/out projections of an attention layer and nothing else (the speedup bound)."""

    def __init__(self, attn):
        super().__init__()
        self.q, self.k, self.v, self.out = attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]

    def forward(self, x):
        return self.out(self.q(x) + self.k(x) + self.v(x))


class WindowFloor(torch.nn.Module):
    """The least a tiled CLEAR layer can cost with PyTorch's CPU kernels: the four projections plus
    softmax attention of every query tile over its halo window, with the windows already gathered
    and no mask, as batched matmul - softmax - matmul (on this CPU 1.4-2.7x faster than SDPA's fused
    kernel over the same small windows at 4 096-16 384 tokens; tile 4 runs within 15 % of tile 8,
    tile 16 about 2x slower). The real layer also gathers and masks."""

    def __init__(self, projections: Projections, width: int, heads: int, side: int, radius: int, tile: int):
        super().__init__()
        self.projections = projections
        tiles, window = math.ceil(side / tile) ** 2, (tile + 2 * (radius - 1)) ** 2
        d = width // heads
        self.q = torch.randn(1, heads, tiles, tile * tile, d)
        self.k, self.v = torch.randn(1, heads, tiles, window, d), torch.randn(1, heads, tiles, window, d)

    def forward(self, x):
        core = (self.q @ self.k.transpose(-1, -2)).softmax(dim=-1) @ self.v
        return self.projections(x), core


def attention_layer(kind: str, width: int, heads: int, side: int, args):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=width, heads=heads, dim_head=width // heads, bias=True).eval()
    if kind == "lit":
        attn.set_processor(LiTProcessor(width, args.lit_heads, (side, side)))
    elif kind == "clear":
        attn.set_processor(CLEARProcessor((side, side), args.radius, args.tile))
    return attn


def timed(fns: dict, repeats: int) -> dict:
    """Median ms of each callable, timed in alternation after one warm-up call each."""
    return {k: v["median_ms"] for k, v in alternating_latency(fns, repeats, warmup=1).items()}


def _row(tokens: int, torch_ms: dict, onnx_ms: dict, folder: Path, **extra) -> dict:
    """One token count's timings with speedups over softmax; clears that count's graphs from `folder`."""
    row = {"tokens": tokens, "torch_ms": torch_ms, "onnx_ms": onnx_ms, **extra,
           "torch_speedup": {k: round(torch_ms["softmax"] / torch_ms[k], 2)
                             for k in ("lit", "clear", "projections", "clear_floor")
                             if k in torch_ms},
           "onnx_speedup": {k: round(onnx_ms["softmax"] / onnx_ms[k], 2) for k in ("lit", "clear", "projections")
                            if "softmax" in onnx_ms and k in onnx_ms}}
    print(row, flush=True)
    for p in folder.glob("*.onnx*"):
        p.unlink()
    return row


@torch.no_grad()
def layer_rows(args, folder: Path) -> list[dict]:
    rows = []
    for tokens in args.tokens:
        side = int(round(tokens ** 0.5))
        x = torch.randn(1, side * side, args.width)
        layers = {k: attention_layer(k, args.width, args.heads, side, args) for k in KINDS}
        layers["projections"] = Projections(layers["softmax"])
        floor = WindowFloor(layers["projections"], args.width, args.heads, side, args.radius, args.tile)
        sessions, parity = {}, {}
        for k, m in layers.items():
            if tokens > args.onnx_max_tokens and k == "softmax":
                continue  # a (heads x N x N) score tensor in ONNX Runtime would not fit in memory
            path = folder / f"{k}-{tokens}.onnx"
            torch.onnx.export(m, (x,), path, input_names=["x"], dynamo=True)
            sessions[k] = ort_session(path)
            parity[k] = float(np.abs(sessions[k].run(None, {"x": x.numpy()})[0] - m(x).numpy()).max())
        repeats = args.repeats if tokens <= 4096 else max(2, args.repeats // 3)
        pt = timed({**{k: (lambda m=m: m(x)) for k, m in layers.items()}, "clear_floor": lambda: floor(x)}, repeats)
        ox = timed({k: (lambda s=s: s.run(None, {"x": x.numpy()})) for k, s in sessions.items()}, repeats)
        rows.append(_row(side * side, pt, ox, folder, onnx_parity=parity))
    return rows


@torch.no_grad()
def model_rows(args, folder: Path) -> list[dict]:
    import diffusers

    from dit_compress.export.onnx import export_onnx, ort_feeds
    from dit_compress.models.families import get_adapter

    rows = []
    for tokens in args.model_tokens:
        side = int(round(tokens ** 0.5))
        cfg = {"num_attention_heads": args.heads, "attention_head_dim": args.width // args.heads, "in_channels": 4,
               "out_channels": 4, "num_layers": args.layers, "sample_size": 2 * side, "patch_size": 2,
               "num_embeds_ada_norm": 1000}
        torch.manual_seed(0)
        models = {}
        for k in KINDS:
            m = diffusers.DiTTransformer2DModel.from_config(cfg).eval()
            for block in m.transformer_blocks:
                if k == "lit":
                    block.attn1.set_processor(LiTProcessor(args.width, args.lit_heads, (side, side)))
                elif k == "clear":
                    block.attn1.set_processor(CLEARProcessor((side, side), args.radius, args.tile))
            models[k] = m
        adapter = get_adapter(models["softmax"], 2 * side)
        x, t, cond = adapter.example_inputs(2)
        sessions = {}
        for k, m in models.items():
            if tokens > args.onnx_max_tokens and k == "softmax":
                continue
            export_onnx(m, adapter, folder / f"dit-{k}.onnx", batch=2, atol=1e-3)
            sessions[k] = ort_session(folder / f"dit-{k}.onnx")
        feeds = ort_feeds(x[:1], t[:1], {c: v[:1] for c, v in cond.items()})
        pt = timed({k: (lambda m=m: adapter.denoise(m, x[:1], t[:1], {c: v[:1] for c, v in cond.items()}))
                    for k, m in models.items()}, max(2, args.repeats // 2))
        ox = timed({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, max(2, args.repeats // 2))
        rows.append(_row(side * side, pt, ox, folder))
    return rows


def write(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, runtime in zip(axes, ("torch_ms", "onnx_ms")):
        for k in (*KINDS, "projections"):
            pts = [(r["tokens"], r[runtime][k]) for r in result["layer"] if k in r[runtime]]
            ax.loglog(*zip(*pts), "o--" if k == "projections" else "o-", label=k)
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms (one attention layer, batch 1)")
        ax.set_title("PyTorch" if runtime == "torch_ms" else "ONNX Runtime")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    a = result["args"]
    lines = [f"# Attention latency vs tokens: softmax vs LiT vs CLEAR (CPU, {result['threads']} threads)", "",
             f"One attention layer, width {a['width']} ({a['heads']} softmax heads), batch 1, random weights. "
             f"LiT: {a['lit_heads']} heads + 5x5 depthwise conv. CLEAR: radius {a['radius']}, tile {a['tile']}. "
             "Speedup = softmax ms / variant ms. Bound = softmax ms / ms of the layer's four projections alone, "
             "which every variant keeps: no attention that keeps them can be faster than that. CLEAR floor (PyTorch) = "
             "softmax ms / ms of those projections plus the attention of every query tile over its already "
             "gathered, unmasked halo window: the most any tiled CLEAR layer can gain with PyTorch's CPU kernels.", "",
             "| tokens | PyTorch softmax ms | LiT ms | CLEAR ms | LiT speedup | CLEAR speedup | bound | CLEAR floor | "
             "ORT softmax ms | LiT ms | CLEAR ms | LiT speedup | CLEAR speedup | bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda d, k: f"{d[k]:.1f}" if k in d else "n/a"  # noqa: E731
    for r in result["layer"]:
        ts, os_ = r["torch_speedup"], r["onnx_speedup"]
        lines.append(f"| {r['tokens']} | {fmt(r['torch_ms'], 'softmax')} | {fmt(r['torch_ms'], 'lit')} | "
                     f"{fmt(r['torch_ms'], 'clear')} | {ts['lit']} | {ts['clear']} | {ts.get('projections', 'n/a')} | "
                     f"{ts.get('clear_floor', 'n/a')} | "
                     f"{fmt(r['onnx_ms'], 'softmax')} | {fmt(r['onnx_ms'], 'lit')} | {fmt(r['onnx_ms'], 'clear')} | "
                     f"{os_.get('lit', 'n/a')} | {os_.get('clear', 'n/a')} | {os_.get('projections', 'n/a')} |")
    if result.get("model"):
        lines += ["", f"## Whole model: random-weight DiT, width {a['width']}, {a['layers']} blocks, batch 1", "",
                  "| tokens | PyTorch softmax ms | LiT ms | CLEAR ms | ORT softmax ms | LiT ms | CLEAR ms |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["model"]:
            lines.append(f"| {r['tokens']} | {fmt(r['torch_ms'], 'softmax')} | {fmt(r['torch_ms'], 'lit')} | "
                         f"{fmt(r['torch_ms'], 'clear')} | {fmt(r['onnx_ms'], 'softmax')} | "
                         f"{fmt(r['onnx_ms'], 'lit')} | {fmt(r['onnx_ms'], 'clear')} |")
    lines += ["", f"![latency]({out.with_suffix('.png').name})"]
    out.with_suffix(".md").write_text(with_header("\n".join(lines) + "\n", result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="exports/attention-latency")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--lit-heads", type=int, default=2)
    p.add_argument("--radius", type=int, default=8)
    p.add_argument("--tile", type=int, default=8)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--onnx-max-tokens", type=int, default=16384,
                   help="skip exporting softmax attention above this many tokens (its score tensor's memory)")
    p.add_argument("--model-tokens", type=int, nargs="*", default=[256, 1024, 4096])
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import sys

    result = {"args": vars(args), "threads": torch.get_num_threads(),
              "command": "python " + " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        result["layer"] = layer_rows(args, Path(tmp))
        result["model"] = model_rows(args, Path(tmp)) if args.model_tokens else []
    out.with_suffix(".json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    write(out, result)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
