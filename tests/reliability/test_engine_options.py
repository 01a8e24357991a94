"""Engine options that do not apply are refused, not ignored; a stream's consumer never waits for its producer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from cleandift_rt import Engine


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "a cat"}, "prompt= applies to student checkpoints"),
    ({"cuda_graph": True}, "cuda_graph=True is for TensorRT plans"),
    ({"base": "somewhere"}, "base= gives the VAE and text encoder of a student checkpoint"),
])
def test_options_an_onnx_file_would_ignore_are_refused(tiny_onnx, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(tiny_onnx["full"], **kwargs)


def test_options_a_student_file_would_ignore_are_refused(tiny_student_files, tiny_base_dir):
    with pytest.raises(ValueError, match="threads= sets ONNX Runtime / OpenVINO CPU threads"):
        Engine(tiny_student_files["unet"], base=tiny_base_dir, threads=2)
    with pytest.raises(ValueError, match="cuda_graph=True is for TensorRT plans"):
        Engine(tiny_student_files["unet"], base=tiny_base_dir, cuda_graph=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only PyTorch case")
def test_cuda_on_a_cpu_only_torch_is_said_before_any_model_loads(tiny_student_files, tiny_base_dir, monkeypatch):
    import cleandift_rt.models.loading as loading

    monkeypatch.setattr(loading, "load_base", lambda *a, **k: pytest.fail("loaded the model before the check"))
    with pytest.raises(ValueError, match="sees no CUDA device"):
        Engine(tiny_student_files["unet"], base=tiny_base_dir, device="cuda")


def test_a_consumer_that_stops_returns_at_once_and_the_producer_ends(tiny_onnx, photos):
    engine = Engine(tiny_onnx["full"], taps=["us6"])
    frame = np.asarray(photos["cat"])
    release = threading.Event()
    produced = []

    def camera():  # blocks inside the iterable, as a camera or socket would
        yield frame
        produced.append(1)
        release.wait(30)
        yield frame
        produced.append(2)

    before = {t.ident for t in threading.enumerate()}
    stream = engine.stream(camera())
    first = next(stream)
    assert first.index == 0
    t0 = time.perf_counter()
    stream.close()  # the consumer breaks while the producer is blocked in the iterable
    assert time.perf_counter() - t0 < 1.0  # it used to wait 5 s
    workers = [t for t in threading.enumerate() if t.ident not in before and t.name == "cleandift-rt-stream"]
    release.set()  # the iterable yields: the producer sees the consumer is gone and ends
    for t in workers:
        t.join(10)
        assert not t.is_alive()
    assert produced == [1]  # it took the next frame and stopped there: nothing more was asked of the iterable
