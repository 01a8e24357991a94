"""cleandift_rt.Engine on the tiny model: backends, input/output conventions, chunking, threads, streaming, errors."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import onnx
import pytest
import torch
from cleandift_rt import Engine
from cleandift_rt.formats.artifact import describe
from cleandift_rt.runtime.engine import StreamResult
from cleandift_rt.features.extractor import ReferenceExtractor
from cleandift_rt.taps import TAPS
from export_fixtures import SIZE, MixedTaps
from export_fixtures import cosine as _cosine


@pytest.fixture(scope="module")
def onnx_engine(tiny_onnx):
    return Engine(tiny_onnx["full"], device="cpu", precision="fp32")  # the reference path: ONNX Runtime


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(5, 3, SIZE, SIZE, generator=gen) * 2 - 1


def test_public_surface(onnx_engine, tiny_onnx):
    assert onnx_engine.taps == TAPS
    info = onnx_engine.info
    assert info["backend"] == "onnxruntime" and info["providers"] == ["CPUExecutionProvider"]
    # CPU sessions skip ORT's pre-planned activation block (peak memory; see the backend)
    assert onnx_engine.backend.session.get_session_options().enable_mem_pattern is False
    assert info["size"] == [SIZE, SIZE] and info["threads"] >= 1
    assert [t["name"] for t in info["taps"]] == list(TAPS)
    assert describe(tiny_onnx["full"])["taps"] == info["taps"]
    assert info["text_conditioning"] == "distill"  # the student file's record, through the export
    assert Engine(tiny_onnx["full"], taps=["us6", "us3"]).taps == ("us3", "us6")


@pytest.mark.parametrize("kind", ["unet", "full"])
def test_pytorch_backend_is_the_reference(kind, tiny_student_files, tiny_base_dir, reference, batch):
    engine = Engine(tiny_student_files[kind], base=tiny_base_dir, taps="us6", size=SIZE)
    assert engine.info["backend"] == "pytorch" and engine.info["timestep"] == 261.0
    assert engine.info["text_conditioning"] == {"unet": "distill", "full": None}[kind]  # what each file records
    ours = engine.extract(batch)
    np.testing.assert_allclose(ours["us6"], reference.extract(batch, taps="us6")["us6"].numpy(), rtol=1e-5, atol=1e-6)


def test_pytorch_backend_from_a_diffusers_folder(tiny_base_dir, tiny_base, batch):
    engine = Engine(tiny_base_dir, taps=["mid", "us10"])
    assert engine.size == (tiny_base.resolution, tiny_base.resolution)
    from cleandift_rt.models import Student

    ref = ReferenceExtractor(Student(unet=tiny_base.unet), tiny_base).extract(batch, taps=["mid", "us10"])
    for tap in ("mid", "us10"):
        np.testing.assert_allclose(engine.extract(batch)[tap], ref[tap].numpy(), rtol=1e-5, atol=1e-6)


def test_each_image_and_prompt_embedding_is_checked_once(tiny_student_files, tiny_base_dir, tiny_base, reference,
                                                          onnx_engine, batch, monkeypatch):
    """Engine.extract prepares the pixels and checks the embeddings; the backend (the PyTorch one
    included, which used to prepare and check them again) runs on what it was given."""
    from cleandift_rt.features import extractor
    from cleandift_rt.runtime import engine as engine_module
    from cleandift_rt.runtime.backends.common import Backend

    engine = Engine(tiny_student_files["unet"], base=tiny_base_dir, taps="us6", size=SIZE)
    assert isinstance(engine.backend, Backend) and isinstance(onnx_engine.backend, Backend)
    embeds = tiny_base.encode_prompt("a photo of a cat")[0]
    want = reference.extract(batch, taps="us6", prompt_embeds=embeds)["us6"].numpy()

    def again(*args, **kwargs):
        raise AssertionError("checked a second time inside the backend")

    calls = []
    prepare = engine_module.prepare_images
    monkeypatch.setattr(engine_module, "prepare_images", lambda *a, **k: calls.append(1) or prepare(*a, **k))
    monkeypatch.setattr(extractor, "prepare_images", again)
    monkeypatch.setattr(extractor, "check_prompt_embeds", again)
    np.testing.assert_allclose(engine.extract(batch, prompt_embeds=embeds)["us6"], want, rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_derived_outputs_run_on_the_backends_taps(tiny_onnx, onnx_engine, batch):
    """``Engine(derived=[...])``: any output computed from taps, beside the default taps, from the
    taps it reads whether or not they are asked for."""
    from cleandift_rt.formats.derived import open_option

    mixed = MixedTaps()
    engine = Engine(tiny_onnx["full"], taps=["mid"], derived=[mixed], precision="fp32")
    assert engine.taps == ("mid", "mixed")
    out = engine.extract(batch)
    assert list(out) == ["mid", "mixed"]
    taps = onnx_engine.extract(batch, taps=["us3", "us6"])
    with torch.no_grad():
        want = mixed({t: torch.from_numpy(v) for t, v in taps.items()}).numpy()
    np.testing.assert_allclose(out["mixed"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(engine.extract(batch[:1], taps=["mixed"])["mixed"], want[:1], rtol=1e-5, atol=1e-6)
    assert engine.info["derived"] == [{"name": "mixed", "channels": 8, "stride": 16, "reads": ["us3", "us6"],
                                       "computed": "pytorch", "given": "derived"}]

    class OnUs6(MixedTaps):
        name = "us6"

    class Deeper(MixedTaps):
        reads = ("us6", "us9")

    with pytest.raises(ValueError, match="given more than once"):
        Engine(tiny_onnx["full"], derived=[mixed, MixedTaps(seed=1)])
    with pytest.raises(TypeError, match="not a derived output"):
        Engine(tiny_onnx["full"], derived=[torch.nn.Identity()])
    with pytest.raises(ValueError, match="taken by a tap"):
        Engine(tiny_onnx["full"], derived=[OnUs6()])
    with pytest.raises(ValueError, match=r"'mixed' needs taps the engine lacks.*us9"):
        Engine(tiny_onnx["subset"], size=SIZE, derived=[Deeper()])
    with pytest.raises(LookupError, match="opens no derived output"):
        open_option("no_such_option", "file.safetensors")


def test_bf16_precision_stays_close(tiny_student_files, tiny_base_dir, reference, batch):
    engine = Engine(tiny_student_files["unet"], base=tiny_base_dir, taps="us6", size=SIZE, precision="bf16")
    ours = engine.extract(batch)["us6"]
    assert ours.dtype == np.float32
    assert _cosine(ours, reference.extract(batch, taps="us6")["us6"].numpy()).min() > 0.99


def test_output_follows_the_callers_framework(onnx_engine, images, batch, photos):
    from_torch = onnx_engine.extract(images[:2], taps="us6")
    assert isinstance(from_torch["us6"], torch.Tensor) and from_torch["us6"].shape == (2, 64, 8, 8)
    from_numpy = onnx_engine.extract(images[:2].numpy(), taps="us6")
    assert isinstance(from_numpy["us6"], np.ndarray)
    np.testing.assert_array_equal(from_numpy["us6"], from_torch["us6"].numpy())
    from_pil = onnx_engine.extract([photos["cat"]], taps="us6")
    from_uint8 = onnx_engine.extract(np.asarray(photos["cat"]), taps="us6")
    np.testing.assert_array_equal(from_pil["us6"], from_uint8["us6"])


def test_batches_split_to_the_profile_and_join(tiny_onnx, onnx_engine, images):
    whole = onnx_engine.extract(images)
    chunked_engine = Engine(tiny_onnx["full"], max_batch=2, precision="fp32")
    assert chunked_engine.max_batch == 2
    chunked = chunked_engine.extract(images)
    for tap in TAPS:
        assert chunked[tap].shape == whole[tap].shape
        torch.testing.assert_close(chunked[tap], whole[tap], rtol=1e-4, atol=1e-5)


def test_min_batch_padding_drops_the_padding(onnx_engine, images):
    onnx_engine.backend.min_batch = 3  # a TensorRT profile starting at 3, emulated on ONNX Runtime
    try:
        padded = onnx_engine.extract(images[:1], taps="us6")
    finally:
        onnx_engine.backend.min_batch = 1
    assert padded["us6"].shape[0] == 1
    torch.testing.assert_close(padded["us6"], onnx_engine.extract(images[:1], taps="us6")["us6"], rtol=1e-4, atol=1e-5)


def test_concurrent_extract_equals_serial(onnx_engine, images):
    serial = [onnx_engine.extract(images[i : i + 1], taps="us6")["us6"] for i in range(len(images))]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(i):
        try:
            for _ in range(2):
                results[i] = onnx_engine.extract(images[i : i + 1], taps="us6")["us6"]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, want in enumerate(serial):
        torch.testing.assert_close(results[i], want, rtol=0, atol=0)


def test_concurrent_pytorch_backend(tiny_student_files, tiny_base_dir, images):
    engine = Engine(tiny_student_files["unet"], base=tiny_base_dir, taps="us3", size=SIZE)
    serial = [engine.extract(images[i : i + 1])["us3"] for i in range(3)]
    out = [None] * 3
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, engine.extract(images[i : i + 1])["us3"]))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(out, serial):
        torch.testing.assert_close(got, want)


def test_stream_yields_in_order_with_latency(onnx_engine, images, photos, tmp_path):
    path = tmp_path / "cat.png"
    photos["cat"].save(path)
    items = [images[0], np.asarray(photos["coffee"]), path, images[1], images[2]]
    results = list(onnx_engine.stream(iter(items), taps="us6", batch_size=2, prefetch=2))
    assert [r.index for r in results] == list(range(len(items)))
    assert all(isinstance(r, StreamResult) and r.latency >= r.inference > 0 for r in results)
    assert isinstance(results[0].features["us6"], torch.Tensor)
    assert isinstance(results[1].features["us6"], np.ndarray)
    for r, i in ((results[0], 0), (results[3], 1), (results[4], 2)):
        want = onnx_engine.extract(images[i : i + 1], taps="us6")["us6"]
        torch.testing.assert_close(r.features["us6"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results[2].features["us6"], onnx_engine.extract([photos["cat"]], taps="us6")["us6"],
                               rtol=1e-4, atol=1e-5)


def test_stream_raises_bad_items_and_can_stop_early(onnx_engine, images):
    bad = torch.full((3, SIZE, SIZE), float("nan"))
    delivered = []
    with pytest.raises(ValueError, match="NaN"):
        # the bad item shares a batch with good ones: those are still delivered, in order, first
        for result in onnx_engine.stream([images[0], images[1], bad, images[2]], taps="us6", batch_size=4):
            delivered.append(result.index)
    assert delivered == [0, 1]
    gen = onnx_engine.stream(images[i] for i in range(5))
    assert next(gen).index == 0
    gen.close()  # the reader thread stops instead of hanging


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((SIZE, SIZE, 3), dtype=np.float64), ValueError, "B x 3 x H x W"),
    (np.zeros((1, SIZE, SIZE, 3), dtype=np.int16), TypeError, "uint8"),
    (torch.zeros(3, SIZE, SIZE), ValueError, "B x 3 x H x W"),
    (torch.full((1, 3, SIZE, SIZE), float("nan")), ValueError, "NaN"),
    (torch.zeros(0, 3, SIZE, SIZE), ValueError, "empty batch"),
    ([], ValueError, "empty batch"),
    (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.int32), TypeError, "floating point"),
    (torch.full((1, 3, SIZE, SIZE), 3.0), ValueError, r"\[-1, 1\]"),
    ("cat.png", TypeError, "unsupported image batch type"),
])
def test_bad_images_give_clear_errors(onnx_engine, bad, error, match):
    with pytest.raises(error, match=match):
        onnx_engine.extract(bad)


def test_bad_options_give_clear_errors(tiny_onnx, onnx_engine, images, tiny_student_files):
    with pytest.raises(ValueError, match="unknown resize policy"):
        Engine(tiny_onnx["full"], resize="crop")
    with pytest.raises(ValueError, match=r"looks like a device; pass it as device='cuda:0'"):
        Engine(tiny_onnx["full"], "cuda:0")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        Engine(tiny_onnx["full"], device="tpu")
    with pytest.raises(ValueError, match=r"threads .*must be in \[1, 1024\], got -1"):
        Engine(tiny_onnx["full"], threads=-1)
    with pytest.raises(ValueError, match="exported for 128x128"):
        Engine(tiny_onnx["full"], size=256)
    with pytest.raises(ValueError, match="unknown tap"):
        onnx_engine.extract(images[:1], taps="us11")
    with pytest.raises(ValueError, match=r"not in this engine .*re-export with --taps"):
        Engine(tiny_onnx["subset"], size=SIZE).extract(images[:1], taps="us10")
    with pytest.raises(ValueError, match="not in this engine"):
        Engine(tiny_onnx["subset"], size=SIZE, taps=["us6", "mid"])
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        onnx_engine.extract(images[:2], prompt_embeds=torch.zeros(77, 7))
    with pytest.raises(ValueError, match="precision"):
        Engine(tiny_onnx["full"], backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="max_batch"):
        Engine(tiny_onnx["full"], max_batch=0)
    with pytest.raises(ValueError, match="pass base=DIR"):
        Engine(tiny_student_files["unet"])
    with pytest.raises(FileNotFoundError):
        Engine(tiny_onnx["full"].with_name("nope.onnx"))


def _copy_onnx(src, dst_dir, name="m.onnx"):
    """Copy a model (and its data file, which keeps its name: the model refers to it)."""
    dst = dst_dir / name
    shutil.copy(src, dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        shutil.copy(data, dst_dir / data.name)
    return dst


def test_mismatched_or_damaged_files_are_named(tiny_onnx, tmp_path):
    truncated = _copy_onnx(tiny_onnx["full"], tmp_path, "truncated.onnx")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or not an ONNX model"):
        Engine(truncated)

    missing = tmp_path / "nodata"
    missing.mkdir()
    no_data = _copy_onnx(tiny_onnx["subset"], missing)
    (missing / (tiny_onnx["subset"].name + ".data")).unlink()
    with pytest.raises(ValueError, match=r"tiny_sub.onnx.data, which is missing"):
        Engine(no_data, size=SIZE)

    short = tmp_path / "short"
    short.mkdir()
    short_data = _copy_onnx(tiny_onnx["subset"], short)
    data = short / (tiny_onnx["subset"].name + ".data")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match="is truncated"):
        Engine(short_data, size=SIZE)

    model = onnx.load(str(tiny_onnx["full"]))
    for p in model.metadata_props:
        if p.key == "cleandift_rt.package_version":
            p.value = '"99.0.0"'
    future = tmp_path / "future.onnx"
    onnx.save_model(model, str(future))
    with pytest.raises(ValueError, match=r"cleandift-rt 99\.0\.0.*major versions differ"):
        Engine(future)

    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save_model(model, str(foreign))
    with pytest.raises(ValueError, match="not written by cleandift-rt"):
        Engine(foreign)


def test_plan_files_fail_clearly_without_tensorrt(tmp_path, tiny_onnx):
    from cleandift_rt.export.trt_build import plan_header, write_plan

    info = describe(tiny_onnx["full"])
    from cleandift_rt.formats.artifact import read_onnx_info

    header = plan_header(read_onnx_info(tiny_onnx["full"]), "10.0.0", (8, 9), "test GPU", {"min": 1, "opt": 2, "max": 4},
                         True, 1.0, np.zeros((1, 77, 32), np.float32), {"engine_layers": 0}, "m.onnx", 16)
    plan = tmp_path / "m.plan"
    write_plan(plan, header, b"\0" * 16)
    assert describe(plan)["taps"] == info["taps"]
    with pytest.raises((ImportError, RuntimeError), match="TensorRT is not installed|needs an NVIDIA GPU"):
        Engine(plan)
    plan.write_bytes(plan.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        Engine(plan)
