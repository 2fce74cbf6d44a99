"""The grouped-GEMM MoE path (CUDA bf16) against the exact reference path, run on the CPU in fp32:
routing, permutation, combination and gradients; ties, crowded and idle experts."""

from __future__ import annotations

import pytest
import torch

from dit_compress.stages.moe.layer import MoEFeedForward, takes_grouped_path

pytestmark = pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without grouped_mm")


def _moe(dim=32, shared=16, experts=5, expert_size=8, top_k=2, seed=0) -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(dim, shared, experts, expert_size, top_k)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


ROUTINGS = {
    # (tokens, experts, top_k) -> chosen expert ids
    "one expert crowded, two idle": lambda n, e, k: torch.stack(
        [torch.zeros(n, dtype=torch.long), 1 + torch.arange(n).remainder(e - 3)], 1)[:, :k],
    "every token on the same pair": lambda n, e, k: torch.tensor([[e - 1, 1]]).expand(n, 2)[:, :k],
    "random": lambda n, e, k: torch.rand(n, e, generator=torch.Generator().manual_seed(3)).topk(k).indices,
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_experts_equal_the_reference_for_a_given_routing(routing, top_k):
    moe = _moe(top_k=top_k)
    x = torch.randn(37, 32)
    idx = ROUTINGS[routing](37, moe.num_experts, top_k).contiguous()
    gates = torch.rand(37, top_k)
    with torch.no_grad():
        grouped, reference = moe._experts_grouped(x, idx, gates), moe._experts(x, idx, gates)
    torch.testing.assert_close(grouped, reference, rtol=1e-5, atol=1e-5)


def test_idle_experts_get_empty_groups_and_their_weights_no_gradient():
    moe = _moe(top_k=1)
    x = torch.randn(12, 32)
    idx = torch.tensor([[1], [3]]).repeat(6, 1)  # experts 0, 2 and 4 receive nothing
    moe._experts_grouped(x, idx, torch.ones(12, 1)).sum().backward()
    touched = moe.up_weight.grad.abs().sum(dim=(1, 2)) > 0
    assert touched.tolist() == [False, True, False, True, False]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_grouped_forward_equals_the_reference(top_k):
    """The whole layer, routing included: the router's logits come out of the GEMM shared with the
    shared expert's up-projection (3 + 16 columns, padded to 24) and must choose the same experts."""
    moe = _moe(shared=16, experts=3 + (top_k == 3), top_k=top_k)
    x = torch.randn(64, 32)
    with torch.no_grad():
        _, idx, _ = moe.route(x)
        torch.testing.assert_close(moe._forward_grouped(x), moe._forward_reference(x), rtol=1e-5, atol=1e-5)
    assert idx.unique().numel() == moe.num_experts, "the test routing should use every expert"


def test_tied_logits_are_broken_the_same_way():
    """A router with zero weights and equal biases ties every expert for every token."""
    moe = _moe(experts=4, top_k=2)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.fill_(0.5)
        x = torch.randn(20, 32)
        torch.testing.assert_close(moe._forward_grouped(x), moe._forward_reference(x), rtol=1e-5, atol=1e-5)
        moe.track = True
        moe._forward_grouped(x)
        grouped = moe.last_counts.clone()
        moe._forward_reference(x)
        assert torch.equal(grouped, moe.last_counts) and grouped.sum() == 40


def test_gradients_equal_the_reference():
    """Training through the grouped path: every parameter's and the input's gradient."""
    ref, grp = _moe(seed=1), _moe(seed=1)
    x = torch.randn(3, 17, 32)
    xr, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(3, 17, 32)
    for moe, xi, forward in ((ref, xr, ref._forward_reference), (grp, xg, grp._forward_grouped)):
        moe.track = True
        out = forward(xi.reshape(-1, 32)).reshape(x.shape)
        (((out - target) ** 2).mean() + 0.1 * moe.balance_loss()).backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(ref.named_parameters(), grp.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_path_choice():
    moe = _moe()
    assert not takes_grouped_path(torch.randn(4, 32), moe.up_weight), "CPU runs (and exports) the reference"
    assert not takes_grouped_path(torch.randn(4, 32, dtype=torch.bfloat16), moe.up_weight.bfloat16())


def test_gpu_benchmark_smoke(tmp_path):
    """benchmarks/moe_gpu.py end to end at tiny sizes on the CPU: its parity rows hold, its table has every row."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "moe_gpu.py"), "--smoke", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((tmp_path / "moe-gpu.json").read_text())
    assert not r["errors"], r["errors"]
    p = r["parity"]
    assert p["experts_grouped_vs_reference"] < 1e-5 and p["layer_grouped_vs_reference"] < 1e-5
    assert p["routing_agreement_fused_vs_router"] == 1.0
    assert max(p["gradients_vs_fp32"]["grouped"].values()) < 1e-5
    assert set(r["layer"]["eager_vs_dense"]) == {"dense", "moe_reference", "moe_grouped", "moe_grouped_unfused",
                                                 "activated_width"}
    assert r["model"]["converted_ffns"] == 3 and r["model"]["finite"]  # 2 image FFNs + 1 context FFN
    table = (tmp_path / "moe-gpu.md").read_text()
    assert "| MoE, grouped path, eager elementwise (default) |" in table and "whole model, MoE / dense, eager:" in table
