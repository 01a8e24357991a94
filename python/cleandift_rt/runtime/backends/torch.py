"""PyTorch backend: a student ``_unet`` / ``_full`` file or a diffusers folder, run by ``ReferenceExtractor``.

``encoder=DIR``: a fast encoder (``models.fast_encoder``) gives the latents in place of the base VAE's
encoder; it is checked against the base (latent channels and scale refused when they differ), and a
student adapted to another encoder than the one it runs with (the VAE's included) is warned about.

This is the reference itself (eager PyTorch, forward stopped after the last requested tap) on the
pixels and prompt embeddings the Engine prepared and checked (``ReferenceExtractor.features``), with
a speed option that changes numerics slightly and is therefore opt-in: ``precision="bf16"``
(autocast: convolutions and matmuls in bfloat16, norms and softmax in fp32) or ``"fp16"`` (CUDA
autocast). On the CPU, bf16 runs only where it is native (AVX512_BF16 or AMX): elsewhere autocast
would emulate it 2.5-4x slower than fp32, so it warns once and runs fp32 (``kernels.precision``;
before, it ran emulated). Channels-last layout was measured and gave no gain on the CPU (bench
notes in docs/engine.md), so the layout is left alone.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from ...formats.artifact import ArtifactInfo, tap_records
from ...features.extractor import ReferenceExtractor
from ...models import load_student_and_base
from ...models.fast_encoder import check_pairing, load_fast_encoder, pairing_warning
from ...features.preprocess import SIZE_MULTIPLE
from ...kernels.precision import cpu_precision
from ...taps import TAPS
from .common import Backend

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ANY_SIZE = [SIZE_MULTIPLE, 4096]  # the eager model takes any multiple of 64


class TorchBackend(Backend):
    name = "pytorch"  # any batch (min_batch 1, max_batch None)

    def __init__(self, path: str | Path, base=None, device: str | None = None, precision: str | None = None,
                 size=None, resize: str = "stretch", prompt: str = "", encoder=None):
        self.path = Path(path)
        precision = precision or "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; on the CPU use 'bf16' (or 'fp32')")
        if device.type == "cpu":
            precision = cpu_precision(precision, stacklevel=4)
        student, base_model = load_student_and_base(self.path, base)
        fast = None if encoder is None else load_fast_encoder(encoder)
        for message in [] if fast is None else check_pairing(fast, base_model):
            warnings.warn(message, stacklevel=3)
        message = pairing_warning(student.encoder, fast, self.path.name)
        if message:
            warnings.warn(message, stacklevel=3)
        self.ref = ReferenceExtractor(student, base_model, size=size, resize=resize, prompt=prompt, device=device,
                                      encoder=fast)
        self.device, self.precision = device, precision
        self.base_source = str(base_model.source) if base_model.source else None
        self.info = ArtifactInfo(
            taps=tap_records(TAPS, base_model.block_out_channels), height=None, width=None,
            size_range=list(ANY_SIZE), default_size=list(self.ref.size), resize=resize,
            batch={"min": 1, "opt": 1, "max": None}, base_model=Path(base_model.source).name,
            variant=base_model.variant, student=self.path.name, prompt=prompt, timestep=float(student.timestep),
            cross_attention_dim=int(base_model.unet.config.cross_attention_dim),
            prompt_tokens=int(getattr(base_model.tokenizer, "model_max_length", 77) or 77),
            block_out_channels=base_model.block_out_channels, scaling_factor=base_model.scaling_factor,
            text_conditioning=student.text_conditioning, extra={"precision": precision},
            encoder=None if fast is None else fast.describe())

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "threads": torch.get_num_threads()}

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def run(self, pixels: torch.Tensor, embeds: torch.Tensor | None, taps) -> dict[str, torch.Tensor]:
        with self._autocast():
            feats = self.ref.features(pixels, embeds, taps)
        return {t: f.float().contiguous() for t, f in feats.items()}
