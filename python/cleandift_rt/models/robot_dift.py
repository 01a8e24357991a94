"""Robot-DIFT encoder packages: a clean-input SD 2.1 student for closed-loop control, as a folder.

Layout (everything else in the folder is ignored; what is read is checked and refused by name):

- ``metadata.json``: ``model_type: "cleandift"``, ``sd_version: "sd21"``, ``use_text_condition``
  (bool), ``components.student_unet`` (the U-Net's sub-folder, e.g. ``"unet"``), ``feature_dims``
  (``{tap: channels}``, e.g. ``{"us3": 1280, "us6": 1280, "us8": 640, "us10": 320}``, checked against
  the weights), ``vae_latent_mode``: ``"mode"`` or ``"sample"`` (``"sample"`` when absent);
- ``timestep.bin``: a ``torch.save`` of ``{"timestep": <one finite scalar>}``, the learned student
  timestep, read with ``torch.load(weights_only=True)`` (no code runs) and checked;
- ``<student_unet>/`` with exactly one of ``diffusion_pytorch_model.safetensors``,
  ``model.safetensors`` or ``diffusion_pytorch_model.bin`` (a pickle: read only with
  ``allow_pickle=True``): the CleanDIFT SD 2.1 feature-extractor U-Net state dict, loaded strictly
  into the base model's U-Net architecture.

Extraction (``robot_dift_latents`` and the student at the learned timestep): pixels in [-1, 1] ->
base VAE posterior -> latents ``(mode - shift) * scale`` (``shift`` is the VAE's ``shift_factor``,
0 for SD 2.1) -> student U-Net at ``timestep`` with the instruction's CLIP embedding (``""`` when
none) -> taps. A ``"sample"`` package draws ``mean + std * eps`` instead of the mode: it runs only
with ``latent="sample", seed=N`` (one ``eps`` per seed, shared by every image, so features do not
depend on batching) or, when asked, ``latent="mode"``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import read_safetensors
from ..checks import read_json_file
from ..taps import TAP_TABLE, tap_channels
from .base import BaseModel
from .config_check import checked_unet, load_into
from .student import Student

METADATA = "metadata.json"
TIMESTEP = "timestep.bin"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")
LATENT_MODES = ("mode", "sample")
MAX_METADATA_BYTES = 1 << 20
MAX_TIMESTEP_BYTES = 1 << 16
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass
class RobotDiftPackage:
    """An opened package: the student (U-Net and learned timestep) and what its metadata says."""

    path: Path
    student: Student
    latent_mode: str  # what the package was trained with: "mode" or "sample"
    use_text_condition: bool
    feature_dims: dict[str, int]
    metadata: dict = field(repr=False, default_factory=dict)

    def record(self, latent: str, seed: int | None = None) -> dict:
        """What an engine or an export says about the package it runs."""
        out = {"package": self.path.name, "package_latent_mode": self.latent_mode, "latent": latent,
               "use_text_condition": self.use_text_condition, "feature_dims": dict(self.feature_dims),
               "timestep": float(self.student.timestep)}
        if seed is not None:
            out["seed"] = int(seed)
        return out


def is_robot_dift_package(path) -> bool:
    """A folder with a ``metadata.json``: opened as a Robot-DIFT package (and refused by name if it is not one)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file()


def read_metadata(folder: Path) -> dict:
    """``metadata.json``, bounded and checked field by field."""
    file = folder / METADATA
    if file.stat().st_size > MAX_METADATA_BYTES:
        raise ValueError(f"{file} is {file.stat().st_size} bytes: a package's metadata is a few hundred (corrupt?)")
    meta = read_json_file(file, str(file), MAX_METADATA_BYTES)
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must be a JSON object, got {type(meta).__name__}")
    if meta.get("model_type") != "cleandift":
        raise ValueError(f"{file}: model_type is {meta.get('model_type')!r}, not 'cleandift': this folder is not a "
                         "Robot-DIFT / CleanDIFT encoder package")
    if meta.get("sd_version") != "sd21":
        raise ValueError(f"{file}: sd_version is {meta.get('sd_version')!r}; Robot-DIFT packages are SD 2.1 students "
                         "('sd21'), other versions are not supported")
    if not isinstance(meta.get("use_text_condition", True), bool):
        raise ValueError(f"{file}: use_text_condition must be true or false, got {meta['use_text_condition']!r}")
    mode = meta.get("vae_latent_mode", "sample")
    if mode not in LATENT_MODES:
        raise ValueError(f"{file}: vae_latent_mode {mode!r} must be 'mode' or 'sample'")
    components = meta.get("components")
    if not isinstance(components, dict) or not isinstance(components.get("student_unet"), str):
        raise ValueError(f"{file}: components.student_unet (the U-Net's sub-folder, e.g. 'unet') is missing")
    if not _COMPONENT.fullmatch(components["student_unet"]) or components["student_unet"] in (".", ".."):
        raise ValueError(f"{file}: components.student_unet {components['student_unet']!r:.80} must be a plain "
                         "sub-folder name inside the package")
    dims = meta.get("feature_dims")
    if not isinstance(dims, dict) or not dims:
        raise ValueError(f"{file}: feature_dims must be an object {{tap: channels}}, e.g. {{\"us6\": 1280}}")
    unknown = [t for t in dims if t not in TAP_TABLE]
    if unknown:
        raise ValueError(f"{file}: feature_dims names unknown taps {unknown[:5]} (taps: {', '.join(TAP_TABLE)})")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in dims.values()):
        raise ValueError(f"{file}: feature_dims values must be positive channel counts, got {dims}")
    return meta


