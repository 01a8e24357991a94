"""Engine on OpenVINO and the CPU precision rules: parity with the PyTorch reference in fp32, bf16
accuracy per tap, the explicit f32 hint, backend choice, bf16 by default where it is native, the
bf16 fallback warning, errors, CLI."""

from __future__ import annotations

import sys
import threading
import warnings

import numpy as np
import pytest
import torch

import cleandift_rt.kernels.precision as precision_rules
from cleandift_rt import Engine
from cleandift_rt.cli.main import main as cli_main
from cleandift_rt.runtime import engine as engine_module
from cleandift_rt.taps import TAPS
from export_fixtures import SIZE, SUBSET
from export_fixtures import cosine as _cosine

openvino = pytest.importorskip("openvino")
NATIVE_BF16 = precision_rules.native_bf16()
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no AVX512_BF16 / AMX: bf16 is not native here")


@pytest.fixture(scope="module")
def ov_fp32(tiny_onnx):
    return Engine(tiny_onnx["full"], backend="openvino", precision="fp32")


@pytest.fixture(scope="module")
def reference_feats(reference, batch):
    return {t: f.numpy() for t, f in reference.extract(batch).items()}


@pytest.fixture
def fresh_warning(monkeypatch):
    """The once-per-process bf16 fallback warning, armed again for this test."""
    monkeypatch.setattr(precision_rules, "_warned", False)


def test_fp32_matches_the_pytorch_reference_on_every_tap(ov_fp32, reference_feats, batch):
    info = ov_fp32.info
    assert info["backend"] == "openvino" and info["precision"] == "fp32" and info["device"] == "cpu"
    assert info["openvino_hint"] == "f32" and set(info["compute_precision"]) == {"f32"}
    assert info["cpu_features"] == list(precision_rules.cpu_feature_names())
    ours = ov_fp32.extract(batch)
    for tap in TAPS:
        want = reference_feats[tap]
        assert ours[tap].shape == want.shape and ours[tap].dtype == np.float32
        cos = _cosine(ours[tap], want).min()
        rel = float(np.abs(ours[tap] - want).max() / np.abs(want).max())
        assert cos >= 0.99999 and rel < 1e-3, f"{tap}: cos {cos:.7f} max rel {rel:.1e}"


def test_fp32_sets_the_f32_hint_explicitly(ov_fp32):
    """OpenVINO's CPU plugin defaults to bf16 on CPUs with native bf16: fp32 must not inherit that."""
    default = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    if NATIVE_BF16:
        assert default == "bf16"  # so the explicit hint below is what keeps fp32 fp32
    compiled = ov_fp32.backend._entry.model
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"


@needs_bf16
def test_bf16_is_close_to_fp32_on_every_tap(tiny_onnx, reference_feats, batch):
    engine = Engine(tiny_onnx["full"], precision="bf16")  # backend=None picks OpenVINO for bf16
    info = engine.info
    assert info["backend"] == "openvino" and info["precision"] == "bf16" and "precision_requested" not in info
    assert info["compute_precision"].get("bf16", 0) > 0
    ours = engine.extract(batch)
    report = {tap: float(_cosine(ours[tap], reference_feats[tap]).min()) for tap in TAPS}
    assert min(report.values()) >= 0.995, report
    assert max(report.values()) < 0.99999, "bf16 ran as exactly as fp32: is the hint applied?"


