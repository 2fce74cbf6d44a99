"""LiT and CLEAR: exact maths against quadratic references, linear cost, each family's attention reproduced
(every family, save/restore and export: test_stage_matrix.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_RUN, save_tiny
from test_families import _loaded
from dit_compress.data.calibration import CalibrationSpec, build_calibration
from dit_compress.stages.attention.lit import LiTProcessor
from dit_compress.stages.attention.local import local_attention


def _attention(dim=32, heads=4):
    torch.manual_seed(0)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=True).eval()


def test_lit_is_relu_linear_attention_plus_local_conv():
    """Against the quadratic form: O_i = sum_j (q_i . k_j) v_j / sum_j q_i . k_j, q = relu(Wq x)."""
    attn, grid = _attention(), (4, 6)
    proc = LiTProcessor(32, heads=2, grid=grid, kernel=5)
    attn.set_processor(proc)
    x = torch.randn(3, 24, 32)
    with torch.no_grad():
        got = attn(x)
        q = torch.relu(attn.to_q(x)).view(3, 24, 2, 16).transpose(1, 2)
        k = torch.relu(attn.to_k(x)).view(3, 24, 2, 16).transpose(1, 2)
        v = attn.to_v(x)
        scores = q @ k.transpose(-1, -2)                               # (b, h, n, n)
        o = (scores / (scores.sum(-1, keepdim=True) + proc.eps)) @ v.view(3, 24, 2, 16).transpose(1, 2)
        local = proc.dwc(v.transpose(1, 2).reshape(3, 32, *grid)).flatten(2).transpose(1, 2)
        want = attn.to_out[0](o.transpose(1, 2).reshape(3, 24, 32) + local)
    assert torch.allclose(got, want, atol=1e-5)
    assert "processor.dwc.weight" in dict(attn.named_parameters()), "LiT weights live in the state dict"


def test_lit_cost_grows_linearly_with_tokens():
    attn = _attention(dim=64)
    flops = {}
    for side in (16, 32):
        attn.set_processor(LiTProcessor(64, heads=2, grid=(side, side)))
        with FlopCounterMode(display=False) as c, torch.no_grad():
            attn(torch.randn(1, side * side, 64))
        flops["lit", side] = c.get_total_flops()
    assert flops["lit", 32] / flops["lit", 16] == pytest.approx(4.0, rel=0.01), "4x tokens -> 4x work"
    n = 32 * 32
    assert flops["lit", 32] < (2 * 2 * n * n * 64) / 5, "below the QK^T and PV products of softmax attention alone"


def test_calibration_batch_carries_the_task_target():
    """The target the hybrid loss regresses is the one the batch was noised with: undoing the
    noising with it gives back a clean latent from the teacher's pool."""
    teacher = _loaded("dit")
    calib = build_calibration(teacher, CalibrationSpec(num_samples=8, sampling_steps=2))
    b = calib.batch(0, 4)
    s = calib.schedule
    if s.is_flow:
        x0 = b.x_t - (b.t / s.num_train_timesteps).view(-1, 1, 1, 1) * b.target
    else:
        a = s.new_scheduler().alphas_cumprod[b.t.long()].view(-1, 1, 1, 1)
        x0 = (b.x_t - (1 - a).sqrt() * b.target) / a.sqrt()
    dist = (x0.flatten(1)[:, None] - calib.x0.flatten(1)[None]).abs().amax(-1).min(1).values
    assert (dist < 1e-3).all(), dist


