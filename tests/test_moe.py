"""Dense2MoE: exact expert initialisation, sparse execution, balance, the CLI; Mixture of Blocks routing
(every family, save/restore and export: test_stage_matrix.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_RUN, save_tiny
from test_families import _loaded
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.errors import RecipeError, UnsupportedModelError
from dit_compress.stages.moe.convert import balanced_groups, build_moe, dense_ffns, record_ffns, split_neurons
from dit_compress.stages.moe.layer import MoEFeedForward


def _split(family):
    m = _loaded(family)
    calib = build_calibration(m, CalibrationSpec(num_samples=16, sampling_steps=2))
    ffns = dense_ffns(m.model, m.adapter, ("ff", "ff_context"))
    stats = record_ffns(m.model, m.adapter, calib, ffns, batches=1, batch_size=8)
    return m, ffns, stats


def test_experts_partition_the_dense_ffn_exactly():
    """With every expert chosen at gate 1 (zero router), the MoE layer is the dense FFN."""
    m, ffns, stats = _split("dit")
    path, ffn = next(iter(ffns.items()))
    split = split_neurons(stats[path], segments=4, shared_segments=1)
    neurons = split["shared"] + [n for e in split["experts"] for n in e]
    assert sorted(neurons) == list(range(ffn.up.out_features)), "every neuron in exactly one expert"
    scores = stats[path]["score"]
    assert scores[split["shared"]].min() >= scores[[n for e in split["experts"] for n in e]].max()
    moe = build_moe(ffn, split, top_k=len(split["experts"]))
    torch.nn.init.zeros_(moe.router.weight), torch.nn.init.zeros_(moe.router.bias)
    ff = m.model.get_submodule(path)
    x = torch.randn(3, 5, ffn.up.in_features)
    with torch.no_grad():
        assert torch.allclose(moe(x), ff(x), atol=1e-5)


def test_sparse_execution_runs_only_chosen_experts():
    moe = MoEFeedForward(dim=8, shared=4, experts=4, expert_size=4, top_k=1).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(6, 8)
    _, idx, _ = moe.route(x)
    calls = []
    moe.up_weight.register_hook(lambda g: calls.append((g.abs().sum(dim=(1, 2)) > 0).tolist()))
    moe(x).sum().backward()
    used = sorted(set(idx.flatten().tolist()))
    assert [i for i, touched in enumerate(calls[0]) if touched] == used, "unchosen experts must not run"


def test_expert_compute_scales_with_the_busiest_expert():
    """Experts run on slabs as long as the busiest expert's load: 1/E of a dense evaluation when balanced."""
    from torch.utils.flop_counter import FlopCounterMode

    moe = MoEFeedForward(dim=8, shared=4, experts=4, expert_size=16, top_k=1)
    x, gates = torch.randn(64, 8), torch.ones(64, 1)
    dense = 2 * 64 * 4 * (8 * 16 * 2)  # every token through every expert (up + down)
    for idx, share in ((torch.arange(64).remainder(4).unsqueeze(1), 0.25),      # balanced
                       (torch.tensor([0] * 32 + [1, 2, 3] * 10 + [1, 2]).unsqueeze(1), 0.5)):  # expert 0 busy
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            y = moe._experts(x, idx, gates)
        assert counter.get_total_flops() == pytest.approx(dense * share, rel=0.02)
        assert y.shape == (64, 8)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without grouped_mm")
def test_grouped_gemm_experts_equal_the_padded_slabs():
    """The CUDA inference path (grouped GEMMs over expert-sorted rows), run on the CPU, against the
    exported path (padded slabs), with an unbalanced routing that leaves one expert idle."""
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=32, shared=16, experts=4, expert_size=16, top_k=2).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, gates = torch.randn(40, 32), torch.rand(40, 2)
    idx = torch.stack([torch.zeros(40, dtype=torch.long), torch.arange(40).remainder(3)], 1)  # expert 3 idle
    idx[:, 1][idx[:, 1] == 0] = 2
    with torch.no_grad():
        assert torch.allclose(moe._experts_grouped(x, idx, gates), moe._experts(x, idx, gates), atol=1e-5)


@pytest.mark.gpu
def test_moe_on_cuda_bf16_takes_the_grouped_path_and_matches_the_slabs():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("grouped GEMMs are taken on Hopper or newer GPUs")
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=256, shared=128, experts=7, expert_size=128, top_k=2).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    moe = moe.cuda().to(torch.bfloat16)
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    grouped, calls = moe._experts_grouped, []
    moe._experts_grouped = lambda *a: calls.append(1) or grouped(*a)
    with torch.no_grad():
        moe(x)
        _, idx, gates = moe.route(x)
        a, b = grouped(x, idx, gates).float(), moe._experts(x, idx, gates).float()
    assert calls, "CUDA bf16 inference must take the grouped-GEMM path"
    assert (a - b).abs().max() / b.abs().max() < 2e-2


def test_balanced_groups_are_equal_and_cluster():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 5
    feats = torch.cat([c + 0.1 * torch.randn(6, 16, generator=g) for c in centers])
    groups = balanced_groups(feats, 3)
    assert [len(x) for x in groups] == [6, 6, 6]
    assert sorted(tuple(x) for x in groups) == [tuple(range(0, 6)), tuple(range(6, 12)), tuple(range(12, 18))]


def test_sana_conv_ffn_is_refused():
    m = _loaded("sana")
    with pytest.raises(UnsupportedModelError, match="only GELU FeedForward"):
        dense_ffns(m.model, m.adapter, ("ff",))


def test_config_errors_name_the_field():
    from dit_compress.core.stage import parse_stage_config

    with pytest.raises(RecipeError, match="top_k=7 exceeds the 6 routed experts"):
        parse_stage_config("moe", {"segments": 8, "shared_segments": 2, "top_k": 7}, "recipe.yaml stages.0.moe:")
    with pytest.raises(RecipeError, match="unknown key"):
        parse_stage_config("moe", {"experts": 8}, "recipe.yaml stages.0.moe:")


def test_ditc_moe_cli(tmp_path):
    from click.testing import CliRunner

    from dit_compress.cli import main

    save_tiny("dit", tmp_path / "teacher")
    res = CliRunner().invoke(main, ["moe", str(tmp_path / "teacher"), "--segments", "4", "--top-k", "1",
                                    "--steps", "2", "-o", str(tmp_path / "out"), *TINY_RUN])
    assert res.exit_code in (0, 1), res.output
    assert (tmp_path / "out" / "expert-load-stage0.png").is_file()
    assert "## Mixture of experts" in (tmp_path / "out" / "report.md").read_text()


def test_routed_block_skips_unchosen_samples():
    from dit_compress.stages.mob.blocks import MixtureOfBlocks

    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    mob = MixtureOfBlocks(dim=4, routed=[0, 1], group_size=2, active=1)
    mob.wrap_(blocks)
    with torch.no_grad():
        mob.routers[0].proj.bias.copy_(torch.tensor([5.0, -5.0]))  # every sample picks block 0
    h = torch.randn(3, 2, 4)
    seen = []
    for b in blocks:
        b.block.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    out = blocks[1](blocks[0](h))
    assert seen == [3, 1], "the chosen block runs on its samples only; an unchosen one on one discarded row"
    with torch.no_grad():
        assert torch.allclose(out, blocks[0].block(h), atol=1e-6), "block 1 must pass every sample through unchanged"
