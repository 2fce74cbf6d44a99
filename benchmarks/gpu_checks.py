"""What only a GPU can show, in one run on a CUDA machine (`python benchmarks/gpu_checks.py --out DIR`).

  env        torch / CUDA / GPU, ONNX Runtime providers, TensorRT availability
  numerics   each bundled teacher and compressed student (--models): CUDA fp32 vs CPU fp32, and
             fp16 / bf16 autocast vs CUDA fp32 (relative error, finiteness); CLEAR students run
             their FlexAttention path on CUDA, so their CUDA-vs-CPU error checks it against the tiles
  attention  one attention layer, softmax (SDPA) vs LiT vs CLEAR (FlexAttention block mask), bf16,
             256 .. 65 536 tokens, with the block mask's density
  moeprofile one FFN at SD3-medium's width vs its MoE, 8 192 tokens, bf16: latency and top CUDA kernels
  fullsize   published configs (PixArt-XL-2, SD3-medium) with random weights at 1024 px (4 096 tokens),
             bf16, batch 2: dense vs depth-50 % (every other block) vs Dense2MoE (every image FFN,
             62.5 % fewer activated FFN parameters, random router) vs LiT vs CLEAR (r = 8)

Latencies are medians of runs timed in alternation, each call followed by a CUDA synchronize.
Each section is written to DIR/gpu-checks.json as soon as it ends, so a cut-off run keeps what it got;
DIR/gpu-checks.md and .png (attention latency against tokens) are written at the end
(`--render JSON` writes them again from a saved result).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from _provenance import stamp, with_header

from dit_compress.timing import alternating_latency

sys.path.insert(0, str(Path(__file__).parent))  # sibling benchmarks: full_size_export, moe_latency

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda"  # --device cpu: a dry run of the full-size section on small shapes


def _sync(fn):
    def call():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return call


def _timed(fns: dict, repeats: int) -> dict:
    return {k: v["median_ms"] for k, v in alternating_latency({k: _sync(f) for k, f in fns.items()},
                                                              repeats, warmup=2).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def env() -> dict:
    import onnxruntime as ort

    from dit_compress.export.tensorrt import unavailable_reason

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
            "tensorrt": unavailable_reason() or "available"}


def _to(cond: dict, device, dtype=None) -> dict:
    return {k: v.to(device, dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
            for k, v in cond.items()}


@torch.no_grad()
def numerics(sources: list[str], batch: int, repeats: int) -> list[dict]:
    from dit_compress.core.manifest import load_any

    rows, dense_ms = [], None
    for src in sources:
        loaded = load_any(src)
        model, adapter = loaded.model.eval(), loaded.adapter
        x, t, cond = adapter.example_inputs(batch)
        cpu = adapter.denoise(model, x, t, cond)
        # the label-conditioned SD3 adapter's conditioner is part of the forward
        modules = [m for m in (model, getattr(adapter, "conditioner", None)) if m is not None]
        for m in modules:
            m.cuda()
        xc, tc, cc = x.cuda(), t.cuda(), _to(cond, "cuda")
        gpu = adapter.denoise(model, xc, tc, cc)
        row = {"model": src, "cuda_fp32_vs_cpu": _rel(gpu.cpu(), cpu)}
        calls = {"fp32": lambda: adapter.denoise(model, xc, tc, cc)}
        for name, dtype in HALF.items():
            with torch.autocast("cuda", dtype=dtype):
                half = adapter.denoise(model, xc, tc, cc)
            row[f"{name}_autocast_vs_fp32"] = _rel(half, gpu)
            row[f"{name}_finite"] = bool(torch.isfinite(half).all())

            def run(dtype=dtype):
                with torch.autocast("cuda", dtype=dtype):
                    adapter.denoise(model, xc, tc, cc)
            calls[name] = run
        ms = _timed(calls, repeats)
        row["latency_ms"] = ms
        dense_ms = dense_ms or ms
        row["fp32_vs_first_model"] = round(ms["fp32"] / dense_ms["fp32"], 3)
        rows.append(row)
        print(row, flush=True)
        for m in modules:
            m.cpu()
    return rows


@torch.no_grad()
def attention(tokens: list[int], width: int, heads: int, repeats: int) -> list[dict]:
    from types import SimpleNamespace

    from attention_latency import attention_layer

    from dit_compress.stages.attention.flex import neighbourhood_mask

    variant = SimpleNamespace(lit_heads=2, radius=8, tile=8)  # attention_latency's defaults
    rows = []
    for n in tokens:
        side = int(round(n ** 0.5))
        layers = {k: attention_layer(k, width, heads, side, variant).cuda().to(torch.bfloat16)
                  for k in ("softmax", "lit", "clear")}
        x = torch.randn(1, side * side, width, device="cuda", dtype=torch.bfloat16)
        t0 = time.time()
        try:
            layers["clear"](x)  # compiles the FlexAttention kernel for this shape
            compile_s = time.time() - t0
            ms = _timed({k: (lambda m=m: m(x)) for k, m in layers.items()}, repeats)
        except Exception as e:  # noqa: BLE001  record and go on to the next size
            rows.append({"tokens": side * side, "error": f"{type(e).__name__}: {e}"[:500]})
            print(rows[-1], flush=True)
            continue
        density = 1 - neighbourhood_mask((side, side), 8, 0, "cuda").sparsity() / 100
        row = {"tokens": side * side, "ms": ms, "speedup": {k: round(ms["softmax"] / ms[k], 2) for k in ("lit", "clear")},
               "clear_block_density": round(density, 4), "clear_first_call_s": round(compile_s, 1)}
        rows.append(row)
        print(row, flush=True)
    return rows


def _variant(config: dict, kind: str, latent: int):
    import diffusers

    from dit_compress.models.families import get_adapter
    from dit_compress.stages.attention.stage import clear_, image_attentions, lit_

    cfg = dict(config)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    base = get_adapter(model, latent)
    family = base.family
    grid = (latent // cfg["patch_size"],) * 2
    if kind == "depth50":
        keep = list(model.transformer_blocks)[::2]
        if family == "sd3":  # the last SD3 block (context_pre_only) closes the text stream
            keep[-1] = model.transformer_blocks[-1]
        model.transformer_blocks = torch.nn.ModuleList(keep)
    elif kind == "moe":
        from moe_latency import to_moe

        from dit_compress.stages.moe.convert import replace_module_
        for i, block in enumerate(model.transformer_blocks):
            replace_module_(model, f"transformer_blocks.{i}.ff", to_moe(block.ff.float()).to(DEVICE, torch.bfloat16))
    elif kind == "lit":
        lit_(model, list(image_attentions(model, base, None, "lit")), base, 2, grid, 5)
        model.to(DEVICE, torch.bfloat16)
    elif kind == "clear":
        clear_(model, list(image_attentions(model, base, None, "clear")), base, grid, 8, 8)
    adapter = get_adapter(model, latent)
    adapter.text_tokens = 77
    return model, adapter


@torch.no_grad()
def fullsize(configs: list[str], latent: int, batch: int, repeats: int) -> list[dict]:
    from full_size_export import CONFIGS

    rows = []
    for name in configs:
        calls, facts, inputs = {}, {}, None
        for kind in ("dense", "depth50", "moe", "lit", "clear"):
            try:  # one variant failing must not hide the others
                model, adapter = _variant(CONFIGS[name], kind, latent)
                if inputs is None:
                    x, t, cond = adapter.example_inputs(batch)
                    inputs = (x.to(DEVICE, torch.bfloat16), t.to(DEVICE), _to(cond, DEVICE, torch.bfloat16))
                out = adapter.denoise(model, *inputs)
            except Exception as e:  # noqa: BLE001
                rows.append({"config": name, "variant": kind, "error": f"{type(e).__name__}: {e}"})
                continue
            facts[kind] = {"params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                           "finite": bool(torch.isfinite(out).all())}
            calls[kind] = (lambda m=model, a=adapter: a.denoise(m, *inputs))
        ms = _timed(calls, repeats)
        for kind, v in ms.items():
            row = {"config": name, "variant": kind, "tokens": (latent // 2) ** 2, "batch": batch, **facts[kind], "ms": v,
                   "vs_dense": round(v / ms["dense"], 3) if "dense" in ms else None}
            rows.append(row)
            print(row, flush=True)
        del calls
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def moe_profile(tokens: int, width: int, repeats: int) -> dict:
    """One FFN of `width` (4x hidden) vs its MoE, bf16: latency, and where the MoE's GPU time goes."""
    from diffusers.models.attention import FeedForward
    from torch.profiler import ProfilerActivity, profile

    from moe_latency import to_moe

    ff = FeedForward(width, activation_fn="gelu-approximate").eval()
    moe = to_moe(ff).to(DEVICE, torch.bfloat16)
    ff = ff.to(DEVICE, torch.bfloat16)
    x = torch.randn(tokens, width, device=DEVICE, dtype=torch.bfloat16)
    ms = _timed({"dense": lambda: ff(x), "moe": lambda: moe(x)}, repeats)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            moe(x)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=10)
    print(ms, "\n", table, flush=True)
    return {"tokens": tokens, "width": width, "ms": ms, "vs_dense": round(ms["moe"] / ms["dense"], 3),
            "profile_moe_x5": table}


