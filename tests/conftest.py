"""Shared fixtures: one tiny SD2.1-topology base model and student files per test session.

Everything here goes through the same code paths as real weights (diffusers folder on disk,
safetensors student files in both release formats).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from cleandift_rt.models.heads import build_heads
from cleandift_rt.models import (
    Student,
    load_base,
    save_student_full,
    save_student_unet,
    write_tiny_base,
)


def perturb_(module: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """Add seeded noise to every parameter so a copy differs measurably from its source."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.abs().mean() + 1e-3))
    return module


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("tiny_base") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir):
    return load_base(tiny_base_dir)


@pytest.fixture(scope="session")
def tiny_student(tiny_base):
    """A student that differs from its teacher, with non-identity heads (as after training)."""
    unet = perturb_(copy.deepcopy(tiny_base.unet), 0.05, seed=1)
    heads = perturb_(build_heads(tiny_base.block_out_channels), 0.5, seed=2)
    with torch.no_grad():  # zero-initialised weights get a real value too
        for name, p in heads.named_parameters():
            if name.endswith(("down_proj.weight", "norm.linear.weight")):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    return Student(unet=unet.eval(), timestep=261.0, heads=heads.eval())


@pytest.fixture(scope="session")
def tiny_student_files(tmp_path_factory, tiny_base, tiny_student):
    """{'unet': path to the '_unet' file, 'full': path to the '_full' file} of ``tiny_student``.

    The '_unet' file records a text conditioning (so the exports made from it carry one); the
    '_full' file records none, as the release's files."""
    out = tmp_path_factory.mktemp("tiny_student")
    paths = {"unet": out / "student_unet.safetensors", "full": out / "student_full.safetensors"}
    save_student_unet(paths["unet"], tiny_student.unet, tiny_student.timestep, text_conditioning="distill")
    save_student_full(paths["full"], tiny_student.unet, tiny_student.heads, tiny_student.timestep,
                      teacher=tiny_base.unet, vae=tiny_base.vae)
    return paths


@pytest.fixture(scope="session")
def photos():
    from cleandift_rt.assets import PHOTOS, load_photo

    return {name: load_photo(name) for name in PHOTOS}


@pytest.fixture(scope="session")
def spair(tmp_path_factory, photos):
    """An SPair-71k-format tree of warped photos with exactly known ground truth (tests/spair_tree.py)."""
    from spair_tree import write_spair_tree

    return write_spair_tree(tmp_path_factory.mktemp("spair"), photos)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_base_dir, tiny_student_files, tmp_path_factory):
    """{'full': all taps at 128 px, 'subset': us3+us6, dynamic size, external data} ONNX exports."""
    from export_fixtures import export_both

    return export_both(str(tiny_base_dir), str(tiny_student_files["unet"]), tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def tiny_fp16_onnx(tiny_base_dir, tiny_student_files, tmp_path_factory):
    """The tiny student exported with ``--precision fp16`` through the CLI (and its fp32 reference)."""
    from export_fixtures import export_fp16

    return export_fp16(str(tiny_base_dir), str(tiny_student_files["unet"]), tmp_path_factory.mktemp("onnx16"))


@pytest.fixture(scope="session")
def reference(tiny_base, tiny_student):
    """The PyTorch reference extractor at the exports' size."""
    from cleandift_rt.features.extractor import ReferenceExtractor
    from export_fixtures import SIZE

    return ReferenceExtractor(tiny_student, tiny_base, size=SIZE)


@pytest.fixture(scope="session")
def batch(photos):
    """The bundled photos as uint8 H x W x 3 arrays, in name order."""
    import numpy as np

    return [np.asarray(photos[name]) for name in sorted(photos)]


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's tensors are too small to gain from threads; on the shared 2-core CPU a second
    OpenMP thread spinning against other processes makes these tests 4-10x slower. Restored after
    the module (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def subset_engine(tiny_onnx):
    """The us3+us6 dynamic-size ONNX export opened at 64 x 64 with the default precision (OpenVINO bf16
    on CPUs with native bf16, else ONNX Runtime fp32), as the CLI opens it."""
    from cleandift_rt import Engine

    return Engine(tiny_onnx["subset"], size=(64, 64))


@pytest.fixture(scope="session")
def student_engine(tiny_student_files, tiny_base_dir):
    """``student_engine(size)``: the tiny student on the PyTorch backend at size x size, opened once per size."""
    from cleandift_rt import Engine

    opened = {}

    def open_at(size: int):
        if size not in opened:
            opened[size] = Engine(tiny_student_files["unet"], base=str(tiny_base_dir), size=(size, size))
        return opened[size]

    return open_at
