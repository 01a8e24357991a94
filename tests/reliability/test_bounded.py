"""Issue 29, class 6: parsing and allocation bounded before they happen.

JSON nesting is bounded before any parser recurses (``checks.loads_json``: ``MAX_JSON_DEPTH``,
overridable), in every reader of untrusted JSON: engine metadata, plan headers, config files,
pairs files, SPair annotations, student and aggregator metadata, extraction manifests. An
aggregator's config is compared with its tensors before anything is allocated; an image's pixel
count before it is decoded (``MAX_IMAGE_PIXELS``, overridable); the refinement window and the LoRA
rank are bounded.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cleandift_rt import checks, match
from cleandift_rt.checkpoint import write_safetensors
from cleandift_rt.features.preprocess import load_image
from cleandift_rt.training import build_config

DEPTHS = [1, 8, 64, 65, 1000, 100_000]
READERS = ["json", "metadata", "plan", "config", "pairs", "spair", "student", "aggregator", "manifest"]


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


def _read(reader: str, doc: str, folder):
    """Feed ``doc`` to one reader; returns what it says (a skip's reason where it skips instead of raising)."""
    if reader == "json":
        return checks.loads_json(doc, "doc")
    if reader == "metadata":
        from cleandift_rt.formats.artifact import META_PREFIX, ArtifactInfo

        return ArtifactInfo.from_props({META_PREFIX + "taps": doc}, "x.onnx")
    if reader == "plan":
        from cleandift_rt.formats.plan import PLAN_MAGIC, _PLAN_LENGTH, read_plan_header

        (folder / "x.plan").write_bytes(PLAN_MAGIC + _PLAN_LENGTH.pack(len(doc)) + doc.encode())
        return read_plan_header(folder / "x.plan")
    if reader in ("config", "pairs"):
        (folder / "x.json").write_text(doc)
        if reader == "config":
            return build_config(config_file=folder / "x.json")
        from cleandift_rt.evaluation.pairs import load_pairs_json

        return load_pairs_json(folder / "x.json")
    if reader == "spair":
        from cleandift_rt.evaluation.spair import load_spair

        ann = folder / "SPair" / "PairAnnotation" / "test"
        ann.mkdir(parents=True, exist_ok=True)
        (ann / "0-a-b:cat.json").write_text(doc)
        try:
            load_spair(folder / "SPair", "test")
        except ValueError as exc:  # no usable pair left: the skip's reason is in the message
            return str(exc)
        return None
    if reader == "student":
        from cleandift_rt.models import load_student

        write_safetensors(folder / "s.safetensors", {"conv_in.weight": torch.zeros(1)}, {"unet_config": doc})
        return load_student(folder / "s.safetensors")
    if reader == "aggregator":
        from cleandift_rt.hyper.aggregator import FORMAT, Aggregator

        write_safetensors(folder / "a.safetensors", {"network.w": torch.zeros(1)},
                          {"format": FORMAT, "config": doc, "source": json.dumps({"name": "cleandift"})})
        return Aggregator.from_file(folder / "a.safetensors")
    from cleandift_rt.extraction import read_manifest

    (folder / "manifest-shards.jsonl").write_text(doc + "\n")
    return read_manifest(folder, "shards")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(reader=st.sampled_from(READERS), depth=st.sampled_from(DEPTHS), kind=st.sampled_from(["list", "object"]))
def test_deep_json_is_refused_by_every_reader_before_the_parser_recurses(tally, tmp_path_factory, reader, depth,
                                                                          kind):
    folder = tmp_path_factory.mktemp("deep")
    t0 = time.perf_counter()
    try:
        said = _read(reader, _nested(depth, kind), folder)
    except (ValueError, TypeError) as exc:  # never RecursionError, never a raw JSONDecodeError
        assert type(exc).__name__ in ("ValueError", "TypeError")
        if depth > checks.LIMITS["MAX_JSON_DEPTH"] and reader != "manifest":
            assert "nests" in str(exc) or "skipped" in str(exc) or "no pair" in str(exc), str(exc)[:200]
        tally.clear_error()
        return
    finally:
        assert time.perf_counter() - t0 < 10
    assert depth <= checks.LIMITS["MAX_JSON_DEPTH"] or reader == "spair" or said is None
    tally.checked_result()


def test_the_depth_limit_is_overridable(monkeypatch):
    doc = _nested(300, "list")
    with pytest.raises(ValueError, match="nests 300 levels deep, over the limit of 64"):
        checks.loads_json(doc, "doc")
    monkeypatch.setenv("CLEANDIFT_MAX_JSON_DEPTH", "500")
    assert checks.loads_json(doc, "doc") is not None
    monkeypatch.setenv("CLEANDIFT_MAX_JSON_DEPTH", "100000")
    with pytest.raises(ValueError, match="deeper than the JSON parser can follow"):
        checks.loads_json(_nested(50_000, "list"), "doc")


def test_json_files_are_bounded_in_size_before_they_are_read(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"steps": 1, "pad": "x" * 5000}))
    monkeypatch.setitem(checks.LIMITS, "MAX_JSON_BYTES", 1000)
    with pytest.raises(ValueError, match=r"big.json is \d+ bytes, over the 1000-byte limit"):
        build_config(config_file=path)


