"""Where Dense2MoE's sparse execution pays: dense FFN vs its MoE at realistic width, side by side.

The bundled digits teachers are tiny (width 96-128, 16 tokens per sample), so their FFNs cost
little next to the fixed per-node cost of routing. This benchmark measures the same MoE layer
(shared expert + top-2 of 7 routed experts: 62.5 % fewer activated FFN parameters) at DiT-XL's
width (1152, FFN 4608), with random weights and a random router (routing near balanced):

  layer   one FFN, dense vs MoE, over 256 .. 4096 tokens, PyTorch and ONNX Runtime
  model   --family dit: DiT-XL/2 at 256 px (256 tokens per sample); --family sd3: SD3-medium
          (width 1536, joint attention, 256 image + 8 text tokens per sample, image and
          context FFNs both converted); cut to --layers blocks, every FFN converted,
          exported to ONNX with the parity check, whole-model latency

Latencies are medians of runs timed in alternation (dense, MoE, dense, ...).
Usage: python benchmarks/moe_latency.py --out benchmarks/results/moe-latency
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _provenance import stamp, with_header

from dit_compress.timing import paired_latency
from dit_compress.export.onnx import ort_session
from dit_compress.stages.moe.convert import build_moe, feedforward, replace_module_

WIDTH, SEGMENTS, SHARED, TOP_K = 1152, 8, 1, 2


def contiguous_split(hidden: int) -> dict:
    """Neurons cut into SEGMENTS equal parts: the first is the shared expert (cost does not
    depend on which neurons an expert holds)."""
    size = hidden // SEGMENTS
    parts = [list(range(i * size, (i + 1) * size)) for i in range(SEGMENTS)]
    return {"shared": [n for p in parts[:SHARED] for n in p], "experts": parts[SHARED:]}


def to_moe(ff: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    moe = build_moe(feedforward(ff), contiguous_split(ff.net[0].proj.out_features), TOP_K)
    torch.nn.init.normal_(moe.router.weight, std=0.02)
    return moe.eval()


def _ratio(a: dict, b: dict) -> float:
    return round(b["median_ms"] / a["median_ms"], 3)


@torch.no_grad()
def layer(tokens: list[int], repeats: int, folder: Path) -> list[dict]:
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    dense = FeedForward(WIDTH, mult=4, activation_fn="gelu-approximate").eval()
    moe = to_moe(dense)
    paths = {}
    for name, m in (("dense", dense), ("moe", moe)):
        x = torch.randn(1, 64, WIDTH)
        paths[name] = folder / f"ffn-{name}.onnx"
        torch.onnx.export(m, (x,), paths[name], input_names=["x"], dynamic_shapes={"hidden_states": {1: "tokens"}},
                          dynamo=True)
    sessions = {k: ort_session(p) for k, p in paths.items()}
    rows = []
    for n in tokens:
        x = torch.randn(1, n, WIDTH)
        err = (moe(x) - torch.from_numpy(sessions["moe"].run(None, {"x": x.numpy()})[0])).abs().max().item()
        pt = paired_latency(lambda: dense(x), lambda: moe(x), repeats)
        ox = paired_latency(lambda: sessions["dense"].run(None, {"x": x.numpy()}),
                            lambda: sessions["moe"].run(None, {"x": x.numpy()}), repeats)
        moe.track = True
        moe(x)
        moe.track = False
        load = moe.last_counts.float()
        rows.append({"tokens": n, "torch_dense_ms": pt[0]["median_ms"], "torch_moe_ms": pt[1]["median_ms"],
                     "torch_ratio": _ratio(*pt), "onnx_dense_ms": ox[0]["median_ms"], "onnx_moe_ms": ox[1]["median_ms"],
                     "onnx_ratio": _ratio(*ox), "onnx_parity": err,
                     "max_load_over_fair": round(float(load.max() / load.mean()), 3)})
        print(rows[-1], flush=True)
    return rows


# Published configs (random weights), cut to --layers blocks; 32x32 latents = 256 tokens at patch 2.
MODEL_CONFIGS = {
    "dit": ("DiTTransformer2DModel", "DiT-XL/2 width at 256 px",
            {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
             "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000}),
    "sd3": ("SD3Transformer2DModel", "SD3-medium width (1536, FFN 6144), 256 image + 8 text tokens",
            {"num_attention_heads": 24, "attention_head_dim": 64, "in_channels": 16, "out_channels": 16,
             "sample_size": 32, "patch_size": 2, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
             "pooled_projection_dim": 2048, "pos_embed_max_size": 192}),
}


@torch.no_grad()
def model(family: str, layers: int, batches: list[int], repeats: int, folder: Path) -> dict:
    import diffusers

    from dit_compress.export.onnx import export_onnx, ort_feeds
    from dit_compress.models.families import get_adapter

    torch.manual_seed(0)
    class_name, note, base = MODEL_CONFIGS[family]
    cfg = {**base, "num_layers": layers}
    dense = getattr(diffusers, class_name).from_config(cfg).eval()
    adapter = get_adapter(dense, 32)
    sparse = getattr(diffusers, class_name).from_config(cfg).eval()
    sparse.load_state_dict(dense.state_dict())
    converted = 0
    for i, block in enumerate(sparse.transformer_blocks):
        for attr in ("ff", "ff_context"):  # SD3's last block has no context FFN
            if getattr(block, attr, None) is not None:
                replace_module_(sparse, f"transformer_blocks.{i}.{attr}", to_moe(getattr(block, attr)))
                converted += 1
    out = {"family": family, "config": {**cfg, "note": f"{note}, {layers} blocks, random weights"},
           "converted_ffns": converted,
           "parameters": sum(p.numel() for p in dense.parameters()), "rows": []}
    paths = {}
    for name, m in (("dense", dense), ("moe", sparse)):
        t0 = time.time()
        info = export_onnx(m, adapter, folder / f"{family}-{name}.onnx", batch=2, atol=1e-3)
        out[f"{name}_export_seconds"] = round(time.time() - t0, 1)
        out[f"{name}_parity"] = info["parity"]["max_abs_error"]
        paths[name] = folder / f"{family}-{name}.onnx"
    sessions = {k: ort_session(p) for k, p in paths.items()}
    for b in batches:
        x, t, cond = adapter.example_inputs(b)
        feeds = ort_feeds(x, t, cond)
        pt = paired_latency(lambda: adapter.denoise(dense, x, t, cond), lambda: adapter.denoise(sparse, x, t, cond),
                            repeats, warmup=1)
        ox = paired_latency(lambda: sessions["dense"].run(None, feeds), lambda: sessions["moe"].run(None, feeds),
                            repeats, warmup=1)
        out["rows"].append({"batch": b, "image_tokens": b * 256, "torch_dense_ms": pt[0]["median_ms"],
                            "torch_moe_ms": pt[1]["median_ms"], "torch_ratio": _ratio(*pt),
                            "onnx_dense_ms": ox[0]["median_ms"], "onnx_moe_ms": ox[1]["median_ms"],
                            "onnx_ratio": _ratio(*ox)})
        print(out["rows"][-1], flush=True)
    return out


def write_table(path: Path, result: dict) -> None:
    lines = ["# Dense FFN vs Dense2MoE at full width, CPU", "",
             f"MoE: shared expert + top-{TOP_K} of {SEGMENTS - SHARED} routed experts (62.5 % fewer activated FFN "
             f"parameters); random weights, random router. Medians of {result['repeats']} alternating runs, "
             f"{result['threads']} threads. Ratio = MoE / dense (lower is faster)."]
    if result["layer"]:
        lines += ["", f"## One FFN layer at DiT-XL width ({WIDTH} -> {4 * WIDTH})", "",
                  "| tokens | PyTorch dense ms | MoE ms | ratio | ORT dense ms | MoE ms | ratio | busiest expert / fair |",
                  "|---|---|---|---|---|---|---|---|"]
    for r in result["layer"]:
        lines.append(f"| {r['tokens']} | {r['torch_dense_ms']:.2f} | {r['torch_moe_ms']:.2f} | {r['torch_ratio']:.3f} | "
                     f"{r['onnx_dense_ms']:.2f} | {r['onnx_moe_ms']:.2f} | {r['onnx_ratio']:.3f} | "
                     f"{r['max_load_over_fair']:.2f} |")
    m = result.get("model")
    if m:
        lines += ["", f"## Whole model: {m['config']['note']} ({m['parameters'] / 1e6:.0f} M parameters, "
                  f"{m['converted_ffns']} FFNs converted)", "",
                  f"ONNX parity (max abs error): dense {m['dense_parity']:.2e}, MoE {m['moe_parity']:.2e}.", "",
                  "| batch | image tokens | PyTorch dense ms | MoE ms | ratio | ORT dense ms | MoE ms | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['batch']} | {r['image_tokens']} | {r['torch_dense_ms']:.1f} | {r['torch_moe_ms']:.1f} | "
                         f"{r['torch_ratio']:.3f} | {r['onnx_dense_ms']:.1f} | {r['onnx_moe_ms']:.1f} | "
                         f"{r['onnx_ratio']:.3f} |")
    path.write_text(with_header("\n".join(lines) + "\n", result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="exports/moe-latency")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--family", choices=sorted(MODEL_CONFIGS), default="dit", help="whole-model section's family")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-layer", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"repeats": args.repeats, "threads": torch.get_num_threads(), "command": "python " + " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        result["layer"] = [] if args.skip_layer else layer(args.tokens, args.repeats, Path(tmp))
        if not args.skip_model:
            result["model"] = model(args.family, args.layers, args.batches, args.repeats, Path(tmp))
    out.with_suffix(".json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    write_table(out.with_suffix(".md"), result)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