def read_timestep(folder: Path) -> float:
    """The learned timestep: ``timestep.bin`` must hold exactly ``{"timestep": <one finite scalar>}``."""
    file = folder / TIMESTEP
    if not file.is_file():
        raise ValueError(f"{folder} has no {TIMESTEP} (the learned student timestep): not a complete package")
    if file.stat().st_size > MAX_TIMESTEP_BYTES:
        raise ValueError(f"{file} is {file.stat().st_size} bytes; it should hold one number (corrupt or not a timestep)")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{file} is not a plain torch.save of {{'timestep': tensor}} ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None
    if not isinstance(data, dict) or set(data) != {"timestep"}:
        got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{file} must hold exactly {{'timestep': <scalar>}}, got {got}")
    value = data["timestep"]
    if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
        raise ValueError(f"{file}: timestep must be a number or a one-element tensor, got {type(value).__name__}")
    t = torch.as_tensor(value)
    if t.numel() != 1 or not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{file}: timestep must be one number, got a {t.dtype} tensor of shape {tuple(t.shape)}")
    t = float(t.reshape(()))
    if not math.isfinite(t):
        raise ValueError(f"{file}: timestep is {t}, not a finite number")
    return t


def unet_weights(folder: Path, component: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The student U-Net's state dict from the one weights file of ``folder/component``."""
    sub = folder / component
    if not sub.is_dir():
        raise ValueError(f"{folder}: the student U-Net folder {component}/ (components.student_unet) is missing")
    present = [name for name in WEIGHT_FILES if (sub / name).is_file()]
    if len(present) != 1:
        what = "none of" if not present else f"{len(present)} of"
        raise ValueError(f"{sub} holds {what} {', '.join(WEIGHT_FILES)}: a package needs exactly one")
    file = sub / present[0]
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    if not allow_pickle:
        raise ValueError(f"{file} is a pickle, and reading a pickle can run code: pass allow_pickle=True "
                         "(--allow-pickle) for packages you trust, or convert it once with "
                         "safetensors.torch.save_file(torch.load(f, weights_only=True), "
                         f"'{sub / 'diffusion_pytorch_model.safetensors'}') and remove the .bin")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{file} is not a plain state dict ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} must hold a state dict {{name: tensor}}")
    return state


def load_robot_dift(path, base: BaseModel, *, allow_pickle: bool = False) -> RobotDiftPackage:
    """Open a package against its base model (VAE, text encoder, U-Net architecture)."""
    folder = Path(path)
    if not is_robot_dift_package(folder):
        raise ValueError(f"{folder} is not a Robot-DIFT package folder (no {METADATA})")
    meta = read_metadata(folder)
    if base.variant in ("sd15", "tiny-sd15"):
        raise ValueError(f"{folder} is an SD 2.1 package but base {base.source} is SD 1.5: pass the SD 2.1 base "
                         "model (e.g. stable-diffusion-2-1-base)")
    timestep = read_timestep(folder)
    component = meta["components"]["student_unet"]
    state = unet_weights(folder, component, allow_pickle)
    source = str(folder / component)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    unet = checked_unet(dict(base.unet.config), shapes, f"{source} (architecture of base {base.source})")
    load_into(unet, state, source)
    unet.eval().requires_grad_(False)
    channels = tap_channels(list(unet.config.block_out_channels))
    wrong = {t: f"{c} (weights: {channels[t]})" for t, c in meta["feature_dims"].items() if channels[t] != c}
    if wrong:
        raise ValueError(f"{folder / METADATA}: feature_dims disagree with the U-Net weights: {wrong}")
    text = meta.get("use_text_condition", True)
    student = Student(unet=unet, timestep=timestep, source=str(folder), text_conditioning="captions" if text else "none")
    return RobotDiftPackage(folder, student, meta.get("vae_latent_mode", "sample"), text, dict(meta["feature_dims"]),
                            meta)