def test_prompt_embeds_reach_the_graph_and_the_baked_default_is_fed(ov_fp32, tiny_onnx, images_and_embeds):
    images, embeds = images_and_embeds
    ort_engine = Engine(tiny_onnx["full"], backend="onnxruntime")
    baked, given = ov_fp32.extract(images, taps="us6")["us6"], ov_fp32.extract(images, taps="us6", prompt_embeds=embeds)["us6"]
    torch.testing.assert_close(baked, ort_engine.extract(images, taps="us6")["us6"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(given, ort_engine.extract(images, taps="us6", prompt_embeds=embeds)["us6"],
                               rtol=1e-4, atol=1e-5)
    assert (baked - given).abs().max() > 1e-3  # the embeddings changed the features


@pytest.fixture(scope="module")
def images_and_embeds():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, SIZE, SIZE, generator=gen) * 2 - 1, torch.randn(3, 77, 32, generator=gen)


def test_batching_stream_and_one_compile_per_file_and_options(tiny_onnx, ov_fp32, images_and_embeds):
    images, _ = images_and_embeds
    whole = ov_fp32.extract(images, taps="us6")["us6"]
    chunked_engine = Engine(tiny_onnx["full"], backend="openvino", precision="fp32", max_batch=2)
    assert chunked_engine.backend._entry is ov_fp32.backend._entry  # compiled once, shared
    torch.testing.assert_close(chunked_engine.extract(images, taps="us6")["us6"], whole, rtol=1e-4, atol=1e-5)
    streamed = [r.features["us6"] for r in ov_fp32.stream(images, taps="us6", batch_size=2)]
    torch.testing.assert_close(torch.cat(streamed), whole, rtol=1e-4, atol=1e-5)


def test_dynamic_size_external_data_and_threads(tiny_onnx, ov_fp32):
    sub = Engine(tiny_onnx["subset"], backend="openvino", precision="fp32", size=192, threads=1)  # dynamic H, W
    assert sub.info["threads"] == 1 and sub.backend._entry.model.get_property("INFERENCE_NUM_THREADS") == 1
    assert sub.backend._entry is not ov_fp32.backend._entry
    ref = Engine(tiny_onnx["subset"], backend="onnxruntime", size=192)
    small = torch.rand(1, 3, 100, 140) * 2 - 1
    for tap in SUBSET:
        torch.testing.assert_close(sub.extract(small)[tap], ref.extract(small)[tap], rtol=1e-4, atol=1e-5)


def test_concurrent_extract_equals_serial(ov_fp32, images_and_embeds):
    images, _ = images_and_embeds
    serial = [ov_fp32.extract(images[i : i + 1], taps="us6")["us6"] for i in range(len(images))]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(2):
                results[i] = ov_fp32.extract(images[i : i + 1], taps="us6")["us6"]
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


def test_backend_choice_for_onnx(monkeypatch):
    choose = engine_module.choose_onnx_backend
    assert choose(None, "cpu", "fp32") == ("onnxruntime", "fp32")  # fp32: ONNX Runtime when installed
    assert choose("openvino", None, "fp32") == ("openvino", "fp32")
    fast = ("openvino", "bf16") if NATIVE_BF16 else ("onnxruntime", "fp32")
    assert choose(None, "cpu", None) == choose(None, None, None) == fast  # None: bf16 where native
    assert choose("openvino", None, None) == ("openvino", fast[1])
    assert choose("onnxruntime", "cpu", None) == ("onnxruntime", "fp32")  # no bf16 path there: fp32, no error
    assert choose(None, "cuda", None) == ("onnxruntime", "fp32")
    if NATIVE_BF16:
        assert choose(None, None, "bf16") == ("openvino", "bf16")
    monkeypatch.setattr(engine_module, "installed", lambda name: name == "openvino")
    assert choose(None, "cpu", "fp32") == ("openvino", "fp32")  # a plain install without ONNX Runtime
    assert choose(None, "cpu", None) == ("openvino", fast[1])
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        choose(None, "cuda", None)
    monkeypatch.setattr(engine_module, "installed", lambda name: False)
    with pytest.raises(ImportError, match="pip install openvino .* or pip install onnxruntime"):
        choose(None, None, None)


def test_default_precision_is_bf16_where_native(tiny_onnx, reference_feats, batch, monkeypatch):
    """Engine(x.onnx) runs OpenVINO bf16 on CPUs with native bf16 (what info says), fp32 on ONNX
    Runtime elsewhere, silently; precision="fp32" keeps the reference path."""
    engine = Engine(tiny_onnx["full"], device="cpu")
    info = engine.info
    assert "precision_requested" not in info
    if NATIVE_BF16:
        assert info["backend"] == "openvino" and info["precision"] == "bf16" and info["openvino_hint"] == "bf16"
        ours = engine.extract(batch)
        assert min(float(_cosine(ours[tap], reference_feats[tap]).min()) for tap in TAPS) >= 0.995
    else:
        assert info["backend"] == "onnxruntime" and info["precision"] == "fp32"
    reference = Engine(tiny_onnx["full"], device="cpu", precision="fp32").info
    assert reference["backend"] == "onnxruntime" and reference["precision"] == "fp32"
    monkeypatch.setattr(precision_rules, "native_bf16", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was asked for: no fallback warning
        assert Engine(tiny_onnx["full"], device="cpu").info["precision"] == "fp32"


def test_bf16_falls_back_to_fp32_with_one_warning_where_not_native(monkeypatch, fresh_warning, tiny_onnx,
                                                                   tiny_student_files, tiny_base_dir, reference, batch):
    monkeypatch.setattr(precision_rules, "native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        engine = Engine(tiny_onnx["full"], precision="bf16")
    info = engine.info
    assert info["precision"] == "fp32" and info["precision_requested"] == "bf16"
    assert info["backend"] == "onnxruntime"  # bf16 fell back, so the fp32 rule chose
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        ov = Engine(tiny_onnx["full"], backend="openvino", precision="bf16")
        torch_engine = Engine(tiny_student_files["unet"], base=tiny_base_dir, taps="us6", size=SIZE, precision="bf16")
    assert ov.info["precision"] == "fp32" and ov.info["openvino_hint"] == "f32"
    assert torch_engine.info["precision"] == "fp32"  # no emulated autocast: the reference itself
    np.testing.assert_array_equal(torch_engine.extract(batch)["us6"], reference.extract(batch, taps="us6")["us6"].numpy())


def test_bad_backend_and_precision_choices(tiny_onnx, tiny_student_files, tiny_base_dir, monkeypatch):
    with pytest.raises(ValueError, match="ONNX Runtime has no bf16 CPU path: use backend='openvino'"):
        Engine(tiny_onnx["full"], backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="'fp16' is for CUDA"):
        Engine(tiny_onnx["full"], precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        Engine(tiny_onnx["full"], precision="int4")
    with pytest.raises(ValueError, match=r"precision='int8' runs int8 files; tiny_all.onnx is fp32: make one with"):
        Engine(tiny_onnx["full"], precision="int8")  # tests/export/test_int8.py runs int8 files
    with pytest.raises(ValueError, match="unknown backend 'ort'"):
        Engine(tiny_onnx["full"], backend="ort")
    with pytest.raises(ValueError, match=r"backend 'tensorrt' cannot run tiny_all.onnx .*export/build_engine.py"):
        Engine(tiny_onnx["full"], backend="tensorrt")
    with pytest.raises(ValueError, match=r"backend 'openvino' cannot run .*export/export_onnx.py"):
        Engine(tiny_student_files["unet"], base=tiny_base_dir, backend="openvino")
    with pytest.raises(ValueError, match="runs on the CPU"):
        Engine(tiny_onnx["full"], backend="openvino", device="cuda")
    with pytest.raises(ValueError, match="bf16 for .onnx files runs on the CPU"):
        Engine(tiny_onnx["full"], precision="bf16", device="cuda")
    assert Engine(tiny_student_files["unet"], base=tiny_base_dir, backend="torch").info["backend"] == "pytorch"
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: import fails
    with pytest.raises(ImportError, match="pip install openvino"):
        Engine(tiny_onnx["full"], backend="openvino")


def test_cli_takes_backend_and_precision(tiny_onnx, photos, tmp_path, capsys):
    photo = tmp_path / "cat.png"
    photos["cat"].save(photo)
    out = tmp_path / "feats"
    assert cli_main(["extract", str(photo), "--engine", str(tiny_onnx["full"]), "--backend", "openvino",
                     "--precision", "fp32", "--taps", "us6", "--out", str(out), "--no-progress"]) == 0
    assert (out / "cat.png.safetensors").is_file()  # the image's full name: a.jpg and a.png never collide
    assert cli_main(["extract", str(photo), "--engine", str(tiny_onnx["full"]), "--backend", "onnxruntime",
                     "--precision", "bf16", "--out", str(out)]) == 2
    assert "ONNX Runtime has no bf16 CPU path" in capsys.readouterr().err
