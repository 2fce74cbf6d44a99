"""The codec's container and entropy coder: exact round trips and clear failures."""

from __future__ import annotations

import math

import pytest
import torch

from dit_compress.codec import entropy
from dit_compress.codec.bitstream import Bitstream, BitstreamError


def test_range_coding_round_trips_exactly_and_costs_about_the_model_bits():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 8, 8, generator=g) * 3
    scales = torch.rand(4, 8, 8, generator=g) * 4 + 0.2
    symbols = torch.round(means + scales * torch.randn(4, 8, 8, generator=g)).clamp(-40, 40).long()
    data = entropy.encode(symbols, means, scales, bound=40)
    assert torch.equal(entropy.decode(data, means, scales, bound=40), symbols)
    m, s = entropy.snap_parameters(means, scales)
    model_bits = entropy.gaussian_bits(symbols.double(), torch.from_numpy(m).view(means.shape),
                                       torch.from_numpy(s).view(means.shape)).item()
    assert model_bits <= 8 * len(data) <= model_bits * 1.02 + 64, "a real stream costs what the model says"


def test_parameter_snapping_absorbs_float_noise():
    g = torch.Generator().manual_seed(1)
    means, scales = torch.randn(1000, generator=g), torch.rand(1000, generator=g) * 10 + 0.2
    a = entropy.snap_parameters(means, scales)
    b = entropy.snap_parameters(means + 1e-7, scales * (1 + 1e-7))
    agree = (a[0] == b[0]).mean() * (a[1] == b[1]).mean()
    assert agree > 0.99  # only values sitting exactly on a grid boundary may move


def test_container_round_trip_and_every_kind_of_damage_is_named():
    stream = Bitstream({"shape": [1, 64, 64], "model": "m", "lambda": 0.01}, (b"abcd" * 3, b"\x00\x01\x02\x03"))
    raw = stream.to_bytes()
    assert Bitstream.from_bytes(raw) == stream
    with pytest.raises(BitstreamError, match="bad magic"):
        Bitstream.from_bytes(b"JPEG" + raw[4:])
    with pytest.raises(BitstreamError, match="truncated"):
        Bitstream.from_bytes(raw[:-9])
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    with pytest.raises(BitstreamError, match="checksum|truncated|unexpected"):
        Bitstream.from_bytes(bytes(flipped))
    with pytest.raises(BitstreamError, match="version 9"):
        Bitstream.from_bytes(raw[:4] + b"\x09" + raw[5:])


@pytest.fixture(scope="module")
def small_codec():
    from dit_compress.codec.model import DiTCodec
    from dit_compress.models.load import load_transformer

    torch.manual_seed(0)
    return DiTCodec(load_transformer("zoo:digits-dit").model, channels=8, hyper_channels=4, width=16).eval()


def _photo(h=70, w=90):
    from skimage.data import camera

    return torch.from_numpy(camera()[:h, :w].astype("float32") / 127.5 - 1).unsqueeze(0)


def test_encode_then_decode_reproduces_the_quantised_latents_exactly(small_codec):
    from dit_compress.codec.files import compress, decompress

    image = _photo()
    data, q = compress(small_codec, image, "test", 0.01)
    x_hat, read = decompress(small_codec, data)
    assert torch.equal(read["z"], q["z"]) and torch.equal(read["y"], q["y"])
    assert x_hat.shape == image.shape and torch.isfinite(x_hat).all()
    again, _ = decompress(small_codec, data)
    assert torch.equal(again, x_hat), "decoding is deterministic"


