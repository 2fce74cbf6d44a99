"""Deployment variants of an exported fp32 graph: fp16, bf16, int8 (dynamic or static).

Each variant is written beside the fp32 graph as `NAME.KIND.onnx` with its own card, so
`ditc sample` and the evaluator load it like any artifact. Half precision must stay within
a relative parity bound of the fp32 graph; int8 is judged on sample quality by the caller
(a parity number alone says little about int8), so here it only has to stay finite.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..data.calibration import CalibrationSet
from ..errors import DeploymentUnsupported, ExportParityError
from ..fileio import write_atomic
from .artifact import OnnxAdapter, read_card
from .onnx import card_path, ort_feeds, ort_session, quiet_ort
from .precision import fold, to_bf16, to_fp16
from .quantize import quantize_int8

KINDS = ("fp16", "bf16", "int8-dynamic", "int8-static")


def variant_path(src: Path, kind: str) -> Path:
    return src.with_name(f"{src.stem}.{kind}.onnx")


def relative_error(src: Path, derived: Path, card: dict, batch: int = 3, seed: int = 5,
                   providers: list[str] | None = None) -> dict:
    """Max |derived - fp32| / max |fp32| on fresh inputs, both in ONNX Runtime."""
    feeds = ort_feeds(*OnnxAdapter(card).example_inputs(batch, seed=seed))
    ref = ort_session(src).run(None, feeds)[0]
    got = ort_session(derived, providers=providers).run(None, feeds)[0].astype(np.float32)
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    return {"batch": batch, "max_rel_error": err, "finite": bool(np.isfinite(got).all())}


def derive(src: Path, kind: str, calib: CalibrationSet | None = None, half_rtol: float = 2e-2,
           int8_calibration: str = "minmax", providers: list[str] | None = None) -> dict:
    """Write the `kind` variant of fp32 graph `src`; raise ExportParityError if it is not usable.

    Built in a scratch folder and moved into place only after its check, like the fp32 export."""
    if kind not in KINDS:
        raise ValueError(f"unknown deployment precision {kind!r}; choose from {', '.join(KINDS)}")
    quiet_ort()
    providers = providers or ["CPUExecutionProvider"]
    card = read_card(card_path(src))
    dst = variant_path(src, kind)
    scratch = src.parent / f".{dst.name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    start = time.time()
    try:
        folded = fold(src, scratch / "folded.onnx")
        out = scratch / dst.name
        if kind == "fp16":
            info = to_fp16(folded, out)
        elif kind == "bf16":
            info = to_bf16(folded, out)
        else:
            info = quantize_int8(folded, out, kind.split("-")[1], calib, int8_calibration)
        try:
            check = relative_error(src, out, card, providers=providers)
        except Exception as e:  # e.g. no bf16 kernels on this execution provider
            raise DeploymentUnsupported(f"ONNX Runtime ({', '.join(providers)}) cannot run the {kind} graph: "
                                        f"{str(e).splitlines()[0][:300]}") from None
        if not check["finite"] or (kind in ("fp16", "bf16") and check["max_rel_error"] > half_rtol):
            raise ExportParityError(f"{kind} parity failed: max relative error {check['max_rel_error']:.3g} "
                                    f"> {half_rtol:g} (finite={check['finite']})")
        for f in scratch.iterdir():
            if f.name.startswith(dst.name):  # the graph and, past 2 GB, its external data
                f.replace(src.parent / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info = {"kind": kind, "path": str(dst), "bytes": dst.stat().st_size, "parity": check,
            "half_rtol": half_rtol if kind in ("fp16", "bf16") else None,
            "seconds": round(time.time() - start, 2), **info}
    write_atomic(card_path(dst), json.dumps({**card, "precision": kind, "derived_from": src.name, "export": info},
                                            indent=2) + "\n")
    return info
