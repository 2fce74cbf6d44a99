"""Property-based tests of every file format the tool reads (issue 26 item 7): random mutations of a
valid file the project writes (truncation, bit flips, type swaps, key deletions, huge numbers, deep
nesting) give either success or the boundary's own error (exit code 2 through the CLI), never
another exception; reading allocates at most a small multiple of the file's size (tracemalloc);
and nothing is left behind in the folder.

Derandomized, so CI runs the same cases every time. Cases per format (CASES below): recipe 150,
report 150, gate file 150, adapter config 150, codec file 200 (+ 25 decoded end to end),
deployment card 150, resume state 100, manifest 100 (each also loaded as a whole checkpoint):
1175 in all.
"""

from __future__ import annotations

import copy
import json
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LATENT, tiny_loaded
from dit_compress.errors import CheckpointError, RecipeError
from dit_compress.fileio import nesting_depth

ROOT = Path(__file__).resolve().parent.parent
CASES = {"recipe": 150, "report": 150, "gate": 150, "adapter": 150, "codec": 200, "codec_decode": 25,
         "card": 150, "resume": 100, "manifest": 100}
ALLOC_FACTOR, ALLOC_SLACK = 64, 4 * 2 ** 20  # peak traced bytes <= 64 x the file + 4 MiB


def _profile(n: int):
    return settings(derandomize=True, max_examples=n, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# -- mutations ----------------------------------------------------------------------------------

def _paths(value, prefix=()):
    """Every location in a JSON-like value (the root included)."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def _deep(n: int):
    v: list = []
    for _ in range(n):
        v = [v]
    return v


REPLACEMENTS = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from([10 ** 30, -1, 0, 2 ** 63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.just([]), st.just({}),
    st.just(_deep(200)), st.just([1] * 50), st.just({"x": {"y": [1, "a"]}}), st.just("1e-4"))


@st.composite
def mutated(draw, valid, dump):
    """Bytes of `valid` (a JSON-like value) after one structural mutation, written by `dump`, or
    the valid bytes truncated or with bits flipped."""
    kind = draw(st.sampled_from(["truncate", "flip", "delete", "swap", "swap", "deep", "wrap"]))
    data = dump(valid)
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out) * 8 - 1))
            out[i // 8] ^= 1 << (i % 8)
        return bytes(out)
    value = copy.deepcopy(valid)
    path = draw(st.sampled_from(list(_paths(value))))
    if kind == "wrap":  # deeper than any parser should recurse (JSON text is YAML too)
        n = draw(st.integers(65, 3000))
        return b"[" * n + _json(value) + b"]" * n
    if not path:
        return dump(draw(REPLACEMENTS))
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "deep":
        parent[path[-1]] = _deep(draw(st.integers(60, 400)))
    else:
        parent[path[-1]] = draw(REPLACEMENTS)
    return dump(value)


def _json(v) -> bytes:
    return json.dumps(v).encode()


def _yaml(v) -> bytes:
    # PyYAML's emitter recurses: a deeply nested value is written as JSON (which is YAML too)
    return yaml.safe_dump(v).encode() if nesting_depth(v) < 50 else _json(v)


def _bounded_read(read, data: bytes, name: str, error: type[BaseException] | tuple):
    """Write `data`, read it with `read(path)`; the boundary's error or success, bounded
    allocation, and no other file left in the folder. Returns the result (None on error)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        tracemalloc.start()
        try:
            result = read(path)
        except error:
            result = None
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= ALLOC_FACTOR * len(data) + ALLOC_SLACK, (peak, len(data))
        assert [p.name for p in Path(tmp).iterdir()] == [name]
    return result


# -- recipe ---------------------------------------------------------------------------------------

RECIPE = yaml.safe_load((ROOT / "recipes" / "digits-dit-depth50.yaml").read_text())


def test_recipe_mutations():
    from dit_compress.core.recipe import load_recipe

    load_recipe(ROOT / "recipes" / "digits-dit-depth50.yaml")  # the stage modules imported outside the count

    @_profile(CASES["recipe"])
    @given(mutated(RECIPE, _yaml))
    def run(data):
        _bounded_read(load_recipe, data, "recipe.yaml", RecipeError)

    run()


# -- report and gate file, through `ditc check` ----------------------------------------------------

def _report() -> dict:
    from dit_compress.core.recipe import parse_recipe
    from dit_compress.evaluate.gate import REPORT_VERSION

    recipe = parse_recipe(copy.deepcopy(RECIPE))
    return {"report_version": REPORT_VERSION, "version": "0", "recipe": recipe.to_dict(), "recipe_hash": recipe.hash,
            "quality": {"fd_ratio": 1.2, "guided_accuracy_student": 0.95, "psnr_db": 20.0},
            "cost": {"param_ratio": 0.5, "macs_ratio": 0.5}, "export": {"parity": {"max_abs_error": 1e-5}},
            "deployment": {"int8-dynamic": {"quality": {"fd_ratio": 1.3}},
                           "fp16": {"export": {"parity": {"max_rel_error": 1e-3}}}},
            "stages": [{"name": "prune", "summary": {"removed": [1, 3]}}], "gate": None}


REPORT = _report()
GATE = yaml.safe_load((ROOT / "recipes" / "release-gate.yaml").read_text())


def _check(*args) -> int:
    from dit_compress.cli import main

    res = CliRunner().invoke(main, ["check", *map(str, args)])
    assert res.exit_code in (0, 1, 2), res.output  # 3 would be a traceback turned internal error
    if res.exit_code == 2:
        errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
        assert errors and all(str(args[-1]) in e or "report" in e for e in errors), res.output
    return res.exit_code


def test_valid_report_and_gate_pass_the_check(tmp_path):
    (tmp_path / "report.json").write_bytes(_json(REPORT))
    (tmp_path / "gate.yaml").write_bytes(_yaml(GATE))
    assert _check(tmp_path / "report.json") == 0
    assert _check(tmp_path / "report.json", "--gate", tmp_path / "gate.yaml") in (0, 1)


@_profile(CASES["report"])
@given(mutated(REPORT, _json))
def test_report_mutations(data):
    _bounded_read(lambda p: _check(p), data, "report.json", ())


@_profile(CASES["gate"])
@given(mutated(GATE, _yaml))
def test_gate_file_mutations(data):
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        report.write_bytes(_json(REPORT))
        _bounded_read(lambda p: _check(report, "--gate", p), data, "gate.yaml", ())


# -- adapter folder ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_config():
    from dit_compress import adapters

    model = copy.deepcopy(tiny_loaded("dit").model)
    adapters.attach(model, "td_lora", {"r": 2, "target_modules": ["to_q"]}, "x")
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads((adapters.save_adapter(model, Path(tmp) / "x", "x") / "adapter_config.json").read_text())


def test_adapter_config_mutations(adapter_config):
    from dit_compress.adapters.store import read_config

    @_profile(CASES["adapter"])
    @given(mutated(adapter_config, _json))
    def run(data):
        _bounded_read(lambda p: read_config(p.parent), data, "adapter_config.json", CheckpointError)

    run()


# -- codec file -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def codec_file():
    from dit_compress.codec.files import compress
    from dit_compress.codec.model import DiTCodec
    from dit_compress.models.load import load_transformer

    torch.manual_seed(0)
    codec = DiTCodec(load_transformer("zoo:digits-dit").model, channels=8, hyper_channels=4, width=16).eval()
    image = torch.rand(1, 40, 56) * 2 - 1
    return codec, compress(codec, image, "test", 0.01)[0]


def _rewrap(header: bytes, streams: tuple[bytes, ...]) -> bytes:
    """A container with a valid checksum around `header`, so that the header itself is what is tested."""
    from dit_compress.codec.bitstream import MAGIC, VERSION

    parts = [MAGIC, struct.pack("<BI", VERSION, len(header)), header, struct.pack("<B", len(streams))]
    for s in streams:
        parts += [struct.pack("<I", len(s)), s]
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def test_codec_file_mutations(codec_file):
    from dit_compress.codec.bitstream import Bitstream, BitstreamError
    from dit_compress.codec.files import PIXELS_PER_PAYLOAD_BYTE, read_header

    codec, data = codec_file
    stream = Bitstream.from_bytes(data)

    def read(path):
        raw = path.read_bytes()
        header = read_header(Bitstream.from_bytes(raw, str(path)), codec, str(path))
        # every tensor decoding allocates follows from the padded image: bounded by the file's length
        assert header.padded[1] * header.padded[2] <= PIXELS_PER_PAYLOAD_BYTE * len(raw)
        return header

    @_profile(CASES["codec"])
    @given(st.one_of(mutated(stream.header, lambda h: _rewrap(_json(h), stream.streams)),
                     mutated({"file": 0}, lambda _: data)))
    def run(mutant):
        _bounded_read(read, mutant, "image.ditc", BitstreamError)

    run()


def test_codec_decode_of_mutated_headers_gives_only_its_error(codec_file):
    from dit_compress.codec.bitstream import Bitstream, BitstreamError
    from dit_compress.codec.files import decompress

    codec, data = codec_file
    stream = Bitstream.from_bytes(data)

    @_profile(CASES["codec_decode"])
    @given(mutated(stream.header, lambda h: _rewrap(_json(h), stream.streams)))
    def run(mutant):
        try:
            decompress(codec, mutant)
        except BitstreamError:
            pass

    run()


def test_a_crafted_huge_codec_header_is_refused_before_allocating(codec_file, tmp_path):
    from dit_compress.cli import main
    from dit_compress.codec.bitstream import Bitstream

    codec, data = codec_file
    stream = Bitstream.from_bytes(data)
    cases = {"huge": {**stream.header, "image": [1, 10 ** 6, 10 ** 6]},
             "list": [1, 2], "no image": {k: v for k, v in stream.header.items() if k != "image"},
             "string shape": {**stream.header, "y": "8x3x4"}}
    codec_dir = tmp_path / "codec"
    from dit_compress.codec.store import save_codec

    save_codec(codec, codec_dir, "zoo:digits-dit", 0.01)
    for name, header in cases.items():
        f = tmp_path / f"{name}.ditc"
        f.write_bytes(_rewrap(_json(header), stream.streams))
        res = CliRunner().invoke(main, ["codec", "decode", str(codec_dir), str(f), "-o", str(tmp_path / "o.png")])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and lines and all(x.startswith(f"error: {f}: header") for x in lines), res.output
        assert not (tmp_path / "o.png").exists()


# -- deployment card ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def card():
    from dit_compress.export.artifact import deployment_card

    return json.loads(json.dumps({**deployment_card(tiny_loaded("dit"), 4, 2.0), "precision": "fp32"}))


def test_deployment_card_mutations(card):
    from dit_compress.export.artifact import OnnxAdapter, read_card

    def read(path):
        adapter = OnnxAdapter(read_card(path))
        assert 0 < len(path.read_bytes()) and adapter.latent_shape()[1] <= 4096
        return adapter

    @_profile(CASES["card"])
    @given(mutated(card, _json))
    def run(data):
        _bounded_read(read, data, "student.json", CheckpointError)

    run()


def test_sample_refuses_random_bytes_onnx_and_wrong_npz(card, tmp_path):
    import numpy as np

    from dit_compress.cli import main

    onnx = tmp_path / "g.onnx"
    onnx.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "g.json").write_text(json.dumps(card))

    def sample(*extra):
        res = CliRunner().invoke(main, ["sample", str(onnx), "-o", str(tmp_path / "s.png"), *map(str, extra)])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
        assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.npy").exists()
        return lines[0]

    assert "not an ONNX graph" in sample()
    from dit_compress.evaluate.sample import read_conditions

    specs = card["conditions"]
    for arrays, message in [({"class_labels": np.zeros(3, np.float32)}, "expected int64 of shape"),
                            ({"class_labels": np.zeros((3, 2), np.int64)}, "expected int64 of shape"),
                            ({"other": np.zeros(3, np.int64)}, "missing condition array")]:
        np.savez(tmp_path / "c.npz", **arrays)
        with pytest.raises(CheckpointError, match=message):
            read_conditions(tmp_path / "c.npz", specs)
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="not an .npz"):
        read_conditions(tmp_path / "c.npz", specs)
    np.savez(tmp_path / "c.npz", class_labels=np.arange(3))
    assert read_conditions(tmp_path / "c.npz", specs)["class_labels"].tolist() == [0, 1, 2]