def test_damaged_or_foreign_files_are_refused(small_codec):
    import copy

    from dit_compress.codec.files import compress, decompress

    data, _ = compress(small_codec, _photo(64, 64), "test", 0.01)
    with pytest.raises(BitstreamError, match="truncated"):
        decompress(small_codec, data[: len(data) // 2])
    bad = bytearray(data)
    bad[-8] ^= 0xFF
    with pytest.raises(BitstreamError, match="checksum"):
        decompress(small_codec, bytes(bad))
    other = copy.deepcopy(small_codec)
    with torch.no_grad():
        other.z_mean.add_(0.1)
    with pytest.raises(BitstreamError, match="not by this one"):
        decompress(other, data)


def test_cli_encodes_and_decodes_files_and_the_decoder_exports_with_parity(small_codec, tmp_path):
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from dit_compress.cli import main
    from dit_compress.codec.export import export_decoder
    from dit_compress.codec.store import save_codec

    folder = save_codec(small_codec, tmp_path / "codec", "zoo:digits-dit", 0.01)
    image = ((_photo(64, 96)[0].numpy() + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(image, mode="L").save(tmp_path / "in.png")
    run = CliRunner()
    res = run.invoke(main, ["codec", "encode", str(folder), str(tmp_path / "in.png"), "-o", str(tmp_path / "x.ditc")])
    assert res.exit_code == 0, res.output
    res = run.invoke(main, ["codec", "decode", str(folder), str(tmp_path / "x.ditc"), "-o", str(tmp_path / "out.png")])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "out.png").size == (96, 64)
    (tmp_path / "bad.ditc").write_bytes((tmp_path / "x.ditc").read_bytes()[:-3])
    res = run.invoke(main, ["codec", "decode", str(folder), str(tmp_path / "bad.ditc"), "-o", str(tmp_path / "b.png")])
    assert res.exit_code == 2 and "bad.ditc" in res.output and not (tmp_path / "b.png").exists()
    info = export_decoder(small_codec, tmp_path / "decoder.onnx", _photo(64, 64))
    assert info["max_abs_error"] <= 1e-4
    for bad in (["--lambda", "0"], ["--lambda", "0.01", "--transform-steps", "0"]):
        res = run.invoke(main, ["codec", "train", *bad, "-o", str(tmp_path / "never")])
        assert res.exit_code == 2 and bad[-2] in res.output and not (tmp_path / "never").exists()


def test_bd_rate_reads_equal_and_halved_bitrates():
    from dit_compress.codec.evaluate import bd_rate

    anchor = [{"bpp": b, "psnr": 20 + 6 * math.log2(b / 0.1)} for b in (0.1, 0.2, 0.4, 0.8)]
    half = [{"bpp": p["bpp"] / 2, "psnr": p["psnr"]} for p in anchor]
    assert abs(bd_rate(anchor, anchor)) < 1e-6
    assert abs(bd_rate(anchor, half) + 50) < 1e-3
    assert bd_rate(anchor, [{"bpp": 5, "psnr": 90}, {"bpp": 6, "psnr": 91}, {"bpp": 7, "psnr": 92}]) is None


def test_gdn_matches_its_formula_and_the_inverse_multiplies():
    from dit_compress.codec.gdn import GDN

    torch.manual_seed(0)
    gdn, igdn = GDN(3), GDN(3, inverse=True)
    with torch.no_grad():
        for m in (gdn, igdn):
            m.gamma.copy_(torch.rand(3, 3))
            m.beta.copy_(torch.randn(3))
    x = torch.randn(2, 3, 4, 5) * 10
    norm = torch.einsum("ij,bjhw->bihw", gdn.gamma ** 2, x * x) + (torch.nn.functional.softplus(gdn.beta)
                                                                   + 1e-3).view(1, 3, 1, 1)
    assert torch.allclose(gdn(x), x / norm.sqrt(), rtol=1e-5)
    norm_i = torch.einsum("ij,bjhw->bihw", igdn.gamma ** 2, x * x) + (torch.nn.functional.softplus(igdn.beta)
                                                                      + 1e-3).view(1, 3, 1, 1)
    assert torch.allclose(igdn(x), x * norm_i.sqrt(), rtol=1e-5)


def test_training_phase_one_leaves_the_dit_alone_and_phase_two_only_the_decoder_side_learns():
    from dit_compress.codec.train import CodecTrainConfig, train_codec
    from dit_compress.models.load import load_transformer

    dit = load_transformer("zoo:digits-dit").model
    teacher = dit.state_dict()
    codec, info = train_codec(dit, CodecTrainConfig(lam=0.2, transform_steps=60, decoder_steps=0, batch_size=4),
                              progress=False)
    assert all(torch.equal(v, teacher[k]) for k, v in codec.dit.state_dict().items() if k in teacher)
    first, last = info["history"][0], info["history"][-1]
    assert first["phase"] == last["phase"] == "transforms"
    assert last["bpp"] < 0.5 * first["bpp"]

    def train(decoder_steps):
        return train_codec(dit, CodecTrainConfig(lam=0.2, transform_steps=3, decoder_steps=decoder_steps,
                                                 batch_size=2), progress=False)

    (before, _), (after, info) = train(0), train(3)
    assert info["history"][-1]["phase"] == "decoder"
    for part in ("g_a", "h_a", "h_s"):  # the encoder side, fixed by phase 1
        a, b = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert not torch.equal(before.g_s[0][0].weight, after.g_s[0][0].weight)
    assert any(not torch.equal(v, teacher[k]) for k, v in after.dit.state_dict().items() if k in teacher)


def test_point_against_jpeg_interpolates_in_log_rate_and_refuses_to_extrapolate():
    from dit_compress.codec.evaluate import against_anchor

    jpeg = [{"bpp": 0.1, "psnr": 24.0}, {"bpp": 0.4, "psnr": 30.0}]
    mid = against_anchor(jpeg, {"bpp": 0.2, "psnr": 26.0})  # 0.2 is halfway in log-rate
    assert abs(mid["psnr_at_same_bpp"] - 27.0) < 1e-9
    assert abs(mid["bpp_at_same_psnr"] - 0.1 * 4 ** (1 / 3)) < 1e-9
    low = against_anchor(jpeg, {"bpp": 0.05, "psnr": 23.0})
    assert low == {"psnr_at_same_bpp": None, "bpp_at_same_psnr": None}
