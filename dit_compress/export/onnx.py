"""ONNX export through torch's dynamo exporter, with a numeric parity check that fails loudly.

The exported graph is the family-agnostic denoiser: (sample, timestep, *conditions) ->
prediction shaped like `sample`, batch axis dynamic. Parity is checked in ONNX Runtime at a
batch size different from the traced one, so a baked-in batch dimension fails too.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import ExportParityError
from ..fileio import write_atomic
from ..models.families import FamilyAdapter

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin


def card_path(onnx_path: str | Path) -> Path:
    """Where a graph's card lives: `NAME.json` beside `NAME.onnx`."""
    return Path(onnx_path).with_suffix(".json")


class DenoiserGraph(nn.Module):
    """`adapter.denoise` as a module with positional tensor inputs, for tracing."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, cond_names: list[str]):
        super().__init__()
        self.model, self.adapter, self.cond_names = model, adapter, cond_names

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conds: torch.Tensor) -> torch.Tensor:
        return self.adapter.denoise(self.model, sample, timestep, dict(zip(self.cond_names, conds)))


def input_names(cond: dict) -> list[str]:
    return ["sample", "timestep", *cond.keys()]


def ort_feeds(x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, np.ndarray]:
    return {name: v.numpy() for name, v in zip(input_names(cond), [x, t, *cond.values()])}


def quiet_ort() -> None:
    """ONNX Runtime logs every unused initializer it drops at warning level; keep errors only."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


def ort_session(path, threads: int | None = None, providers: list[str] | None = None):
    import onnxruntime as ort

    quiet_ort()
    opts = ort.SessionOptions()
    threads = threads or int(os.environ.get("DITC_THREADS") or 0)  # `ditc --threads`
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def parity(onnx_path: Path, model: nn.Module, adapter: FamilyAdapter, batch: int, seed: int = 1) -> dict:
    """Max abs / relative error of ONNX Runtime against PyTorch on fresh inputs."""
    x, t, cond = adapter.example_inputs(batch, seed=seed)
    with torch.no_grad():
        ref = adapter.denoise(model, x, t, cond).numpy()
    got = ort_session(onnx_path).run(None, ort_feeds(x, t, cond))[0]
    if got.shape != ref.shape:
        return {"batch": batch, "shape_mismatch": [list(got.shape), list(ref.shape)],
                "max_abs_error": float("inf"), "max_rel_error": float("inf")}
    err = np.abs(got - ref)
    return {"batch": batch, "max_abs_error": float(err.max()),
            "max_rel_error": float(err.max() / max(np.abs(ref).max(), 1e-12)),
            "finite": bool(np.isfinite(got).all())}


def export_onnx(model: nn.Module, adapter: FamilyAdapter, path: str | Path, batch: int = 2,
                opset: int | None = None, atol: float = 1e-4, card: dict | None = None) -> dict:
    """Export `model` to `path` and check it in ONNX Runtime; raise ExportParityError past `atol`.

    A graph that fails the check is deleted, so a failed export leaves no artifact behind. The
    export facts, merged into `card` (see `artifact.deployment_card`), go to `NAME.json`."""
    if batch < 2:  # torch.export specialises size-1 dimensions: the graph would only take batch 1
        raise ValueError("export_onnx traces at batch >= 2 so that the batch axis stays dynamic")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x, t, cond = adapter.example_inputs(batch)
    names = input_names(cond)
    graph = DenoiserGraph(model, adapter, list(cond.keys())).eval()
    b = torch.export.Dim("batch", min=1, max=4096)
    dynamic = ({0: b}, {0: b}, tuple({0: b} for _ in cond))
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stage_dir = path.parent / f".{path.name}.partial"  # moved into place only after the check
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir()
    tmp = stage_dir / path.name
    start = time.time()
    args = (x, t, *cond.values())
    kwargs = dict(dynamo=True, input_names=names, output_names=["prediction"], dynamic_shapes=dynamic,
                  opset_version=opset, verbose=False, report=False,
                  # The onnxscript optimizer folds Sana's `x / (d + 1e-15)` into `x / d` (inf/NaN where
                  # d == 0); ONNX Runtime optimises the faithful graph itself at session creation.
                  optimize=False)
    with torch.no_grad():
        try:
            program = torch.onnx.export(graph, args, **kwargs)
        except torch.onnx.OnnxExporterError:
            # torch.onnx traces size-obliviously, which cannot prove that a (batch, 1, tokens) attention
            # mask broadcasts over the queries (PixArt's prompt padding mask): trace with torch.export.
            program = torch.onnx.export(torch.export.export(graph, args, dynamic_shapes=dynamic, strict=False),
                                        args, **kwargs)
    _drop_noop_squeezes(program.model)
    _split_sequences_to_split(program.model)
    program.save(str(tmp), external_data=n_bytes > EXTERNAL_DATA_BYTES)
    export_seconds = time.time() - start
    try:
        check = parity(tmp, model, adapter, batch=batch + 1)
    except Exception as e:  # ORT refusing to load the graph is a parity failure too
        shutil.rmtree(stage_dir)
        raise ExportParityError(f"ONNX Runtime cannot run the exported graph: {str(e).splitlines()[0]}") from None
    if not check.get("finite", False) or not check["max_abs_error"] <= atol:
        shutil.rmtree(stage_dir)
        raise ExportParityError(
            f"ONNX parity failed for {type(model).__name__}: max abs error {check['max_abs_error']:.3g} "
            f"> {atol:g} at batch {check['batch']} (finite={check.get('finite')})")
    for f in stage_dir.iterdir():  # the graph and, past 2 GB, its external data file
        f.replace(path.parent / f.name)
    stage_dir.rmdir()
    info = {"path": str(path), "inputs": names, "opset": opset, "parity": check, "atol": atol,
            "export_seconds": round(export_seconds, 2), "external_data": n_bytes > EXTERNAL_DATA_BYTES,
            "bytes": path.stat().st_size}
    write_atomic(card_path(path), json.dumps({**(card or {}), "precision": "fp32", "export": info}, indent=2) + "\n")
    return info



