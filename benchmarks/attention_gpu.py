"""LiT and CLEAR against dense attention, whole model, where their papers claim speed: the GPU at 1-4 K px.

One run on one CUDA GPU (`python benchmarks/attention_gpu.py --out DIR`, under 8 minutes by its
own deadline): published transformer configs with random weights (SD3-medium, PixArt-XL-2,
FLUX.1-dev), bf16, batch 1, at 1024, 2048 and 4096 px (4 096, 16 384 and 65 536 image tokens;
FLUX packs 2x2 latents, the same counts). Variants: dense (SDPA), LiT (2 heads, 5x5 depthwise
convolution, this project's conversion), CLEAR (r = 8, the official down-sampled tokens f = 4,
FlexAttention block mask), each eager and torch.compile'd (compiled sizes: `--compile-px`).
Latencies are medians of calls timed in alternation within one (config, size), each followed by
a CUDA synchronize; the ratio to dense is taken within the same mode.

Every row is appended to DIR/attention-gpu.json as soon as it is measured, so a run cut off by
its deadline (`--budget-s`, default 420) keeps what it got; DIR/attention-gpu.md and .png are
written at the end (`--render JSON` writes them again). `--device cpu --px 64` is a dry run of
every code path on small shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _provenance import stamp, with_header

from dit_compress.timing import alternating_latency

sys.path.insert(0, str(Path(__file__).parent))
from full_size_export import CONFIGS  # noqa: E402

FLUX_DEV = {  # black-forest-labs/FLUX.1-dev, transformer/config.json
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
ALL = {**CONFIGS, "flux-dev": FLUX_DEV}
VARIANTS = ("dense", "lit", "clear")


def latent_side(config: dict, px: int) -> int:
    """Latent side for `px` pixels (VAE factor 8); FLUX's pipeline packs 2x2 latents into a token."""
    return px // 8


def build(config: dict, kind: str, latent: int, device: str, tiny: bool):
    """One variant of `config` at `latent` (its side), bf16, on `device`."""
    import diffusers

    from dit_compress.models.families import get_adapter
    from dit_compress.stages.attention.stage import clear_, image_attentions, lit_

    cfg = dict(config)
    if tiny:  # dry run: the same classes, a few blocks of small width
        cfg.update(num_layers=2, attention_head_dim=16, num_attention_heads=2)
        for k, v in (("num_single_layers", 2), ("joint_attention_dim", 64), ("caption_projection_dim", 32),
                     ("pooled_projection_dim", 32), ("cross_attention_dim", 32), ("caption_channels", 64)):
            if k in cfg:
                cfg[k] = v
        if "axes_dims_rope" in cfg:
            cfg["axes_dims_rope"] = [4, 6, 6]
    if "sample_size" in cfg:  # PixArt's position embedding is laid out for this latent side
        cfg["sample_size"] = latent
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    base = get_adapter(model, latent)
    grid = base.token_grid()
    if kind == "lit":
        lit_(model, list(image_attentions(model, base, None, "lit")), base, 2, grid, 5)
    elif kind == "clear":
        clear_(model, list(image_attentions(model, base, None, "clear")), base, grid, 8, 8, down_factor=4)
    model.to(device, torch.bfloat16)
    adapter = get_adapter(model, latent)
    adapter.text_tokens = 77
    return model, adapter


def _move(inputs, device):
    x, t, cond = inputs
    return (x.to(device, torch.bfloat16), t.to(device),
            {k: v.to(device, torch.bfloat16) if v.is_floating_point() else v.to(device) for k, v in cond.items()})


