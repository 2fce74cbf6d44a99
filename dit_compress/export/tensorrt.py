"""TensorRT engines from the exported ONNX graph (TensorRT 10 Python API), where a GPU is present.

The engine gets one optimisation profile: batch from `min_batch` to `max_batch` (optimised
for `opt_batch`), and resolution over the spatial sizes the graph leaves symbolic (a graph
exported at a fixed resolution has min = opt = max there). Precision flags are set only where
the GPU supports them; the builder then picks per layer. Without TensorRT or a CUDA device,
`unavailable_reason` says which is missing and nothing is attempted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def unavailable_reason() -> str | None:
    """None if an engine can be built here; otherwise why not, in one line."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'dit_compress[gpu]' on a machine with an NVIDIA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch (TensorRT engines are built and run on an NVIDIA GPU)"
    return None


@dataclass
class EngineSpec:
    min_batch: int = 1
    opt_batch: int = 2
    max_batch: int = 16
    precision: str = "fp16"  # fp32 | fp16 | bf16 | fp8 (fp8 needs Hopper or newer, and Q/DQ in the graph)
    workspace_gb: float = 8.0
    resolutions: list[int] = field(default_factory=list)  # latent sizes for symbolic spatial axes


def _supports(precision: str) -> bool:
    import torch

    major, _ = torch.cuda.get_device_capability()
    return {"fp32": True, "fp16": major >= 6, "bf16": major >= 8, "fp8": major >= 9}[precision]


def build_engine(onnx_path: Path, engine_path: Path, spec: EngineSpec) -> dict:
    """Parse `onnx_path`, build a serialized engine with one profile, write `engine_path`."""
    import tensorrt as trt

    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    if not _supports(spec.precision):
        raise RuntimeError(f"this GPU does not support {spec.precision} in TensorRT")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the graph
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors)[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gb * (1 << 30)))
    if spec.precision != "fp32":
        config.set_flag({"fp16": trt.BuilderFlag.FP16, "bf16": trt.BuilderFlag.BF16,
                         "fp8": trt.BuilderFlag.FP8}[spec.precision])
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = list(inp.shape)
        lo, opt, hi = list(dims), list(dims), list(dims)
        lo[0], opt[0], hi[0] = spec.min_batch, spec.opt_batch, spec.max_batch
        for axis in range(1, len(dims)):
            if dims[axis] == -1:  # a symbolic spatial axis
                if not spec.resolutions:
                    raise RuntimeError(f"input {inp.name} axis {axis} is dynamic: give EngineSpec.resolutions")
                lo[axis], opt[axis], hi[axis] = min(spec.resolutions), spec.resolutions[0], max(spec.resolutions)
        profile.set_shape(inp.name, lo, opt, hi)
        shapes[inp.name] = {"min": lo, "opt": opt, "max": hi}
    config.add_optimization_profile(profile)
    start = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    return {"engine": str(engine_path), "precision": spec.precision, "profile": shapes,
            "build_seconds": round(time.time() - start, 1), "bytes": engine_path.stat().st_size,
            "tensorrt": trt.__version__}


class Engine:
    """A deserialized engine with torch CUDA buffers: call it with numpy feeds like an ORT session."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.stream = torch.cuda.Stream()

    def _dtype(self, name: str):
        return {self.trt.float32: self.torch.float32, self.trt.float16: self.torch.float16,
                self.trt.bfloat16: self.torch.bfloat16, self.trt.int64: self.torch.int64,
                self.trt.int32: self.torch.int32}[self.engine.get_tensor_dtype(name)]

    def bind(self, feeds: dict[str, np.ndarray]) -> dict:
        torch = self.torch
        buffers = {}
        for n in self.inputs:
            buffers[n] = torch.from_numpy(np.ascontiguousarray(feeds[n])).to("cuda", self._dtype(n))
            self.context.set_input_shape(n, tuple(buffers[n].shape))
        for n in self.outputs:
            buffers[n] = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtype(n), device="cuda")
        for n, b in buffers.items():
            self.context.set_tensor_address(n, b.data_ptr())
        self._buffers = buffers  # the engine holds raw addresses: keep the tensors alive
        return buffers

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        buffers = self.bind(feeds)
        self.execute()
        return buffers[self.outputs[0]].float().cpu().numpy()

    def latency_ms(self, feeds: dict[str, np.ndarray], repeats: int = 50) -> dict:
        from ..timing import time_calls

        self.bind(feeds)
        return time_calls(self.execute, repeats, warmup=5)