def _drop_noop_squeezes(model) -> int:
    """Remove Squeeze nodes whose axes have a static size other than 1.

    `Tensor.squeeze(dim)` is a no-op in PyTorch when that dim is not 1 (PixArt's output
    path relies on it), but the exporter emits an ONNX Squeeze, which ONNX Runtime rejects."""
    removed = 0
    for node in list(model.graph):
        if node.op_type != "Squeeze" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        data, axes = node.inputs[0], node.inputs[1].const_value
        producer = node.inputs[1].producer()
        if axes is None and producer is not None and producer.op_type == "Constant":
            axes = producer.attributes["value"].as_tensor()
        if axes is None or data.shape is None:
            continue
        dims = [data.shape[int(a)] for a in axes.numpy().reshape(-1)]
        if all(isinstance(d, int) and d != 1 for d in dims):
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            out.replace_all_uses_with(data)
            model.graph.remove(node, safe=True)
            removed += 1
    return removed


def _const(value) -> "np.ndarray | None":
    """The constant array behind an ONNX IR value (initializer or Constant node), else None."""
    import onnx_ir as ir

    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _split_sequences_to_split(model) -> int:
    """Rewrite SplitToSequence + SequenceAt(constant) as one Split.

    torch's exporter emits `tensor.split/chunk` as sequence ops; ONNX Runtime runs them, but
    TensorRT's parser and the half-precision converters do not handle sequences."""
    import onnx_ir as ir

    rewritten = 0
    for node in list(model.graph):
        if node.op_type != "SplitToSequence" or len(node.inputs) < 2:
            continue
        data, seq = node.inputs[0], node.outputs[0]
        size, axis = _const(node.inputs[1]), node.attributes.get_int("axis", 0)
        keepdims = node.attributes.get_int("keepdims", 1)
        users = [u for u, _ in seq.uses()]
        if size is None or size.ndim > 1 or keepdims != 1 or seq.is_graph_output():
            continue
        if any(u.op_type != "SequenceAt" or _const(u.inputs[1]) is None for u in users):
            continue
        if size.ndim == 1:  # split_with_sizes: the sizes themselves
            sizes = [int(v) for v in size]
        else:  # split(step): chunks of `step` along a dimension that must be static
            dim = data.shape[axis] if data.shape is not None else None
            if not isinstance(dim, int):
                continue
            step = int(size)
            sizes = [step] * (dim // step) + ([dim % step] if dim % step else [])
        split_sizes = ir.Value(name=f"{node.name}_sizes", const_value=ir.tensor(np.array(sizes, dtype=np.int64)))
        model.graph.register_initializer(split_sizes)
        split = ir.Node("", "Split", [data, split_sizes], [ir.AttrInt64("axis", axis)], num_outputs=len(sizes),
                        name=f"{node.name}_as_split")
        model.graph.insert_before(node, split)
        for u in users:
            k = int(_const(u.inputs[1]))
            out = split.outputs[k % len(sizes)]
            out.shape, out.type = u.outputs[0].shape, u.outputs[0].type
            if u.outputs[0].is_graph_output():
                continue
            u.outputs[0].replace_all_uses_with(out)
            model.graph.remove(u, safe=True)
        if not seq.uses():
            model.graph.remove(node, safe=True)
        rewritten += 1
    return rewritten