@torch.no_grad()
def measure(name: str, px: int, compiled: bool, args, emit) -> None:
    device, tiny = args.device, args.device == "cpu"
    latent = latent_side(ALL[name], px)
    calls, facts, inputs = {}, {}, None
    for kind in VARIANTS:
        try:  # one variant failing must not hide the others
            model, adapter = build(ALL[name], kind, latent, device, tiny)
            if inputs is None:
                inputs = _move(adapter.example_inputs(1), device)
            run = torch.compile(model, dynamic=False) if compiled else model
            t0 = time.time()
            out = adapter.denoise(run, *inputs)  # the first call compiles (and builds CLEAR's block mask)
            if device == "cuda":
                torch.cuda.synchronize()
            facts[kind] = {"first_call_s": round(time.time() - t0, 1), "finite": bool(torch.isfinite(out).all())}
            calls[kind] = (lambda m=run, a=adapter: a.denoise(m, *inputs))
        except Exception as e:  # noqa: BLE001
            emit({"config": name, "px": px, "compiled": compiled, "variant": kind,
                  "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    if not calls:
        return

    def synced(fn):
        def call():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return call

    ms = {k: v["median_ms"] for k, v in alternating_latency({k: synced(f) for k, f in calls.items()},
                                                           args.repeats, warmup=1).items()}
    tokens = (latent // 2) ** 2
    for kind, v in ms.items():
        emit({"config": name, "px": px, "tokens": tokens, "compiled": compiled, "variant": kind, "ms": round(v, 3),
              "vs_dense": round(v / ms["dense"], 3) if "dense" in ms else None, **facts[kind]})
    del calls
    if device == "cuda":
        torch.cuda.empty_cache()


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "budget_s": args.budget_s, "rows": [], "skipped": []}
    path = out / "attention-gpu.json"
    t0 = time.time()

    def emit(row):
        result["rows"].append(row)
        print(row, flush=True)
        path.write_text(json.dumps(stamp(result), indent=1) + "\n")

    jobs = [(px, compiled, name) for px in args.px for compiled in (False, True) for name in args.configs
            if not compiled or px in args.compile_px]
    for px, compiled, name in jobs:
        if time.time() - t0 > args.budget_s:
            result["skipped"].append({"config": name, "px": px, "compiled": compiled, "why": "deadline"})
            continue
        measure(name, px, compiled, args, emit)
    result["wall_seconds"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(stamp(result), indent=1) + "\n")
    render(out, result)
    return result


def render(out: Path, r: dict) -> None:
    rows = [x for x in r["rows"] if "ms" in x]
    lines = [f"# LiT and CLEAR vs dense attention, whole model ({r['device']}, torch {r['torch']})", "",
             "Random weights, published configs, bf16, batch 1; medians of alternated calls; ratio to dense in "
             "the same mode (eager / compiled). CLEAR: r = 8 with down-sampled tokens (f = 4), FlexAttention. "
             "LiT: 2 heads, 5x5 depthwise convolution.", "",
             "| config | px | tokens | mode | dense ms | LiT ms | CLEAR ms | LiT / dense | CLEAR / dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(x["config"], x["px"], x["compiled"]) for x in rows})
    for config, px, compiled in keys:
        got = {x["variant"]: x for x in rows if (x["config"], x["px"], x["compiled"]) == (config, px, compiled)}
        f = lambda k, f_: f"{got[k][f_]}" if k in got and got[k].get(f_) is not None else "n/a"  # noqa: E731
        lines.append(f"| {config} | {px} | {next(iter(got.values()))['tokens']} | "
                     f"{'compiled' if compiled else 'eager'} | {f('dense', 'ms')} | {f('lit', 'ms')} | "
                     f"{f('clear', 'ms')} | {f('lit', 'vs_dense')} | {f('clear', 'vs_dense')} |")
    errors = [x for x in r["rows"] if "error" in x]
    if errors:
        lines += ["", "Errors:", *[f"- {x['config']} {x['px']} px {x['variant']}: {x['error']}" for x in errors]]
    if r.get("skipped"):
        lines += ["", "Not reached before the deadline: " + ", ".join(
            f"{s['config']} {s['px']} px {'compiled' if s['compiled'] else 'eager'}" for s in r["skipped"])]
    (out / "attention-gpu.md").write_text(with_header("\n".join(lines) + "\n", r))
    _plot(out / "attention-gpu.png", rows)


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({x["config"] for x in rows})
    if not configs:
        return
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.4), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for kind in ("lit", "clear"):
            for compiled, style in ((False, "o-"), (True, "s--")):
                pts = sorted((x["tokens"], x["vs_dense"]) for x in rows if x["config"] == config
                             and x["variant"] == kind and x["compiled"] == compiled and x.get("vs_dense"))
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{kind} {'compiled' if compiled else 'eager'}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_title(config, fontsize=9)
        ax.set_xlabel("image tokens")
        ax.set_ylabel("latency / dense")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--configs", nargs="+", default=["sd3-medium", "pixart-xl-2", "flux-dev"], choices=sorted(ALL))
    p.add_argument("--px", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--compile-px", type=int, nargs="*", default=[1024, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--device", default="cuda", help="cpu: a dry run on small shapes (e.g. --px 64)")
    p.add_argument("--render", help="write the .md and .png from this saved attention-gpu.json, and stop")
    args = p.parse_args()
    if args.render:
        render(Path(args.out), json.loads(Path(args.render).read_text()))
        return
    result = run(args)
    print((Path(args.out) / "attention-gpu.md").read_text())
    print(f"total {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
