"""Distillation on two processes (gloo, CPU) equals one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_model

WORKER = Path(__file__).with_name("distributed_worker.py")
# 2-process weights differ from 1-process ones by at most this fraction of how far training moved
# them (float32 reduction order; Adam turns rounding noise in near-zero gradients, such as a key
# projection's bias that softmax ignores, into steps of up to lr).
TOLERANCE = 1e-4


def _launch(processes: int, out: Path) -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(29400 + processes), str(WORKER), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out / "weights.safetensors")), json.loads((out / "results.json").read_text())


def test_two_processes_reach_the_one_process_result(tmp_path):
    one, r1 = _launch(1, tmp_path / "one")
    two, r2 = _launch(2, tmp_path / "two")
    assert r2["distill"]["processes"] == 2 and r2["ppcl"]["processes"] == 2
    assert set(one) == set(two)
    initial = {"distill": tiny_model("dit").state_dict(), "ppcl": tiny_model("sd3").state_dict()}
    for name, init in initial.items():
        keys = [k for k in one if k.startswith(name + ".") and k[len(name) + 1:] in init
                and init[k[len(name) + 1:]].shape == one[k].shape]
        differ = sum(((one[k] - two[k]) ** 2).sum() for k in keys) ** 0.5
        moved = sum(((one[k] - init[k[len(name) + 1:]]) ** 2).sum() for k in keys) ** 0.5
        assert moved > 1e-3, f"{name}: training barely moved the weights; the comparison would say nothing"
        assert differ / moved < TOLERANCE, f"{name}: 2 processes differ from 1 by {differ / moved:.1e} of the update"
    for name in ("distill", "ppcl"):  # metrics reduced over the global batch, not one shard's
        h1, h2 = r1[name]["history"], r2[name]["history"]
        assert [h["step"] for h in h1] == [h["step"] for h in h2]
        for a, b in zip(h1, h2):
            assert abs(a["output_mse"] - b["output_mse"]) <= 1e-5 * max(1.0, a["output_mse"])
    # the checkpoint was written once, by the main process, and carries the full history
    state = json.loads((tmp_path / "two" / "distill" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and state["history"] == r2["distill"]["history"]
    assert torch.isfinite(torch.stack([v.float().abs().max() for v in two.values()])).all()
