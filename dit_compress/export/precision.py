"""Half-precision graphs: fp16 through ONNX Runtime's converter, bf16 derived from it.

Numerically fragile ops stay in fp32: normalisation statistics, softmax, and the
exponentials/trigonometry of timestep and rotary embeddings overflow or lose their phase
in half precision. Graph inputs and outputs stay fp32, so a half graph is a drop-in
replacement; casts at the boundaries are part of the graph.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx

from .onnx import EXTERNAL_DATA_BYTES

# Ops computed in fp32 inside a half graph, and why: statistics (LayerNorm, RMS via
# ReduceMean/Pow/Sqrt), softmax's exp-sum, and sin/cos/exp of timestep and rotary embeddings.
KEEP_FP32 = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
             "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Softmax", "Exp", "Sin", "Cos", "Range")


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (ByteSize() itself fails on protos past 2 GB)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, with weights in `NAME.onnx.data` when protobuf's 2 GB limit would be exceeded."""
    large = weight_bytes(model) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)


def fold(src: Path, dst: Path) -> Path:
    """ONNX Runtime's basic offline optimisation (constant folding, dead-node removal).

    The dynamo exporter leaves shape arithmetic and sequence ops around that the fp16
    converter and the quantizer do not understand; folding removes most of it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    if Path(src).stat().st_size > EXTERNAL_DATA_BYTES or Path(str(src) + ".data").exists():
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def to_fp16(src: Path, dst: Path, extra_fp32: list[str] = ()) -> dict:
    """fp16 weights and compute, KEEP_FP32 ops in fp32; returns which ops were kept and how many."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    large = weight_bytes(model) > EXTERNAL_DATA_BYTES
    if large:  # the converter's in-memory shape inference stops at 2 GB; the file-based one does not
        typed = src.with_name(src.stem + ".typed.onnx")  # beside src: same external-data location
        onnx.shape_inference.infer_shapes_path(str(src), str(typed))
        model = onnx.load(str(typed))
        typed.unlink()
    block = [*KEEP_FP32, *extra_fp32]
    kept = {op: n for op, n in op_counts(model).items() if op in block}
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=block, disable_shape_infer=large)
    drop_duplicate_nodes(half)
    save_model(half, dst)
    return {"kept_fp32_ops": kept}


def drop_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes identical to an earlier one (same op, inputs, outputs, attributes); returns how many.

    ONNX Runtime 1.30's fp16 converter inserts the same Cast twice when two blocked ops (Sin and
    Cos of a timestep embedding) read one half tensor; the graph then defines that output twice
    and ONNX Runtime refuses to load it."""
    seen, kept = set(), []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    removed = len(model.graph.node) - len(kept)
    if removed:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return removed


def _without_bf16(model: onnx.ModelProto) -> list[str]:
    """Op types whose ONNX schema (at the graph's opset) has no bfloat16 (e.g. Conv before 22)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    lacking = []
    for op in op_counts(model):
        try:
            schema = onnx.defs.get_schema(op, opset)
        except onnx.defs.SchemaError:
            continue
        types = {t for c in schema.type_constraints for t in c.allowed_type_strs}
        # sequence ops only move tensors; casting around them would break their typing
        if "tensor(float16)" in types and "tensor(bfloat16)" not in types and not any("seq(" in t for t in types):
            lacking.append(op)
    return lacking


def to_bf16(src: Path, dst: Path) -> dict:
    """bf16: the fp16 graph with every half tensor, cast and constant retyped to bfloat16.

    bf16 keeps fp32's exponent range, so this only matters where fp16 overflows; ONNX Runtime
    runs it on execution providers with bf16 kernels (CUDA), and the session says so if not.
    Ops whose ONNX schema lacks bf16 stay in fp32 as well."""
    info = to_fp16(src, dst, extra_fp32=_without_bf16(onnx.load(str(src), load_external_data=False)))
    model = onnx.load(str(dst))
    F16, BF16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16

    def retype(t: onnx.TensorProto) -> None:
        if t.data_type != F16:
            return
        values = onnx.numpy_helper.to_array(t).astype(np.float32)
        bits = (values.view(np.uint32) + 0x7FFF + ((values.view(np.uint32) >> 16) & 1)) >> 16  # round to nearest even
        t.CopyFrom(onnx.helper.make_tensor(t.name, BF16, values.shape, bits.astype(np.uint16).tobytes(), raw=True))

    for init in model.graph.initializer:
        retype(init)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == F16:
                attr.i = BF16
            elif attr.type == onnx.AttributeProto.TENSOR:
                retype(attr.t)
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if vi.type.tensor_type.elem_type == F16:
            vi.type.tensor_type.elem_type = BF16
    save_model(model, dst)
    return info
