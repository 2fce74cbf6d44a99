"""Judge deployment artifacts like any stage: quality against the teacher, latency against fp32.

Every precision variant of the student graph is sampled through ONNX Runtime by the same
evaluator (same noise, labels, steps and guidance as the PyTorch student) and timed in the
same loop as the fp32 graph, so the ratios come from one run on one machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..data.calibration import CalibrationSet
from ..errors import DeploymentUnsupported
from ..export.artifact import OnnxAdapter, load_artifact, read_card
from ..export.deploy import derive
from ..export.onnx import card_path, ort_feeds, ort_session
from . import cost
from .evaluator import Evaluator

log = logging.getLogger("dit_compress")


def judge_deployment(spec, student_onnx: Path, ev: Evaluator, calib: CalibrationSet, work: Path) -> dict:
    """The report's `deployment` section for `spec` (the recipe's export spec)."""
    card = read_card(card_path(student_onnx))
    adapter = OnnxAdapter(card)
    batch, repeats = ev.spec.latency_batch, ev.spec.latency_repeats
    fp32_latency = cost.onnx_latency(student_onnx, adapter, batch, repeats)
    out: dict = {"fp32": {"path": str(student_onnx), "bytes": student_onnx.stat().st_size,
                          "onnx_latency": fp32_latency}}
    for kind in spec.precisions:
        log.info("deployment variant %s: derive, check, sample, time", kind)
        try:
            info = derive(student_onnx, kind, calib, spec.half_rtol, spec.int8_calibration)
        except DeploymentUnsupported as e:
            out[kind] = {"skipped": str(e)}
            log.warning("%s skipped: %s", kind, e)
            continue
        artifact = load_artifact(info["path"])
        quality, _ = ev.quality(artifact, f"student {kind}")
        fp32_paired, latency = cost.paired_onnx_latency(student_onnx, info["path"], adapter, batch, repeats)
        out[kind] = {"export": info, "quality": quality, "onnx_latency": latency, "fp32_paired_latency": fp32_paired,
                     "latency_ratio_vs_fp32": round(latency["median_ms"] / fp32_paired["median_ms"], 4),
                     "size_ratio_vs_fp32": round(info["bytes"] / student_onnx.stat().st_size, 4)}
    if spec.optimize:
        from ..export.optimize import optimization_report

        log.info("ONNX Runtime graph optimisation levels and fusions")
        feeds = ort_feeds(*adapter.example_inputs(batch))
        out["graph_optimisation"] = optimization_report(student_onnx, work / "ort-levels", card["family"], feeds,
                                                        repeats)
    if spec.tensorrt:
        out["tensorrt"] = tensorrt_section(student_onnx, adapter, batch, repeats)
    return out


def tensorrt_section(onnx_path: Path, adapter: OnnxAdapter, batch: int, repeats: int) -> dict:
    """Build an fp16 engine and compare it with ONNX Runtime's output, or say why not."""
    import numpy as np

    from ..export.tensorrt import Engine, EngineSpec, build_engine, unavailable_reason

    reason = unavailable_reason()
    if reason:
        log.warning("TensorRT skipped: %s", reason)
        return {"skipped": reason}
    spec = EngineSpec(opt_batch=batch, max_batch=max(16, batch))
    info = build_engine(onnx_path, onnx_path.with_suffix(".fp16.plan"), spec)
    engine = Engine(Path(info["engine"]))
    feeds = ort_feeds(*adapter.example_inputs(batch))
    ref = ort_session(onnx_path).run(None, feeds)[0]
    got = engine.run(feeds)
    info["max_rel_error_vs_onnx"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    info["latency"] = engine.latency_ms(feeds, repeats)
    return info
