"""INT8 post-training quantization with ONNX Runtime's tooling.

Dynamic: int8 weights, activations quantized per call from their observed range (no
calibration; the fast path on CPUs). Static: QDQ graph with per-channel weights and
activation ranges calibrated on the teacher's own inputs: noised calibration samples at
timesteps across the schedule, half of them unconditioned as classifier-free guidance runs
them. MatMul/Gemm/Conv are quantized; normalisation, softmax and embeddings stay in float.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


from ..data.calibration import CalibrationSet

QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]


def output_head_nodes(model) -> list[str]:
    """The last MatMul/Gemm/Conv before each graph output: the output projection.

    Kept in float, as is standard in PTQ: it writes the prediction directly, and one range
    shared by its output channels (DiT's learned-variance half included) crushes the rest."""
    producer = {o: n for n in model.graph.node for o in n.output}
    heads, stack, seen = [], [o.name for o in model.graph.output], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in QUANTIZED_OPS:
            heads.append(node.name)
        else:
            stack.extend(node.input)
    return heads


class TeacherInputs:
    """`CalibrationDataReader` over noised calibration samples (ONNX Runtime's reader protocol)."""

    def __init__(self, calib: CalibrationSet, input_names: list[str], batches: int = 16, batch_size: int = 16):
        mixed = dataclasses.replace(calib, uncond_fraction=0.5)  # guidance runs both halves
        self.feeds = []
        for i in range(batches):
            b = mixed.batch(900_000 + i, batch_size)
            feeds = {"sample": b.x_t, "timestep": b.t.float(), **b.cond}
            self.feeds.append({n: feeds[n].numpy() for n in input_names})
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


def quantize_int8(src: Path, dst: Path, mode: str, calib: CalibrationSet | None = None,
                  method: str = "minmax") -> dict:
    """Quantize the folded fp32 graph `src` into `dst`; `mode` is "dynamic" or "static"."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx import EXTERNAL_DATA_BYTES

    large = Path(src).stat().st_size > EXTERNAL_DATA_BYTES or Path(str(src) + ".data").exists()
    pre = dst.with_name(dst.stem + ".pre.onnx")
    # onnx shape inference only: ORT's symbolic one does not know this onnx's sequence helpers
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, skip_optimization=True,
                      save_as_external_data=large, all_tensors_to_one_file=True)
    keep_float = output_head_nodes(onnx.load(str(pre), load_external_data=False))
    try:
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep_float,
                             use_external_data_format=large)
        elif mode == "static":
            if calib is None:
                raise ValueError("static int8 quantization needs calibration data")
            names = [i.name for i in onnx.load(str(pre), load_external_data=False).graph.input]
            methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                       "entropy": CalibrationMethod.Entropy}
            quantize_static(str(pre), str(dst), TeacherInputs(calib, names), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=QUANTIZED_OPS, calibrate_method=methods[method],
                            nodes_to_exclude=keep_float,
                            use_external_data_format=large)
        else:
            raise ValueError(f"unknown int8 mode {mode!r}; use dynamic or static")
    finally:
        pre.unlink(missing_ok=True)
        Path(str(pre) + ".data").unlink(missing_ok=True)
    counts = {}
    for n in onnx.load(str(dst), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    quant_ops = {k: v for k, v in counts.items() if "Quant" in k or "Integer" in k or k.startswith("QLinear")}
    return {"mode": mode, "calibration": method if mode == "static" else None, "quantization_ops": quant_ops,
            "kept_float": keep_float}