def write(out: Path, r: dict) -> None:
    """gpu-checks.md and gpu-checks.png from a result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = r.get("env", {})
    lines = [f"# GPU checks: {e.get('gpu')} (torch {e.get('torch')}, CUDA {e.get('cuda')})", "",
             f"ONNX Runtime {e.get('onnxruntime')} providers: {', '.join(e.get('ort_providers', []))}; "
             f"TensorRT: {e.get('tensorrt')}.", ""]
    if r.get("notes"):
        lines += ["## Found on the GPU", "", *[f"- {n}" for n in r["notes"]], ""]
    if isinstance(r.get("numerics"), list):
        lines += ["## Numerics and latency of the bundled models on CUDA (batch 64)", "",
                  "Relative error = max |a - b| / max |b|.", "",
                  "| model | CUDA fp32 vs CPU | fp16 autocast vs fp32 | bf16 autocast vs fp32 | finite | "
                  "fp32 ms | fp16 ms | bf16 ms |", "|---|---|---|---|---|---|---|---|"]
        for n in r["numerics"]:
            ms = n["latency_ms"]
            lines.append(f"| {n['model']} | {n['cuda_fp32_vs_cpu']:.1e} | {n['fp16_autocast_vs_fp32']:.1e} | "
                         f"{n['bf16_autocast_vs_fp32']:.1e} | {n['fp16_finite'] and n['bf16_finite']} | "
                         f"{ms['fp32']} | {ms['fp16']} | {ms['bf16']} |")
        lines.append("")
    if isinstance(r.get("attention"), list):
        ok = [a for a in r["attention"] if "ms" in a]
        lines += ["## One attention layer, bf16, batch 1 (width 512, 8 softmax heads; LiT 2 heads; CLEAR r = 8)", "",
                  "| tokens | softmax (SDPA) ms | LiT ms | CLEAR (FlexAttention) ms | LiT speedup | CLEAR speedup | "
                  "CLEAR block density |", "|---|---|---|---|---|---|---|"]
        for a in ok:
            lines.append(f"| {a['tokens']} | {a['ms']['softmax']} | {a['ms']['lit']} | {a['ms']['clear']} | "
                         f"{a['speedup']['lit']} | {a['speedup']['clear']} | {a['clear_block_density']} |")
        lines += ["", "![attention latency](gpu-checks.png)", ""]
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for k in ("softmax", "lit", "clear"):
            ax.loglog([a["tokens"] for a in ok], [a["ms"][k] for a in ok], "o-", label=k)
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms (one attention layer, bf16)")
        ax.set_title(e.get("gpu", "GPU"))
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gpu-checks.png", dpi=110)
        plt.close(fig)
    for key, title in (("fullsize", "Full-size configs, random weights, bf16, batch 2, 4 096 tokens (1024 px)"),
                       ("fullsize_repeat", "The same, repeated on a fresh machine")):
        if not isinstance(r.get(key), list):
            continue
        lines += [f"## {title}", "", r.get(f"{key}_note", ""), "",
                  "| config | variant | parameters (B) | finite | ms | vs dense |", "|---|---|---|---|---|---|"]
        for f in r[key]:
            lines.append(f"| {f['config']} | {f['variant']} | " + (f"error: {f['error']} | | | |" if "error" in f else
                         f"{f['params_b']} | {f['finite']} | {f['ms']} | {f['vs_dense']} |"))
        lines.append("")
    if isinstance(r.get("moeprofile"), dict):
        m = r["moeprofile"]
        lines += [f"## One FFN (width {m['width']}) vs its MoE, {m['tokens']} tokens, bf16", "",
                  f"dense {m['ms']['dense']} ms, MoE {m['ms']['moe']} ms (x{m['vs_dense']}). "
                  "Top CUDA kernels of 5 MoE calls:", "", "```", m["profile_moe_x5"].strip(), "```", ""]
    (out / "gpu-checks.md").write_text(with_header("\n".join(lines) + "\n", r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="*", default=["zoo:digits-dit", "zoo:digits-sd3"])
    p.add_argument("--sections", nargs="+", default=["env", "numerics", "attention", "fullsize", "moeprofile"])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    p.add_argument("--configs", nargs="+", default=["pixart-xl-2", "sd3-medium"])
    p.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024 px, 4 096 tokens)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the full-size section")
    p.add_argument("--render", help="write the .md and .png from this saved gpu-checks.json, and stop")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        write(out, json.loads(Path(args.render).read_text()))
        return
    result = stamp({})
    work = {"env": env,
            "numerics": lambda: numerics(args.models, 64, args.repeats),
            "attention": lambda: attention(args.tokens, 512, 8, args.repeats),
            "fullsize": lambda: fullsize(args.configs, args.latent, 2, args.repeats),
            "moeprofile": lambda: moe_profile(8192, 1536, args.repeats)}
    for name in args.sections:
        t0 = time.time()
        try:
            result[name] = work[name]()
        except Exception:  # noqa: BLE001  keep the other sections' results
            result[name] = {"error": traceback.format_exc()}
            print(result[name]["error"], flush=True)
        result[f"{name}_seconds"] = round(time.time() - t0, 1)
        (out / "gpu-checks.json").write_text(json.dumps(result, indent=2) + "\n")
    write(out, result)
    print(json.dumps({k: v for k, v in result.items() if k == "env" or k.endswith("_seconds")}, indent=1))


if __name__ == "__main__":
    main()
