"""What every engine backend offers (``Backend``) and the helpers more than one of them needs.

The Engine hands a backend prepared tensors only: pixels ``B x 3 x H x W`` float32 in [-1, 1] at
one of the sizes its ``info`` allows (``prepare_images`` did the decoding, size policy and
checks), a batch within ``[min_batch, max_batch]`` (the Engine splits and pads), prompt
embeddings ``[B, L, D]`` already checked (``check_prompt_embeds``) or None for the baked prompt,
and outputs its ``info`` lists. A backend checks none of that again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ...formats.artifact import ArtifactInfo


@runtime_checkable
class Backend(Protocol):
    """One way of running a feature graph: ONNX Runtime, OpenVINO, TensorRT or PyTorch."""

    name: str  # what Engine.info["backend"] says: "onnxruntime", "openvino", "tensorrt", "pytorch"
    info: ArtifactInfo  # the taps and derived outputs it computes, its input sizes and batch range
    device: torch.device  # where ``run`` leaves its outputs
    min_batch: int = 1  # the smallest batch one ``run`` takes (a TensorRT profile may start above 1)
    max_batch: int | None = None  # the largest (None: any; the Engine may still split, Engine(max_batch=))
    base_source: str | None = None  # the base model a student file reads (its identity is part of the features')

    def run(self, pixels: torch.Tensor, embeds: torch.Tensor | None, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: B x C x h x w float32}`` for each of ``taps`` (names from ``info.output_names``)."""

    def describe(self) -> dict:
        """What actually runs (backend, device, providers, precision, threads, versions) for ``Engine.info``."""


def available_cpus() -> int:
    """CPU cores this process may use (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_outputs(path: Path, info: ArtifactInfo, outputs) -> None:
    """The graph has an output for every tap and derived output its metadata declares."""
    absent = [name for name in info.output_names if name not in outputs]
    if absent:
        raise ValueError(f"{path} declares taps {absent} in its metadata but has no such outputs (corrupt file)")


def check_finite_outputs(outputs: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """``outputs`` of one backend call when every value is finite; else a ValueError naming the first
    output (tap) that went NaN or Inf. One reduction per output and one device sync for all of them:
    the Engine runs it on every call, so non-finite features never reach the caller silently."""
    if not outputs:
        return outputs
    finite = torch.stack([torch.isfinite(t).all() for t in outputs.values()]).tolist()
    if all(finite):
        return outputs
    bad = [name for name, ok in zip(outputs, finite) if not ok]
    raise ValueError(f"{source}: the engine computed NaN or Inf in {bad[0]!r}" + (f" (and {', '.join(bad[1:])})" if
                     bad[1:] else "") + " from finite images: its weights or its build are broken (a NaN in the "
                     "student, an fp16 overflow); re-export it from a good student, or run it in fp32")


def host_float32(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy view (a copy only when needed) of a tensor, for the CPU runtimes."""
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)
