"""ONNX Runtime graph optimisation: what each level fuses, and what it buys.

ONNX Runtime optimises at session creation (basic: constant folding and redundant-node
removal; extended: op fusions such as Gelu, LayerNorm, MatMul+Add, attention; all: plus
layout transforms for the CPU). Its transformer optimizer adds model-type specific fusions
(`mmdit` for families with joint text-image blocks, `vit` for the others). Each is measured on the
same inputs so the report shows op counts, fused ops and latency side by side.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ..models.families import JOINT_BLOCK, adapter_for_family
from ..timing import time_calls
from .precision import op_counts

LEVELS = ("disabled", "basic", "extended", "all")


def fusion_model_type(family: str) -> str:
    """The transformer optimizer's model type: `mmdit` where blocks are joint text-image blocks."""
    kinds = {g.kind for g in adapter_for_family(family).block_groups}
    return "mmdit" if JOINT_BLOCK in kinds else "vit"


def _session(path: Path, level: str, save_to: Path | None = None, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        opts.intra_op_num_threads = threads
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency_ms(session, feeds: dict, repeats: int) -> dict:
    return time_calls(lambda: session.run(None, feeds), repeats)


def transformer_fuse(src: Path, dst: Path, family: str) -> dict:
    """ONNX Runtime's transformer optimizer on `src`; returns the fusions it found."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = fusion_model_type(family)
    opt = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(dst), use_external_data_format=Path(str(src) + ".data").exists())
    return {"model_type": model_type, "fused": stats}


def optimization_report(src: Path, work: Path, family: str, feeds: dict, repeats: int = 20) -> dict:
    """Op counts and latency at every ORT level, and after the transformer fusions (at level all)."""
    work.mkdir(parents=True, exist_ok=True)
    base = op_counts(onnx.load(str(src), load_external_data=False))
    rows = []
    for level in LEVELS:
        saved = work / f"level-{level}.onnx"
        sess = _session(src, level, saved if level != "disabled" else None)
        ops = op_counts(onnx.load(str(saved), load_external_data=False)) if level != "disabled" else base
        rows.append({"graph": f"ort-{level}", "nodes": sum(ops.values()),
                     "new_ops": {k: v for k, v in ops.items() if k not in base},
                     "latency": latency_ms(sess, feeds, repeats)})
    fused_path = work / "transformer-fused.onnx"
    fusion = transformer_fuse(src, fused_path, family)
    ops = op_counts(onnx.load(str(fused_path), load_external_data=False))
    rows.append({"graph": f"transformer-fused ({fusion['model_type']}) + ort-all", "nodes": sum(ops.values()),
                 "new_ops": {k: v for k, v in ops.items() if k not in base}, "fusions": fusion["fused"],
                 "latency": latency_ms(_session(fused_path, "all"), feeds, repeats)})
    ref = rows[0]["latency"]["median_ms"]
    for r in rows:
        r["latency_ratio"] = round(r["latency"]["median_ms"] / ref, 4)
    return {"batch": int(next(iter(feeds.values())).shape[0]), "rows": rows, "fused_graph": str(fused_path)}