def test_an_aggregator_file_is_checked_against_its_tensors_before_any_allocation(tmp_path, monkeypatch):
    """The 281-byte file of the issue: a config describing gigabytes of weights, a file holding none."""
    from cleandift_rt.hyper import aggregator as module

    built = []
    real = module.AggregationNetwork

    def spy(config):
        built.append(torch.empty(()).device.type)  # "meta" inside the skeleton build
        return real(config)

    monkeypatch.setattr(module, "AggregationNetwork", spy)
    config = {"layers": ["us3", "us6"], "channels": [8192, 8192], "strides": [8, 8], "timesteps": [261.0],
              "projection_dim": 32768}
    path = tmp_path / "bomb.safetensors"
    write_safetensors(path, {"network.w": torch.zeros(1)}, {"format": module.FORMAT, "config": json.dumps(config),
                                                            "source": json.dumps({"name": "cleandift"})})
    assert path.stat().st_size < 1024
    with pytest.raises(ValueError, match="aggregation network in .*bomb.safetensors does not match"):
        module.Aggregator.from_file(path)
    assert built == ["meta"]  # only the memory-free skeleton was built
    config["layers"] = [f"l{i}" for i in range(100)]
    config.update(channels=[8] * 100, strides=[8] * 100)
    write_safetensors(path, {"network.w": torch.zeros(1)}, {"format": module.FORMAT, "config": json.dumps(config),
                                                            "source": json.dumps({"name": "cleandift"})})
    with pytest.raises(ValueError, match="lists 100 layers, more than 64"):
        module.Aggregator.from_file(path)


def _png_header_only(width: int, height: int) -> bytes:
    """A real 1 x 1 PNG whose header claims ``width`` x ``height`` (410 KB of black compress like this)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _bmp_header_only(width: int, height: int) -> bytes:
    """154 bytes: a 24-bit uncompressed BMP header claiming ``width`` x ``height``, then 100 bytes."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 154, 0, 0, 54) + info + bytes(100)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns first, at 89 MP
@pytest.mark.parametrize("name, data", [("black.png", _png_header_only(12000, 12000)),
                                        ("tiny.bmp", _bmp_header_only(10000, 14000))])
def test_an_image_is_refused_by_its_pixel_count_before_it_is_decoded(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"MP\), over the 67 MP limit for one image: .*CLEANDIFT_MAX_IMAGE_PIXELS"):
        load_image(path)
    assert time.perf_counter() - t0 < 2  # nothing was decoded


def test_the_pixel_limit_is_overridable(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (96, 80)).save(path)
    monkeypatch.setenv("CLEANDIFT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ValueError, match="over the 0 MP limit"):
        load_image(path)
    monkeypatch.delenv("CLEANDIFT_MAX_IMAGE_PIXELS")
    assert load_image(path).size == (96, 80)


def test_the_refinement_window_and_the_lora_rank_are_bounded():
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.randn(1, 8, 5, 6, generator=gen), torch.randn(1, 8, 6, 7, generator=gen)
    with pytest.raises(ValueError, match=r"refinement window must be in \[1, 255\], got 100001"):
        match(src, dst, coords="feature", refine=True, window=100001)
    # a window wider than the grid is the grid: the same positions, memory bounded by the grid
    wide, _ = match(src, dst, coords="feature", refine=True, window=255)
    grid, _ = match(src, dst, coords="feature", refine=True, window=13)
    torch.testing.assert_close(wide, grid)
    with pytest.raises(ValueError, match=r"lora_rank must be in \[0, 1024\], got 100000000"):
        build_config(overrides={"lora_rank": 1e8})