# -- resume state -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resume():
    """A distiller's checkpoint as an interrupted run leaves it, and how to load it back."""
    from dit_compress.train.distill import DistillConfig, Distiller

    work = Path(tempfile.mkdtemp())
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    d = Distiller.__new__(Distiller)  # only the checkpoint methods: no teacher, no data
    d.ckpt, d.fingerprint, d.config = work / "checkpoint", "f00d", DistillConfig(steps=20)
    d._save(10, model, opt, [{"step": 0, "output_mse": 0.5}])
    state = json.loads((d.ckpt / "state.json").read_text())

    def load(path: Path):
        (d.ckpt / "state.json").write_bytes(path.read_bytes())
        m = torch.nn.Linear(4, 3)
        return d._load(m, torch.optim.AdamW(m.parameters(), lr=1e-3))

    return state, load


def test_resume_state_mutations(resume):
    state, load = resume

    @_profile(CASES["resume"])
    @given(mutated(state, _json))
    def run(data):
        result = _bounded_read(load, data, "state.json", CheckpointError)
        if result is not None:
            assert 0 <= result[0] <= 20

    run()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "state.json").write_text("{truncated")
        with pytest.raises(CheckpointError, match="delete .*checkpoint to restart this training from step 0"):
            load(Path(tmp) / "state.json")
        (Path(tmp) / "state.json").write_text(json.dumps({**state, "step": "10"}))
        with pytest.raises(CheckpointError, match=r"step: Input should be a valid integer.*restart"):
            load(Path(tmp) / "state.json")