def _dense_local(q, k, v, grid, radius, text_k=None, text_v=None):
    """Quadratic reference: softmax over keys within `radius` on the grid (plus every text key)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    near = torch.cdist(pos, pos) < radius
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~near, float("-inf"))
    if text_k is None:
        return scores.softmax(-1) @ v
    both = torch.cat([scores, (q @ text_k.transpose(-1, -2)) / q.shape[-1] ** 0.5], -1).softmax(-1)
    return both @ torch.cat([v, text_v], 2)


@pytest.mark.parametrize("grid,radius,tile", [((5, 7), 3, 4), ((8, 8), 2, 8), ((6, 6), 8, 4)])
def test_clear_neighbourhood_equals_masked_softmax(grid, radius, tile):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, grid[0] * grid[1], 8, generator=g) for _ in range(3))
    assert torch.allclose(local_attention(q, k, v, grid, radius, tile), _dense_local(q, k, v, grid, radius), atol=1e-5)
    tk, tv = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    assert torch.allclose(local_attention(q, k, v, grid, radius, tile, tk, tv),
                          _dense_local(q, k, v, grid, radius, tk, tv), atol=1e-5)


@pytest.mark.parametrize("grid,radius", [((5, 7), 3), ((16, 16), 4)])
def test_clear_flex_attention_equals_masked_softmax(grid, radius):
    """The CUDA path (FlexAttention with a block mask), run here unfused on the CPU."""
    from dit_compress.stages.attention.flex import flex_local_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, grid[0] * grid[1], 16, generator=g) for _ in range(3))
    tk, tv = torch.randn(2, 3, 4, 16, generator=g), torch.randn(2, 3, 4, 16, generator=g)
    assert torch.allclose(flex_local_attention(q, k, v, grid, radius, compiled=False),
                          _dense_local(q, k, v, grid, radius), atol=1e-5)
    assert torch.allclose(flex_local_attention(q, k, v, grid, radius, tk, tv, compiled=False),
                          _dense_local(q, k, v, grid, radius, tk, tv), atol=1e-5)


def test_clear_flex_block_mask_density_falls_with_tokens():
    """FlexAttention computes only the blocks its mask keeps: their share must shrink as the grid grows
    (about (2r - 1) / side), so the kernel's work grows linearly, not quadratically."""
    from dit_compress.stages.attention.flex import neighbourhood_mask

    density = {}
    for side in (16, 32, 64):
        mask = neighbourhood_mask((side, side), 8, 0, "cpu")
        density[side] = 1 - mask.sparsity() / 100
    assert density[64] < 0.3 and density[64] < 0.6 * density[32] < 0.6 * density[16], density


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_clear_on_cuda_uses_flex_attention_and_matches_the_cpu_tiles(family):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    grid = (32, 32)
    q, k, v = (torch.randn(2, 4, 1024, 32, generator=g) for _ in range(3))
    text = (torch.randn(2, 4, 7, 32, generator=g), torch.randn(2, 4, 7, 32, generator=g)) if family == "sd3" \
        else (None, None)
    cpu = local_attention(q, k, v, grid, 8, 8, *text)
    gpu = local_attention(*(x.cuda() for x in (q, k, v)), grid, 8, 8, *(t.cuda() if t is not None else None
                                                                         for t in text))
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3), (gpu.cpu() - cpu).abs().max()


def test_clear_cost_grows_linearly_with_tokens():
    flops = {}
    for side in (32, 64):
        q = torch.randn(1, 2, side * side, 16)
        with FlopCounterMode(display=False) as c, torch.no_grad():
            local_attention(q, q, q, (side, side), radius=4, tile=8)
        flops[side] = c.get_total_flops()
    assert flops[64] / flops[32] == pytest.approx(4.0, rel=0.01)


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_clear_covering_the_grid_is_the_teacher(family):
    """With a radius that reaches every token, CLEAR's processors reproduce each family's own
    attention exactly: the projections, norms, rotary embedding and stream order around the
    attention are the family's."""
    from dit_compress.stages.attention.stage import clear_, image_attentions

    teacher = _loaded(family)
    student = copy.deepcopy(teacher.model)
    grid = teacher.adapter.token_grid()
    adapter = teacher.adapter
    clear_(student, list(image_attentions(student, adapter, None, "clear")), adapter, grid, sum(grid), 2)
    x, t, cond = teacher.adapter.example_inputs(2)
    with torch.no_grad():
        assert torch.allclose(teacher.adapter.denoise(student, x, t, cond),
                              teacher.adapter.denoise(teacher.model, x, t, cond), atol=1e-5)


def test_ditc_attention_cli(tmp_path):
    from click.testing import CliRunner

    from dit_compress.cli import main

    save_tiny("dit", tmp_path / "teacher")
    res = CliRunner().invoke(main, ["attention", str(tmp_path / "teacher"), "--method", "clear", "--radius", "2",
                                    "--steps", "2", "-o", str(tmp_path / "out"), *TINY_RUN])
    assert res.exit_code in (0, 1), res.output
    assert "## Local attention (clear)" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "onnx" / "student.onnx").is_file()
