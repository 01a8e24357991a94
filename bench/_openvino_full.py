"""The OpenVINO full-model peer of bench/extract.py: how a user of OpenVINO's diffusion pipelines
would get features without cleandift-rt.

Two plain ONNX exports, as the pipelines have them: the VAE encoder (images -> posterior mean x
scaling factor) and the **whole** U-Net (latents, timestep, text embeddings -> noise prediction,
through ``conv_out``: nothing pruned), with the 11 taps as extra outputs taken by forward hooks.
OpenVINO compiles both with the precision hint and thread count given; the timestep is an input
(as in the pipelines) and the "" prompt embedding is computed once at export and fed.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

OPSET = 17
HINTS = {"fp32": "f32", "bf16": "bf16"}


def export_full(model_dir: Path, folder: Path, size: int) -> Path:
    """``folder`` with vae_encoder.onnx, unet.onnx (+ external data) and prompt.npy, written once."""
    if (folder / "done").is_file():
        return folder
    import torch
    from torch import nn

    from cleandift_rt.models import load_base
    from cleandift_rt.taps import TAP_TABLE, TAPS

    base = load_base(model_dir)

    class VaeEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = base.vae

        def forward(self, images):
            return self.vae.encode(images).latent_dist.mean * base.scaling_factor

    class FullUNet(nn.Module):
        """The whole U-Net forward; the taps leave through hooks as extra outputs."""

        def __init__(self):
            super().__init__()
            self.unet, self.captured = base.unet, {}
            for name in TAPS:
                self.unet.get_submodule(TAP_TABLE[name].module).register_forward_hook(
                    lambda _m, _i, out, name=name: self.captured.__setitem__(
                        name, out[0] if isinstance(out, tuple) else getattr(out, "sample", out)))

        def forward(self, latents, timestep, encoder_hidden_states):
            sample = self.unet(latents, timestep, encoder_hidden_states=encoder_hidden_states).sample
            return (sample, *(self.captured[t] for t in TAPS))

    folder.mkdir(parents=True, exist_ok=True)
    embeds = base.encode_prompt("").float()
    np.save(folder / "prompt.npy", embeds.numpy())
    images = torch.zeros(2, 3, size, size)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notes of the legacy exporter
        torch.onnx.export(VaeEncoder().eval(), (images,), str(folder / "vae_encoder.onnx"), input_names=["images"],
                          output_names=["latents"], dynamic_axes={"images": {0: "batch"}, "latents": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
        latents = torch.zeros(2, 4, size // 8, size // 8)
        axes = {"latents": {0: "batch"}, "encoder_hidden_states": {0: "batch"}, "sample": {0: "batch"}}
        axes.update({t: {0: "batch"} for t in TAPS})
        torch.onnx.export(FullUNet().eval(), (latents, torch.tensor([261.0]), embeds.expand(2, -1, -1)),
                          str(folder / "unet.onnx"), input_names=["latents", "timestep", "encoder_hidden_states"],
                          output_names=["sample", *TAPS], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    (folder / "done").write_text(f"exported in {time.perf_counter() - t0:.0f} s\n")
    return folder


class OpenVINOFullModel:
    """VAE encoder and whole U-Net compiled by OpenVINO; ``extract(pixels, taps)`` -> {tap: tensor}."""

    def __init__(self, folder: Path, precision: str, threads: int):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        self.vae = core.compile_model(str(folder / "vae_encoder.onnx"), "CPU", config)
        self.unet = core.compile_model(str(folder / "unet.onnx"), "CPU", config)
        self.vae_request, self.unet_request = self.vae.create_infer_request(), self.unet.create_infer_request()
        self.embeds = np.load(folder / "prompt.npy")
        self.detail = {"openvino": ov.get_version(), "threads": threads,
                       "openvino_hint": self.unet.get_property("INFERENCE_PRECISION_HINT").get_type_name()}

    def extract(self, pixels, taps):
        import torch

        from cleandift_rt.taps import TAPS

        x = np.ascontiguousarray(pixels.numpy(), dtype=np.float32)
        latents = self.vae_request.infer({"images": x})[self.vae.output("latents")]
        out = self.unet_request.infer({"latents": latents, "timestep": np.array([261.0], np.float32),
                                       "encoder_hidden_states": np.repeat(self.embeds, len(x), axis=0)})
        return {t: torch.from_numpy(np.array(out[self.unet.output(t)])) for t in (taps or TAPS)}