def choose_latent(package: RobotDiftPackage, latent: str | None, seed) -> tuple[str, int | None]:
    """(latent mode, seed) to run with: never a silent choice for a stochastic package."""
    if latent is not None and latent not in LATENT_MODES:
        raise ValueError(f"latent must be 'mode' or 'sample', got {latent!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    if package.latent_mode == "mode":
        if latent == "sample":
            raise ValueError(f"{package.path.name} encodes images with the posterior mode (vae_latent_mode 'mode'); "
                             "latent='sample' is for packages trained on posterior samples")
        if seed is not None:
            raise ValueError(f"seed= applies to latent='sample'; {package.path.name} uses the posterior mode")
        return "mode", None
    if latent is None:
        raise ValueError(f"{package.path.name} was trained on posterior samples (vae_latent_mode 'sample', the default "
                         "when metadata.json omits it): choose latent='sample', seed=N (stochastic, reproducible per "
                         "seed) or latent='mode' (deterministic, not what it was trained on); --latent on the CLI")
    if latent == "sample" and seed is None:
        raise ValueError("latent='sample' needs seed=N so that features are reproducible")
    if latent == "mode" and seed is not None:
        raise ValueError("seed= applies to latent='sample', not latent='mode'")
    return latent, seed


def save_robot_dift_package(folder, unet, timestep: float, feature_dims: dict[str, int], *,
                            latent_mode: str = "mode", use_text_condition: bool = True) -> Path:
    """Write a package in the layout above (safetensors weights), e.g. to hand a student to Robot-DIFT code."""
    from ..checkpoint import write_safetensors

    if latent_mode not in LATENT_MODES:
        raise ValueError(f"latent_mode must be 'mode' or 'sample', got {latent_mode!r}")
    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "unet" / WEIGHT_FILES[0], unet.state_dict())
    torch.save({"timestep": torch.tensor(float(timestep))}, folder / TIMESTEP)
    meta = {"model_type": "cleandift", "sd_version": "sd21", "use_text_condition": bool(use_text_condition),
            "components": {"student_unet": "unet"}, "feature_dims": dict(feature_dims), "vae_latent_mode": latent_mode}
    (folder / METADATA).write_text(json.dumps(meta, indent=2))
    return folder


def export_latent(package: RobotDiftPackage, latent: str | None, vae) -> str:
    """The latent an exported graph computes: always the posterior mode (a graph has no seeded sampling),
    so a ``"sample"`` package exports only when ``latent="mode"`` is asked for."""
    if latent == "sample":
        raise ValueError(f"an ONNX graph computes the posterior mode only: export {package.path.name} with latent="
                         "'mode' (--latent mode), or run it on the PyTorch backend with latent='sample', seed=N")
    mode, _ = choose_latent(package, latent, None)
    if getattr(vae.config, "shift_factor", None):
        raise ValueError(f"the base VAE has shift_factor {vae.config.shift_factor}; the exported graph computes "
                         "mode * scale (SD 2.1's VAE has no shift): export with an SD 2.1 base")
    return mode


def robot_dift_latents(vae, pixels: torch.Tensor, scaling_factor: float, latent: str = "mode",
                       seed: int | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> ``(mode - shift) * scale``, or ``(mean + std * eps(seed) - shift) * scale``."""
    dist = vae.encode(pixels).latent_dist
    if latent == "mode":
        z = dist.mode()
    else:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        eps = torch.randn((1, *dist.mean.shape[1:]), generator=gen).to(dist.mean.device, dist.mean.dtype)
        z = dist.mean + dist.std * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * scaling_factor


__all__ = ["RobotDiftPackage", "is_robot_dift_package", "load_robot_dift", "save_robot_dift_package", "choose_latent",
           "export_latent",
           "robot_dift_latents",
           "read_metadata", "read_timestep", "LATENT_MODES", "WEIGHT_FILES"]
