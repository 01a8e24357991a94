"""The one per-image feature store: atomic writes, memory-mapped reads, cut-short files computed
again, and the fp16 policy at its boundary (float16 when every value fits within 65504, else float32)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cleandift_rt.features import FP16_MAX, FeatureSource, FeatureStore, image_key, round_trip


class Counting:
    """compute() for the store that counts its calls."""

    def __init__(self, arrays):
        self.arrays, self.calls = arrays, 0

    def __call__(self):
        self.calls += 1
        return self.arrays


def memory_mapped(array: np.ndarray) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def maps(seed=0):
    rng = np.random.default_rng(seed)
    return {"us6": rng.standard_normal((4, 3, 5)).astype(np.float32),
            "us3": rng.standard_normal((2, 6)).astype(np.float32)}


def test_an_entry_is_computed_once_then_read_memory_mapped(tmp_path):
    compute = Counting(maps())
    first = FeatureStore(tmp_path).get("source", "image", compute)
    again = FeatureStore(tmp_path).get("source", "image", compute)
    assert compute.calls == 1 and again.keys() == first.keys() == {"us6", "us3"}
    for name, value in maps().items():
        np.testing.assert_array_equal(again[name], value.astype(np.float16))
        assert memory_mapped(again[name]) and again[name].dtype == np.float16
    again["us6"][:] = 7  # copy-on-write: the caller may write, the file never changes
    assert not (FeatureStore(tmp_path).get("source", "image", compute)["us6"] == 7).any()

    from safetensors.numpy import load_file  # a plain safetensors file, readable by any tool
    np.testing.assert_array_equal(load_file(str(tmp_path / "source" / "image.safetensors"))["us3"], first["us3"])


def test_single_arrays_are_npy_files_read_memory_mapped(tmp_path):
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    store = FeatureStore(tmp_path, "float32")
    store.get_array("src/map", "img", lambda: value, label="cleandift")
    got = FeatureStore(tmp_path, "float32").get_array("src/map", "img", lambda: pytest.fail("recomputed"))
    np.testing.assert_array_equal(np.load(tmp_path / "src" / "map" / "img.npy"), value)
    assert memory_mapped(got) and got.dtype == np.float32 and store.computed == {"cleandift": 1}


@pytest.mark.parametrize("cut", [0, 5, 40, -7])
def test_a_file_cut_short_is_computed_again(tmp_path, cut):
    compute = Counting(maps())
    FeatureStore(tmp_path).get("source", "image", compute)
    path = FeatureStore(tmp_path).path("source", "image")
    path.write_bytes(path.read_bytes()[:cut])  # a kill during a copy, a full disk
    store = FeatureStore(tmp_path)
    assert not store.has("source", "image")
    got = store.get("source", "image", compute)
    assert compute.calls == 2 and store.computed == {"source": 1}
    np.testing.assert_array_equal(got["us6"], maps()["us6"].astype(np.float16))

    arrays = Counting(np.ones((2, 3), np.float32))
    FeatureStore(tmp_path).get_array("source", "one", arrays)
    npy = FeatureStore(tmp_path).array_path("source", "one")
    npy.write_bytes(npy.read_bytes()[:cut])
    assert FeatureStore(tmp_path).get_array("source", "one", arrays).shape == (2, 3) and arrays.calls == 2


def test_writes_are_atomic(tmp_path, monkeypatch):
    import safetensors.numpy

    def dies_half_way(arrays, filename, metadata=None):
        assert os.path.dirname(filename) == str(tmp_path / "source")  # beside the target: os.replace is atomic
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"us6\":")
        raise KeyboardInterrupt  # the run stopped in the middle of the write

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore(tmp_path).get("source", "image", lambda: maps())
    assert os.listdir(tmp_path / "source") == []  # neither the entry nor its half-written temporary
    monkeypatch.undo()
    compute = Counting(maps(1))
    FeatureStore(tmp_path).get("source", "image", compute)
    assert compute.calls == 1 and [p.name for p in (tmp_path / "source").iterdir()] == ["image.safetensors"]


def test_the_fp16_policy_at_its_boundary(tmp_path):
    assert FP16_MAX == float(np.finfo(np.float16).max)
    fits = {"a": np.array([1.5, FP16_MAX, -FP16_MAX], np.float32), "b": np.zeros(2, np.float32)}
    over = {"a": np.array([1.5, 70000.0], np.float32), "b": np.zeros(2, np.float32)}
    store = FeatureStore(tmp_path)
    small = store.get("s", "fits", lambda: fits)
    large = store.get("s", "over", lambda: over)
    assert all(v.dtype == np.float16 for v in small.values())  # every value within 65504: half the disk
    np.testing.assert_array_equal(small["a"], fits["a"])
    assert all(v.dtype == np.float32 for v in large.values())  # one value beyond: that entry in float32
    assert large["a"][1] == 70000.0  # exact, neither inf nor clamped
    just_over = store.get_array("s", "just", lambda: np.array([FP16_MAX + 1], np.float32))
    assert just_over.dtype == np.float32 and just_over[0] == FP16_MAX + 1
    assert round_trip({"x": np.array([np.nan])})["x"].dtype == np.float32
    # float32 and None keep values; None keeps the computed dtype too (label maps)
    assert store.get_array("s", "labels", lambda: np.array([3, 255], np.uint8)).dtype == np.float16
    assert FeatureStore(tmp_path, None).get_array("t", "labels", lambda: np.array([3, 255], np.uint8)).dtype == np.uint8
    widened = FeatureStore(tmp_path, "float32").get("u", "x", lambda: {"h": torch.ones(2, dtype=torch.float16)})
    assert widened["h"].dtype == np.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        FeatureStore(tmp_path, "bfloat16")


def test_without_a_root_nothing_is_stored_and_the_rounding_is_the_same(tmp_path):
    value = {"x": np.array([0.1, 1 / 3, 1000.123], np.float32)}
    on_disk = FeatureStore(tmp_path).get("s", "e", lambda: value)
    in_memory = FeatureStore(None).get("s", "e", lambda: value)
    np.testing.assert_array_equal(on_disk["x"], in_memory["x"])
    assert in_memory["x"].dtype == np.float16 and not np.array_equal(in_memory["x"], value["x"])
    with pytest.raises(ValueError, match="keeps nothing on disk"):
        FeatureStore(None).path("s", "e")


def test_recent_entries_stay_in_memory(tmp_path):
    compute = Counting(maps())
    store = FeatureStore(None, None, memory_items=2)
    for entry in ("a", "b", "a", "c", "b"):  # "b" was pushed out by "c"
        store.get("s", entry, compute)
    assert compute.calls == 4 and store.computed == {"s": 4} and store.reused == {"s": 1}


def test_image_keys_follow_the_file_the_category_and_the_variant(tmp_path):
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"one")
    key = image_key(image, "cat")
    assert image_key(image, "dog") != key and image_key(image, "cat", "-flip") == key + "-flip"
    os.utime(image, ns=(1, 1))  # a replaced file: another modification time
    assert image_key(image, "cat") != key


def test_the_library_sources_follow_the_protocol():
    from cleandift_rt.evaluation import DiftFeatures, EngineFeatures
    from cleandift_rt.fusion.evaluate import RawMaps
    from cleandift_rt.gate.source import GateFeatures, RecipeFeatures
    from cleandift_rt.hyper import EngineTaps, HyperFeatures, InversionTaps
    from cleandift_rt.probes import DiftSource, EngineSource, ProjectedSource

    for cls in (EngineFeatures, DiftFeatures, GateFeatures, RecipeFeatures, EngineTaps, InversionTaps, HyperFeatures,
                EngineSource, DiftSource, ProjectedSource, RawMaps):
        assert callable(getattr(cls, "compute", None)) and callable(getattr(cls, "describe", None)), cls.__name__

    class Engine:
        taps = ("us6",)

        def extract(self, images, taps=None):
            return {"us6": torch.ones(1, 3, 2, 2)}

    source = EngineFeatures(Engine(), "us6", key="e")
    assert isinstance(source, FeatureSource) and source.compute(None, "cat")["us6"].shape == (3, 2, 2)
    assert source.features(None, "cat").dtype == torch.float32