# -- manifest (compressed checkpoints) -------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint():
    """A depth-pruned tiny DiT saved as a compressed checkpoint, and its manifest."""
    from dit_compress.core.manifest import StageRecord, base_reference, save_compressed
    from dit_compress.stages.prune.depth import remove_blocks_

    teacher = tiny_loaded("dit")
    model = copy.deepcopy(teacher.model)
    remove_blocks_(model, teacher.adapter, [1])
    folder = save_compressed(Path(tempfile.mkdtemp()) / "ckpt", model, base_reference(teacher, {"latent_size": LATENT}),
                             [StageRecord("prune", {"method": "depth", "remove": [1]},
                                          {"removed": [1], "student_blocks": [], "teacher_targets": []})])
    return folder, json.loads((folder / "manifest.json").read_text())


def test_manifest_mutations(checkpoint):
    from dit_compress.core.manifest import load_compressed, read_manifest_file

    folder, manifest = checkpoint

    @_profile(CASES["manifest"])
    @given(mutated(manifest, _json))
    def run(data):
        # reading and validating: bounded, one error type
        _bounded_read(read_manifest_file, data, "manifest.json", CheckpointError)
        # the whole load of a checkpoint with that manifest: success or the same error, nothing else
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "ckpt"
            ckpt.mkdir()
            (ckpt / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
            (ckpt / "manifest.json").write_bytes(data)
            try:
                loaded = load_compressed(ckpt)
            except CheckpointError:
                return
            x = loaded.adapter.example_inputs(1, seed=0)
            with torch.no_grad():
                assert torch.isfinite(loaded.adapter.denoise(loaded.model, *x)).all()

    run()
