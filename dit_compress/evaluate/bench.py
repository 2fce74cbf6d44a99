"""`ditc bench`: one latency table for dense vs compressed, PyTorch vs ONNX Runtime precisions.

Every configuration (runtime, batch, threads) is timed for all models back to back, so the
ratios compare measurements taken moments apart on the same machine. On a CUDA machine
PyTorch fp16, ONNX Runtime's CUDA provider and a TensorRT fp16 engine are added.
"""

from __future__ import annotations

import json
import os
import logging
import platform
from pathlib import Path

import torch

from ..core.manifest import load_any
from ..data.calibration import CalibrationSpec, build_calibration, resolved_sampling
from ..errors import DeploymentUnsupported
from ..export.artifact import deployment_card
from ..export.deploy import derive
from ..export.onnx import export_onnx, ort_feeds, ort_session
from ..timing import time_calls
from . import cost

log = logging.getLogger("dit_compress")


def _graphs(name: str, loaded, out: Path, precisions: list[str]) -> dict[str, Path]:
    """fp32 export plus each derivable precision; a precision this machine cannot run is left out."""
    path = out / "onnx" / f"{name}.onnx"
    card = deployment_card(loaded, *resolved_sampling(loaded, None, None))
    export_onnx(loaded.model, loaded.adapter, path, card=card)
    graphs = {"onnx-fp32": path}
    calib = build_calibration(loaded, CalibrationSpec(num_samples=128), out / ".work") \
        if "int8-static" in precisions else None
    for kind in precisions:
        try:
            graphs[f"onnx-{kind}"] = Path(derive(path, kind, calib)["path"])
        except DeploymentUnsupported as e:
            log.warning("%s: %s skipped: %s", name, kind, e)
    return graphs


def _cpu_row(runtime: str, loaded, graph: Path | None, batch: int, threads: int, repeats: int) -> dict:
    if runtime == "pytorch-fp32":
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return cost.torch_latency(loaded.model, loaded.adapter, batch, repeats)
        finally:
            torch.set_num_threads(previous)
    return cost.onnx_latency(graph, loaded.adapter, batch, repeats, threads)


def _gpu_rows(models: dict, graphs: dict, batches: list[int], repeats: int) -> list[dict]:
    """PyTorch CUDA fp32/fp16, ONNX Runtime CUDA fp32, TensorRT fp16, where each exists."""
    import onnxruntime as ort

    from ..export.tensorrt import Engine, EngineSpec, build_engine, unavailable_reason

    rows = []
    for name, loaded in models.items():
        model = loaded.model.to("cuda")
        for batch in batches:
            x, t, cond = loaded.adapter.example_inputs(batch)
            args = (x.cuda(), t.cuda(), {k: v.cuda() for k, v in cond.items()})
            for runtime, dtype in (("cuda-pytorch-fp32", None), ("cuda-pytorch-fp16", torch.float16)):
                def call():
                    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                        loaded.adapter.denoise(model, *args)
                    torch.cuda.synchronize()
                rows.append({"model": name, "runtime": runtime, "batch": batch, "threads": None,
                             **time_calls(call, repeats)})
            feeds = ort_feeds(x, t, cond)
            if "CUDAExecutionProvider" in ort.get_available_providers():
                sess = ort_session(graphs[name]["onnx-fp32"], providers=["CUDAExecutionProvider"])
                rows.append({"model": name, "runtime": "cuda-onnx-fp32", "batch": batch, "threads": None,
                             **time_calls(lambda: sess.run(None, feeds), repeats)})
            if unavailable_reason() is None:
                src = graphs[name]["onnx-fp32"]
                spec = EngineSpec(opt_batch=batch, max_batch=max(batches))
                engine = Engine(Path(build_engine(src, src.with_suffix(f".b{batch}.fp16.plan"), spec)["engine"]))
                rows.append({"model": name, "runtime": "tensorrt-fp16", "batch": batch, "threads": None,
                             **engine.latency_ms(feeds, repeats)})
        loaded.model.to("cpu")
    return rows


def run_bench(sources: dict[str, str], out: Path, batches: list[int], threads: list[int], precisions: list[str],
              repeats: int = 20, latent_size: int | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = {name: load_any(src, latent_size) for name, src in sources.items()}
    graphs = {name: _graphs(name, m, out, precisions) for name, m in models.items()}
    runtimes = ["pytorch-fp32", *next(iter(graphs.values())).keys()]
    rows = []
    for runtime in runtimes:
        for batch in batches:
            for th in threads:
                for name, loaded in models.items():  # back to back: the ratio's two sides
                    if runtime != "pytorch-fp32" and runtime not in graphs[name]:
                        continue
                    log.debug("timing %s %s batch %d threads %d", name, runtime, batch, th)
                    r = _cpu_row(runtime, loaded, graphs[name].get(runtime), batch, th, repeats)
                    rows.append({"model": name, "runtime": runtime, "batch": batch, "threads": th,
                                 "median_ms": r["median_ms"], "iqr_ms": r["iqr_ms"], "runs": r["runs"]})
    if torch.cuda.is_available():
        rows += _gpu_rows(models, graphs, batches, repeats)
    _ratios(rows)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "gpu": gpu}
    result = {"models": sources, "machine": machine, "repeats": repeats, "rows": rows}
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(_markdown(result))
    return result


def _ratios(rows: list[dict]) -> None:
    """vs dense: same runtime/batch/threads; vs PyTorch fp32: same model/batch/threads (CPU rows)."""
    index = {(r["model"], r["runtime"], r["batch"], r["threads"]): r["median_ms"] for r in rows}
    for r in rows:
        dense = index.get(("dense", r["runtime"], r["batch"], r["threads"]))
        r["vs_dense"] = round(r["median_ms"] / dense, 4) if dense else None
        base = "cuda-pytorch-fp32" if r["runtime"].startswith(("cuda", "tensorrt")) else "pytorch-fp32"
        torch_ms = index.get((r["model"], base, r["batch"], r["threads"]))
        r["vs_pytorch_fp32"] = round(r["median_ms"] / torch_ms, 4) if torch_ms else None
        onnx_ms = index.get((r["model"], "onnx-fp32", r["batch"], r["threads"]))
        r["vs_onnx_fp32"] = round(r["median_ms"] / onnx_ms, 4) if onnx_ms and r["runtime"].startswith("onnx") else None


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Latency: {', '.join(f'{k} = `{v}`' for k, v in result['models'].items())}", "",
             f"{m['cpu']} ({m['cpu_count']} logical CPUs){'; GPU ' + m['gpu'] if m['gpu'] else '; no GPU'}; "
             f"median of {result['repeats']} runs, IQR = interquartile range.", "",
             "| model | runtime | batch | threads | median ms | IQR ms | vs dense | vs PyTorch fp32 | vs ONNX fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['threads'] or '-'} | {r['median_ms']} | "
                     f"{r['iqr_ms']} | {_or_dash(r['vs_dense'])} | "
                     f"{_or_dash(r['vs_pytorch_fp32'])} | {_or_dash(r['vs_onnx_fp32'])} |")
    return "\n".join(lines) + "\n"


def _or_dash(v) -> str:
    return "-" if v is None else str(v)
