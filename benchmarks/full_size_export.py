"""Full-size export check: a real-size config with random weights -> ONNX (external data) -> ONNX Runtime.

    python benchmarks/full_size_export.py --config sd3-medium --out exports/full-size
    python benchmarks/full_size_export.py --config pixart-xl-2 --out exports/full-size

The configs are the published transformer configs of the hub repositories named below (no
weights are downloaded: the weights are random, which is what an export/memory check needs).
Measured: parameter count, build/export/parity time, ONNX size (graph + external data), peak
resident memory of the exporting process, and, in a fresh process as a deployment would,
ONNX Runtime's load time, one forward and its peak memory. Results go to
benchmarks/results/full-size-CONFIG.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _provenance import stamp, with_header

from dit_compress.core.phases import peak_rss_gb

CONFIGS = {
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    "sd3-medium": {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
        "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
        "pos_embed_max_size": 192,
    },
    # PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json
    "pixart-xl-2": {
        "_class_name": "PixArtTransformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 4,
        "out_channels": 8, "num_layers": 28, "attention_head_dim": 72, "num_attention_heads": 16,
        "cross_attention_dim": 1152, "caption_channels": 4096, "activation_fn": "gelu-approximate",
        "attention_bias": True, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
        "norm_eps": 1e-6, "num_embeds_ada_norm": 1000, "upcast_attention": False,
        "use_additional_conditions": None,
    },
}


def export(args) -> dict:
    import diffusers
    import torch

    from dit_compress.export.artifact import deployment_card
    from dit_compress.export.onnx import export_onnx
    from dit_compress.models.families import get_adapter
    from dit_compress.models.load import LoadedModel
    from dit_compress.sampling import DEFAULT_SCHEDULER

    torch.manual_seed(0)
    config = dict(CONFIGS[args.config])
    t0 = time.time()
    model = getattr(diffusers, config.pop("_class_name")).from_config(config).eval().requires_grad_(False)
    build_s = time.time() - t0
    adapter = get_adapter(model, args.latent_size)
    adapter.text_tokens = args.text_tokens
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.config}: {params / 1e9:.3f} B parameters, built in {build_s:.0f} s", flush=True)
    out = Path(args.out) / args.config / "model.onnx"
    loaded = LoadedModel(model, adapter, dict(DEFAULT_SCHEDULER), f"random-weights:{args.config}")
    card = {**deployment_card(loaded, steps=28, guidance_scale=4.5), "text_tokens": args.text_tokens}
    t0 = time.time()
    info = export_onnx(model, adapter, out, batch=2, atol=args.atol, card=card)
    files = {f.name: f.stat().st_size for f in out.parent.glob("model.onnx*")}  # not earlier variants
    return {"config": args.config, "class_name": type(model).__name__, "parameters": params,
            "latent_size": adapter.latent_size, "text_tokens": args.text_tokens,
            "build_seconds": round(build_s, 1), "export_and_parity_seconds": round(time.time() - t0, 1),
            "export_seconds": info["export_seconds"], "parity": info["parity"], "external_data": info["external_data"],
            "files_bytes": files, "onnx_total_gb": round(sum(files.values()) / 1e9, 2),
            "export_process_peak_rss_gb": round(peak_rss_gb(), 2), "onnx": str(out)}


def run_ort(onnx_path: str, latent: list[int], text_tokens: int, config: str) -> dict:
    """In a fresh process: load the graph in ONNX Runtime and run one forward at batch 1."""
    import numpy as np

    from dit_compress.export.onnx import ort_session

    cfg = CONFIGS[config]
    t0 = time.time()
    sess = ort_session(onnx_path)
    load_s = time.time() - t0
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, *latent), dtype=np.float32),
             "timestep": np.array([500.0], dtype=np.float32)}
    if cfg["_class_name"].startswith("SD3"):
        feeds["encoder_hidden_states"] = rng.standard_normal((1, text_tokens, cfg["joint_attention_dim"]),
                                                             dtype=np.float32)
        feeds["pooled_projections"] = rng.standard_normal((1, cfg["pooled_projection_dim"]), dtype=np.float32)
    else:
        feeds["encoder_hidden_states"] = rng.standard_normal((1, text_tokens, cfg["caption_channels"]),
                                                             dtype=np.float32)
    t0 = time.time()
    out = sess.run(None, feeds)[0]
    return {"ort_load_seconds": round(load_s, 1), "ort_forward_seconds": round(time.time() - t0, 1),
            "ort_output_finite": bool(np.isfinite(out).all()), "ort_process_peak_rss_gb": round(peak_rss_gb(), 2)}


def derive_variant(onnx_path: str, kind: str) -> dict:
    """fp16 / int8 from the external-data graph, with its parity against fp32 in ONNX Runtime."""
    from dit_compress.export.deploy import derive

    t0 = time.time()
    info = derive(Path(onnx_path), kind)
    files = {f.name: f.stat().st_size for f in Path(onnx_path).parent.glob(f"model.{kind}.onnx*")}
    return {"seconds": round(time.time() - t0, 1), "max_rel_error": info["parity"]["max_rel_error"],
            "files_bytes": files, "process_peak_rss_gb": round(peak_rss_gb(), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), required=True)
    p.add_argument("--out", default="exports/full-size")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (the graph's fixed resolution)")
    p.add_argument("--text-tokens", type=int, default=77)
    p.add_argument("--atol", type=float, default=1e-3, help="parity limit; 24+ random-weight blocks amplify fp32 noise")
    p.add_argument("--precision", action="append", default=[], choices=["fp16", "int8-dynamic"],
                   help="also derive this deployment variant from the external-data graph (repeatable)")
    p.add_argument("--ort-only", help=argparse.SUPPRESS)  # internal: the fresh deployment process
    args = p.parse_args()
    if args.ort_only:
        latent = json.loads(args.ort_only)
        print(json.dumps(run_ort(latent["onnx"], latent["shape"], args.text_tokens, args.config)))
        return
    result = export(args)
    shape = [CONFIGS[args.config]["in_channels"], result["latent_size"], result["latent_size"]]
    proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--text-tokens", str(args.text_tokens),
                           "--ort-only", json.dumps({"onnx": result["onnx"], "shape": shape})],
                          capture_output=True, text=True, check=True)
    result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    result["variants"] = {kind: derive_variant(result["onnx"], kind) for kind in args.precision}
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"full-size-{args.config}.json").write_text(json.dumps(stamp(result), indent=2) + "\n")
    (results / f"full-size-{args.config}.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))


def markdown(r: dict) -> str:
    gb = 1e9
    lines = [f"# Full-size export: {r['config']} ({r['class_name']}, random weights)", "",
             "| figure | value |", "|---|---|",
             f"| parameters | {r['parameters'] / 1e9:.3f} B |",
             f"| graph input | latent {r['latent_size']}x{r['latent_size']}, {r['text_tokens']} text tokens, batch dynamic |",
             f"| ONNX size | {r['onnx_total_gb']} GB ({'external data' if r['external_data'] else 'inline'}) |",
             f"| export (torch.export + ONNX + save) | {r['export_seconds']} s |",
             f"| export + parity check | {r['export_and_parity_seconds']} s |",
             f"| parity vs PyTorch (batch {r['parity']['batch']}) | max abs {r['parity']['max_abs_error']:.3g}, "
             f"max rel {r['parity']['max_rel_error']:.3g} |",
             f"| peak RSS, exporting process (model + graph + parity session) | {r['export_process_peak_rss_gb']} GB |",
             f"| ONNX Runtime, fresh process: load / one forward (batch 1) | {r['ort_load_seconds']} s / "
             f"{r['ort_forward_seconds']} s, finite: {r['ort_output_finite']} |",
             f"| ONNX Runtime process peak RSS | {r['ort_process_peak_rss_gb']} GB |"]
    for kind, v in r.get("variants", {}).items():
        size = sum(v["files_bytes"].values()) / gb
        lines.append(f"| {kind} variant: time / size / max rel. error vs fp32 / process peak RSS so far | {v['seconds']} s / "
                     f"{size:.2f} GB / {v['max_rel_error']:.3g} / {v['process_peak_rss_gb']} GB |")
    return with_header("\n".join(lines) + "\n", r)


if __name__ == "__main__":
    main()
