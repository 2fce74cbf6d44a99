"""Dense2MoE's grouped-GEMM path against dense on one GPU, in one run (`python benchmarks/moe_gpu.py`).

  layer    one FFN at SD3-medium's width (1536 -> 6144) over 8 192 tokens, bf16: dense vs the MoE
           (shared expert + top-2 of 7 routed: 62.5 % fewer activated FFN parameters, random router)
           on its reference path (padded slabs, what the CPU and ONNX run) and on its grouped path
           (with its elementwise steps fused, the default on CUDA, and as eager launches), vs a dense
           FFN of the MoE's activated width (its FLOP bound); eager, then the whole call compiled
  parity   on the GPU: the grouped path against the reference (bf16) and against fp32, for one
           routing, for the whole layer (routing included) and for the gradients
  profile  the grouped path's top CUDA kernels
  model    SD3-medium's config (random weights) at 1024 px (128x128 latent, 4 096 image tokens),
           batch 2, every FFN converted (image and context, random routers): dense vs MoE on the
           grouped path (fused / eager elementwise) vs MoE on the reference path; eager, then
           torch.compile while --budget-s allows

Times come from CUDA events around `inner` back-to-back calls after warm-up, variants taken in
turn, the median over rounds; every ratio is between rows of the same run. The JSON and the
Markdown table are rewritten after each section, so a run cut short keeps what it measured.
`--smoke` runs the whole script at tiny sizes on the CPU in fp32 (no compile, no profile).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # sibling benchmark: moe_latency (the MoE conversion)

from _provenance import stamp, with_header  # noqa: E402
from moe_latency import SEGMENTS, SHARED, TOP_K, to_moe  # noqa: E402

import dit_compress.stages.moe.layer as moe_layer  # noqa: E402
from dit_compress.stages.moe.layer import MoEFeedForward  # noqa: E402

# diffusers' SD3-medium transformer config (stabilityai/stable-diffusion-3-medium-diffusers).
SD3_MEDIUM = {"num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16, "sample_size": 128,
              "patch_size": 2, "in_channels": 16, "pos_embed_max_size": 192}
SMOKE = {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
         "caption_projection_dim": 16, "pooled_projection_dim": 16, "out_channels": 4, "sample_size": 8,
         "patch_size": 2, "in_channels": 4, "pos_embed_max_size": 16}
TARGETS = {"layer": 0.85, "model": 0.95}  # MoE / dense, issue 27's acceptance


class Bench:
    def __init__(self, device: str, dtype: torch.dtype, rounds: int, warmup: int, inner: int):
        self.device, self.dtype, self.rounds, self.warmup, self.inner = device, dtype, rounds, warmup, inner

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def times(self, fns: dict, inner: int | None = None) -> dict[str, float]:
        """{name: ms per call}: median over rounds of `inner` calls, the variants in turn."""
        inner = inner or self.inner
        for _ in range(self.warmup):
            for fn in fns.values():
                fn()
        self.sync()
        per_call = {k: [] for k in fns}
        for _ in range(self.rounds):
            for k, fn in fns.items():
                if self.device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(inner):
                        fn()
                    end.record()
                    end.synchronize()
                    per_call[k].append(start.elapsed_time(end) / inner)
                else:
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    per_call[k].append((time.perf_counter() - t0) * 1000 / inner)
        return {k: round(statistics.median(v), 4) for k, v in per_call.items()}


@contextlib.contextmanager
def elementwise(fused: bool):
    """The grouped path with its elementwise steps compiled into single kernels (fused) or as
    separate eager launches (the default since this benchmark measured them faster)."""
    flag = moe_layer.FUSE_ON_CUDA
    moe_layer.FUSE_ON_CUDA = fused
    try:
        yield
    finally:
        moe_layer.FUSE_ON_CUDA = flag


def _with(fused: bool, fn):
    def call():
        with elementwise(fused):
            return fn()
    return call


@contextlib.contextmanager
def reference_path():
    """Every MoE layer on its reference path (padded slabs), whatever the device."""
    chooser = moe_layer.takes_grouped_path
    moe_layer.takes_grouped_path = lambda *a: False
    try:
        yield
    finally:
        moe_layer.takes_grouped_path = chooser


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _ratios(ms: dict, base: str = "dense") -> dict:
    return {k: round(v / ms[base], 3) for k, v in ms.items()} if base in ms else {}


def build_layer(width: int, bench: Bench):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    dense = FeedForward(width, activation_fn="gelu-approximate").eval()
    moe = to_moe(dense)
    activated = moe.shared_up.out_features + moe.top_k * moe.up_weight.shape[-1]
    narrow = FeedForward(width, inner_dim=activated, activation_fn="gelu-approximate").eval()
    to = {"device": bench.device, "dtype": bench.dtype}
    return dense.to(**to), moe.to(**to), narrow.to(**to), activated


@torch.no_grad()
def layer(width: int, tokens: int, bench: Bench, result: dict) -> None:
    dense, moe, narrow, activated = build_layer(width, bench)
    x = torch.randn(tokens, width, device=bench.device, dtype=bench.dtype)
    fns = {"dense": lambda: dense(x), "moe_reference": lambda: moe._forward_reference(x),
           "moe_grouped": _with(True, lambda: moe._forward_grouped(x)),
           "moe_grouped_unfused": _with(False, lambda: moe._forward_grouped(x)), "activated_width": lambda: narrow(x)}
    ms = bench.times(fns)
    moe.track = True
    moe(x)
    moe.track = False
    load = moe.last_counts.float()
    result["layer"] = {"width": width, "hidden": 4 * width, "tokens": tokens, "activated_hidden": activated,
                       "experts": f"shared + top-{TOP_K} of {SEGMENTS - SHARED}",
                       "forward_takes_grouped_path": moe_layer.takes_grouped_path(x, moe.up_weight),
                       "busiest_expert_over_fair": round(float(load.max() / load.mean()), 3),
                       "eager_ms": ms, "eager_vs_dense": _ratios(ms)}
    print("layer eager", ms, _ratios(ms), flush=True)


@torch.no_grad()
def layer_compiled(width: int, tokens: int, bench: Bench, result: dict) -> None:
    """torch.compile of dense, the grouped path and the activated-width FFN (the reference path
    syncs on the busiest expert's load, a graph break, so it is left eager)."""
    dense, moe, narrow, _ = build_layer(width, bench)
    x = torch.randn(tokens, width, device=bench.device, dtype=bench.dtype)
    compiled = {"dense": torch.compile(dense), "moe_grouped": torch.compile(moe._forward_grouped),
                "activated_width": torch.compile(narrow)}
    t0 = time.time()
    for fn in compiled.values():
        fn(x)
    ms = bench.times({k: (lambda f=f: f(x)) for k, f in compiled.items()})
    result["layer"].update({"compiled_ms": ms, "compiled_vs_dense": _ratios(ms),
                            "compile_seconds": round(time.time() - t0, 1)})
    print("layer compiled", ms, _ratios(ms), flush=True)


def parity(width: int, tokens: int, bench: Bench, result: dict) -> None:
    """Experts for one routing (forward and gradients) against the reference at the same precision
    and against fp32; the whole layer, whose router logits come out of the GEMM fused with the shared
    expert, so near-ties may route a few tokens differently: reported, and the error over the rest."""
    _, moe, _, _ = build_layer(width, bench)
    exact = copy.deepcopy(moe).float()
    x = torch.randn(tokens, width, device=bench.device, dtype=bench.dtype)
    out = {}
    with torch.no_grad():
        _, idx, gates = moe.route(x)
        grouped, reference = moe._experts_grouped(x, idx, gates), moe._experts(x, idx, gates)
        fp32 = exact._experts(x.float(), idx, gates.float())
        out["experts_grouped_vs_reference"] = _rel(grouped, reference)
        out["experts_grouped_vs_fp32"] = _rel(grouped, fp32)
        out["experts_reference_vs_fp32"] = _rel(reference, fp32)
        both, ref = moe._forward_grouped(x), moe._forward_reference(x)
        idx_fused, _ = moe._choose(moe._shared_up_and_logits(x)[1])
        agree = (idx_fused.sort(1).values == idx.sort(1).values).all(1)
        out["routing_agreement_fused_vs_router"] = float(agree.float().mean())
        out["layer_grouped_vs_reference"] = _rel(both, ref)
        out["layer_grouped_vs_reference_same_routing"] = _rel(both[agree], ref[agree])
        out["layer_grouped_vs_fp32_same_routing"] = _rel(both[agree], exact._forward_reference(x.float())[agree])
    try:  # training: gradients through the experts for the same routing
        weight = torch.randn_like(x, dtype=torch.float32)
        grads = {}
        for name, m, fn, dtype in (("grouped", moe, moe._experts_grouped, bench.dtype),
                                   ("reference", moe, moe._experts, bench.dtype),
                                   ("fp32", exact, exact._experts, torch.float32)):
            m.zero_grad()
            xi, gi = (t.detach().to(dtype, copy=True).requires_grad_() for t in (x, gates))
            (fn(xi, idx, gi).float() * weight).sum().backward()
            grads[name] = {"x": xi.grad, "gates": gi.grad, "up_weight": m.up_weight.grad, "up_bias": m.up_bias.grad,
                           "down_weight": m.down_weight.grad}
        out["gradients_vs_fp32"] = {n: {k: _rel(g, grads["fp32"][k]) for k, g in grads[n].items()}
                                    for n in ("grouped", "reference")}
    except Exception as e:  # noqa: BLE001  a backward the installed torch lacks is a finding, not a crash
        out["gradients_vs_fp32"] = f"{type(e).__name__}: {e}"[:300]
    result["parity"] = out
    print("parity", out, flush=True)


@torch.no_grad()
def profile(width: int, tokens: int, bench: Bench, result: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, moe, _, _ = build_layer(width, bench)
    x = torch.randn(tokens, width, device=bench.device, dtype=bench.dtype)
    for _ in range(3):
        moe._forward_grouped(x)
    bench.sync()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            moe._forward_grouped(x)
        bench.sync()
    result["profile_grouped_x5"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                                             max_name_column_width=70)
    print(result["profile_grouped_x5"], flush=True)


def build_models(config: dict, latent: int, text_tokens: int, bench: Bench):
    import diffusers

    from dit_compress.models.families import get_adapter
    from dit_compress.stages.moe.convert import replace_module_

    torch.manual_seed(0)
    with torch.device(bench.device):
        dense = diffusers.SD3Transformer2DModel.from_config(config)
    dense = dense.to(bench.dtype).eval().requires_grad_(False)
    moe = copy.deepcopy(dense)
    converted = 0
    for i, block in enumerate(moe.transformer_blocks):
        for attr in ("ff", "ff_context"):  # the last block (context_pre_only) has no context FFN
            ff = getattr(block, attr, None)
            if ff is not None:
                replace_module_(moe, f"transformer_blocks.{i}.{attr}",
                                to_moe(ff.float()).to(bench.device, bench.dtype).requires_grad_(False))
                converted += 1
    adapter = get_adapter(dense, latent)
    adapter.text_tokens = text_tokens
    return dense, moe, adapter, converted


def _inputs(adapter, batch: int, bench: Bench):
    x, t, cond = adapter.example_inputs(batch)
    return (x.to(bench.device, bench.dtype), t.to(bench.device),
            {k: v.to(bench.device, bench.dtype if v.is_floating_point() else v.dtype) for k, v in cond.items()})


@torch.no_grad()
def model(config: dict, latent: int, batch: int, text_tokens: int, bench: Bench, result: dict) -> dict:
    dense, moe, adapter, converted = build_models(config, latent, text_tokens, bench)
    inputs = _inputs(adapter, batch, bench)

    def reference():
        with reference_path():
            return adapter.denoise(moe, *inputs)

    fns = {"dense": lambda: adapter.denoise(dense, *inputs), "moe_grouped": _with(True, lambda: adapter.denoise(moe, *inputs)),
           "moe_grouped_unfused": _with(False, lambda: adapter.denoise(moe, *inputs)), "moe_reference": reference}
    grouped, ref = fns["moe_grouped"](), reference()
    ms = bench.times(fns, inner=2)
    ffn = [m for m in moe.modules() if isinstance(m, MoEFeedForward)]
    result["model"] = {
        "config": {**config, "note": "SD3-medium config, random weights"}, "latent": latent, "batch": batch,
        "image_tokens": batch * (latent // config["patch_size"]) ** 2, "text_tokens_per_sample": text_tokens,
        "converted_ffns": converted, "parameters_b": round(sum(p.numel() for p in dense.parameters()) / 1e9, 3),
        "activated_ffn_fraction": round(sum(m.activated_parameters() for m in ffn)
                                        / sum(sum(p.numel() for p in m.parameters()) for m in ffn), 3),
        "forward_takes_grouped_path": moe_layer.takes_grouped_path(inputs[0], ffn[0].up_weight),
        "finite": bool(torch.isfinite(grouped).all()), "grouped_vs_reference_path": _rel(grouped, ref),
        "eager_ms": ms, "eager_vs_dense": _ratios(ms)}
    print("model eager", ms, _ratios(ms), flush=True)
    return {"dense": dense, "moe": moe, "adapter": adapter, "inputs": inputs}


@torch.no_grad()
def model_compiled(built: dict, bench: Bench, result: dict) -> None:
    adapter, inputs = built["adapter"], built["inputs"]
    t0 = time.time()
    compiled = {k: torch.compile(built[k]) for k in ("dense", "moe")}
    fns = {"dense": lambda: adapter.denoise(compiled["dense"], *inputs),
           "moe_grouped": lambda: adapter.denoise(compiled["moe"], *inputs)}
    for fn in fns.values():
        fn()
    seconds = round(time.time() - t0, 1)
    ms = bench.times(fns, inner=2)
    result["model"].update({"compiled_ms": ms, "compiled_vs_dense": _ratios(ms), "compile_seconds": seconds})
    print("model compiled", ms, _ratios(ms), flush=True)


def _verdict(ratio, target) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f} ({'meets' if ratio <= target else 'misses'} <= {target})"


def write_table(out: Path, r: dict) -> str:
    e = r["env"]
    lines = [f"# Dense2MoE on the GPU: grouped GEMMs vs dense ({e['device_name']}, torch {e['torch']}, "
             f"CUDA {e['cuda']}, {e['dtype']})", "",
             f"MoE: shared expert + top-{TOP_K} of {SEGMENTS - SHARED} routed experts from the project's conversion "
             "(`build_moe`), random weights and routers. Times: CUDA events, median over rounds of back-to-back "
             "calls after warm-up, variants in turn; ratios are MoE / dense from this run.", ""]
    L = r.get("layer")
    if isinstance(L, dict) and "eager_ms" in L:
        lines += [f"## One FFN: width {L['width']} (hidden {L['hidden']}), {L['tokens']} tokens", "",
                  f"Activated hidden width of the MoE: {L['activated_hidden']}; busiest expert / fair share "
                  f"{L['busiest_expert_over_fair']}; `forward` takes the grouped path here: "
                  f"{L['forward_takes_grouped_path']}.", "",
                  "| variant | eager ms | vs dense | compiled ms | vs dense |", "|---|---|---|---|---|"]
        names = {"dense": "dense FFN", "moe_reference": "MoE, reference path (padded slabs)",
                 "moe_grouped": "MoE, grouped path, compiled elementwise", "moe_grouped_unfused": "MoE, grouped path, eager elementwise (default)",
                 "activated_width": f"dense FFN of width {L['activated_hidden']}"}
        for k, name in names.items():
            c = L.get("compiled_ms", {}).get(k)
            lines.append(f"| {name} | {L['eager_ms'][k]:.3f} | {L['eager_vs_dense'][k]:.3f} | "
                         + (f"{c:.3f} | {L['compiled_vs_dense'][k]:.3f} |" if c is not None else "- | - |"))
        lines.append("")
    M = r.get("model")
    if isinstance(M, dict) and "eager_ms" in M:
        lines += [f"## Whole model: {M['config']['note']}, {M['config']['num_layers']} blocks, "
                  f"{M['parameters_b']} B parameters, latent {M['latent']}x{M['latent']}, batch {M['batch']}", "",
                  f"{M['image_tokens']} image tokens and {M['text_tokens_per_sample']} text tokens per sample; "
                  f"{M['converted_ffns']} FFNs converted (image and context), {M['activated_ffn_fraction']:.1%} of "
                  f"their parameters activated per token; MoE output finite: {M['finite']}; grouped vs reference "
                  f"path, max relative difference {M['grouped_vs_reference_path']:.2e}; `forward` takes the grouped "
                  f"path here: {M['forward_takes_grouped_path']}.", "",
                  "| variant | eager ms | vs dense | compiled ms | vs dense |", "|---|---|---|---|---|"]
        for k, name in (("dense", "dense"), ("moe_grouped", "MoE, grouped path, compiled elementwise"),
                        ("moe_grouped_unfused", "MoE, grouped path, eager elementwise (default)"),
                        ("moe_reference", "MoE, reference path")):
            c = M.get("compiled_ms", {}).get(k)
            lines.append(f"| {name} | {M['eager_ms'][k]:.2f} | {M['eager_vs_dense'][k]:.3f} | "
                         + (f"{c:.2f} | {M['compiled_vs_dense'][k]:.3f} |" if c is not None else "- | - |"))
        lines.append("")
    P = r.get("parity")
    if isinstance(P, dict) and "layer_grouped_vs_reference" in P:
        lines += ["## Parity of the grouped path (max |a - b| / max |b|)", ""]
        lines += [f"- {k}: {v:.4f}" if k.startswith("routing") else f"- {k}: {v:.2e}" if isinstance(v, float)
                  else f"- {k}: {v}" for k, v in P.items() if not isinstance(v, dict)]
        if isinstance(P.get("gradients_vs_fp32"), dict):
            for path, g in P["gradients_vs_fp32"].items():
                lines.append(f"- gradients through the experts, {path} path ({e['dtype']}) vs fp32: "
                             + ", ".join(f"{k} {v:.2e}" for k, v in g.items()))
        lines.append("")
    lines += ["## Acceptance (issue 27)", ""]
    for key, what in (("layer", "MoE FFN / dense FFN"), ("model", "whole model, MoE / dense")):
        sec = r.get(key) if isinstance(r.get(key), dict) else {}
        for mode in ("eager", "compiled"):
            ratio = sec.get(f"{mode}_vs_dense", {}).get("moe_grouped")
            lines.append(f"- {what}, {mode}: {_verdict(ratio, TARGETS[key])}")
    errors = {k: "failed: " + v.strip().splitlines()[-1] for k, v in r["errors"].items()}
    if errors or r["skipped"]:
        lines += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in {**errors, **r["skipped"]}.items()]
    if r.get("profile_grouped_x5"):
        lines += ["", "## Top CUDA kernels, 5 calls of the grouped path", "",
                  "```", r["profile_grouped_x5"].strip(), "```"]
    lines += ["", f"Seconds per section: {r['seconds']}."]
    text = with_header("\n".join(lines) + "\n", r)
    (out / "moe-gpu.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, fp32: checks the script end to end")
    p.add_argument("--text-tokens", type=int, default=77, help="prompt tokens per sample (gpu_checks.py's choice)")
    p.add_argument("--budget-s", type=float, default=420, help="compile sections start only while this many "
                   "seconds minus their expected cost remain")
    p.add_argument("--skip-compile", action="store_true")
    args = p.parse_args()
    start = time.time()
    smoke = args.smoke or not torch.cuda.is_available()
    bench = Bench("cpu", torch.float32, 3, 1, 2) if smoke else Bench("cuda", torch.bfloat16, 15, 5, 20)
    width, tokens = (64, 128) if smoke else (1536, 8192)
    config, latent = (SMOKE, 8) if smoke else (SD3_MEDIUM, 128)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"seconds": {}, "skipped": {}, "errors": {},
              "env": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                      "device_name": torch.cuda.get_device_name() if bench.device == "cuda" else "CPU (smoke)",
                      "dtype": str(bench.dtype).removeprefix("torch."),
                      "grouped_mm": hasattr(torch.nn.functional, "grouped_mm")}}
    stamp(result)
    built = {}
    sections = [("layer", lambda: layer(width, tokens, bench, result)),
                ("parity", lambda: parity(width, tokens, bench, result)),
                ("profile", lambda: profile(width, tokens, bench, result)),
                ("model", lambda: built.update(model(config, latent, 2, args.text_tokens, bench, result))),
                ("layer_compiled", lambda: layer_compiled(width, tokens, bench, result)),
                ("model_compiled", lambda: model_compiled(built, bench, result))]
    expected = {"layer_compiled": 90, "model_compiled": 200}  # seconds, mostly compilation
    for name, run in sections:
        left = args.budget_s - (time.time() - start)
        if name in expected and (smoke or args.skip_compile or left < expected[name]):
            result["skipped"][name] = ("CPU smoke run" if smoke else "--skip-compile" if args.skip_compile
                                       else f"{left:.0f} s of the budget left, about {expected[name]} s needed")
            continue
        if name == "profile" and smoke:
            result["skipped"][name] = "CPU smoke run"
            continue
        if name == "model_compiled" and not built:
            result["skipped"][name] = "no eager model"
            continue
        t0 = time.time()
        try:
            run()
        except Exception:  # noqa: BLE001  one section failing must not cost the others
            result["errors"][name] = traceback.format_exc()
            print(traceback.format_exc(), flush=True)
        result["seconds"][name] = round(time.time() - t0, 1)
        (out / "moe-gpu.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        write_table(out, result)
        if bench.device == "cuda":
            torch.cuda.empty_cache()
    print(write_table(out, result))


if __name__ == "__main__":
    main()
