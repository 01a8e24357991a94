"""CleanDIFT students in both formats of the public release (docs/method.md, projection heads).

``_unet``: the student U-Net alone in diffusers key names (loads strictly into
``UNet2DConditionModel``). ``_full``: the aligner state dict with student, heads, mapping,
``timestep`` (and teacher, VAE). Files we write also carry the U-Net config, the timestep, the
text conditioning the student was trained with (``conditioning.py``) and, for a student adapted to a
fast encoder (``models.fast_encoder``), that encoder's name and hash in the safetensors metadata;
the release's own files need the base model to know the architecture, and say nothing of their
text conditioning (the release trained with captions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_safetensors, read_safetensors_metadata, read_safetensors_shapes, write_safetensors
from ..checks import loads_json
from ..conditioning import check_text_conditioning
from ..timesteps import check_timestep
from .base import BaseModel
from .config_check import checked_unet, load_into
from .fast_encoder import check_reference
from .heads import HEAD_PREFIXES, ProjectionHeads
from .loading import load_base

DEFAULT_STUDENT_TIMESTEP = 261.0
STUDENT_PREFIX = "unet_feature_extractor_cleandift."
TEACHER_PREFIX = "unet_feature_extractor_base."
VAE_PREFIX = "ae."


@dataclass
class Student:
    """A CleanDIFT student: the fine-tuned U-Net, its timestep, and the heads when the file had them.

    ``text_conditioning``: how it was trained ("captions", "none", "distill"), None when the file
    does not say (the release's files). ``encoder``: the fast encoder it was adapted to (``{"name",
    "hash"}``), None for the base VAE's encoder."""

    unet: nn.Module
    timestep: float = DEFAULT_STUDENT_TIMESTEP
    heads: ProjectionHeads | None = None
    source: str = ""
    text_conditioning: str | None = None
    encoder: dict | None = None


def _conditioning_metadata(text_conditioning: str | None, encoder: dict | None = None) -> dict[str, str]:
    meta = {} if text_conditioning is None else {"text_conditioning": check_text_conditioning(text_conditioning)}
    if encoder is not None:
        meta["encoder"] = json.dumps(check_reference(encoder, "the student's encoder"))
    return meta


def save_student_unet(path: str | Path, unet: nn.Module, timestep: float = DEFAULT_STUDENT_TIMESTEP,
                      text_conditioning: str | None = None, encoder: dict | None = None) -> None:
    """The release ``_unet`` format: the student U-Net alone in diffusers key names.

    Loads strictly into ``UNet2DConditionModel``; the U-Net config, the timestep and the text
    conditioning travel in the safetensors metadata so the file is self-describing (the release's
    own files lack them).
    """
    write_safetensors(path, unet.state_dict(), metadata={
        "format": "cleandift_unet", "unet_config": unet_config_json(unet), "timestep": str(float(timestep)),
        **_conditioning_metadata(text_conditioning, encoder)})


def save_student_full(path: str | Path, unet: nn.Module, heads: ProjectionHeads, timestep: float | torch.Tensor,
                      teacher: nn.Module | None = None, vae: nn.Module | None = None,
                      text_conditioning: str | None = None, encoder: dict | None = None) -> None:
    """The release ``_full`` format: aligner state dict with student, heads, mapping, timestep (and teacher, VAE).

    The heads' kind (AdaRMS or FiLM) is in their key names; the metadata repeats it for ``info``."""
    state: dict[str, torch.Tensor] = {}
    state.update({STUDENT_PREFIX + k: v for k, v in unet.state_dict().items()})
    state.update(heads.release_state_dict())
    state["timestep"] = torch.as_tensor(timestep, dtype=torch.float32).detach().reshape(())
    if teacher is not None:
        state.update({TEACHER_PREFIX + k: v for k, v in teacher.state_dict().items()})
    if vae is not None:
        state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    write_safetensors(path, state, metadata={"format": "cleandift_full", "unet_config": unet_config_json(unet),
                                             "head_conditioning": heads.conditioning,
                                             **_conditioning_metadata(text_conditioning, encoder)})


def unet_config_json(unet: nn.Module) -> str:
    """The U-Net's constructor arguments as JSON (diffusers' private ``_*`` entries dropped)."""
    return json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")})


def load_student(path: str | Path, base: BaseModel | None = None) -> Student:
    """Read a student in either release format (detected from its keys).

    The U-Net architecture comes from the file's metadata when we wrote it, else from ``base``
    (the release's files carry no config). The metadata is untrusted: it is bounded and checked
    against the file's tensor shapes before any module is built (``config_check``); keys are
    checked strictly; the timestep must be finite and in [0, 999].
    """
    path = Path(path)
    meta = read_safetensors_metadata(path)
    shapes = read_safetensors_shapes(path)
    is_full = any(k.startswith(STUDENT_PREFIX) for k in shapes)
    if is_full:
        known = (STUDENT_PREFIX, TEACHER_PREFIX, VAE_PREFIX, *HEAD_PREFIXES)
        stray = [k for k in shapes if not k.startswith(known) and k != "timestep"]
        if stray:
            raise ValueError(f"{path} has keys that belong to no part of a '_full' release file: {stray[:5]}")
        unet_shapes = {k[len(STUDENT_PREFIX):]: v for k, v in shapes.items() if k.startswith(STUDENT_PREFIX)}
    else:
        if any(k.startswith(HEAD_PREFIXES) for k in shapes):
            raise ValueError(f"{path} holds projection heads but no '{STUDENT_PREFIX}*' U-Net keys: not a student file")
        unet_shapes = shapes
    unet = _student_unet_skeleton(path, meta, base, unet_shapes)
    state = read_safetensors(path)
    if is_full:
        unet_state = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
        timestep = float(state["timestep"].reshape(-1)[0]) if "timestep" in state else DEFAULT_STUDENT_TIMESTEP
        heads = ProjectionHeads.from_state_dict(state, str(path)) if any(k.startswith(HEAD_PREFIXES) for k in state) else None
    else:
        unet_state, heads = state, None
        try:
            timestep = float(meta.get("timestep", DEFAULT_STUDENT_TIMESTEP))
        except ValueError:
            raise ValueError(f"{path}: the timestep in its metadata, {meta['timestep']!r:.40}, is not a number") from None
    check_timestep(timestep, f"{path}: the student timestep")
    text_conditioning = read_text_conditioning(meta, path)
    encoder = read_student_encoder(meta, path)
    load_into(unet, unet_state, str(path))
    unet.eval().requires_grad_(False)
    return Student(unet=unet, timestep=timestep, heads=heads, source=str(path), text_conditioning=text_conditioning,
                   encoder=encoder)


def read_text_conditioning(meta: dict, path: str | Path) -> str | None:
    """The ``text_conditioning`` a student file's metadata records (None when it records none)."""
    if "text_conditioning" not in meta:
        return None
    return check_text_conditioning(meta["text_conditioning"], f"{path}: its text_conditioning metadata")


def read_student_encoder(meta: dict, path: str | Path) -> dict | None:
    """The fast encoder a student file says it was adapted to (None: the base VAE's encoder)."""
    if "encoder" not in meta:
        return None
    return check_reference(loads_json(meta["encoder"], f"{path}: its encoder metadata"), f"{path}: its encoder")


def _student_unet_skeleton(path: Path, meta: dict, base: BaseModel | None, shapes: dict) -> nn.Module:
    if "unet_config" in meta:
        config = loads_json(meta["unet_config"], f"{path}: its unet_config metadata")  # depth bounded
        return checked_unet(config, shapes, str(path))
    if base is not None:
        return checked_unet(dict(base.unet.config), shapes, f"{path} (architecture of base {base.source})")
    raise ValueError(f"{path} carries no U-Net config (a file of the public release): pass the base model "
                     "it was trained from (base=PATH) so its architecture is known")


def load_student_and_base(path: Path, base) -> tuple[Student, object]:
    """A student file needs ``base`` (VAE, text encoder); a diffusers folder can be its own base."""
    if path.is_dir():
        student_base = load_base(path, text_encoder=base is None)
        base_model = student_base if base is None else (base if not isinstance(base, (str, Path)) else load_base(base))
        return Student(unet=student_base.unet, timestep=DEFAULT_STUDENT_TIMESTEP, source=str(path)), base_model
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: unknown engine file type; expected .onnx, .plan, a student .safetensors "
                         "(_unet or _full) or a diffusers folder")
    if base is None:
        raise ValueError(f"{path} is a student checkpoint: pass base=DIR (the base model folder that provides "
                         "the VAE and text encoder), e.g. Engine(path, base='stable-diffusion-2-1')")
    base_model = load_base(base) if isinstance(base, (str, Path)) else base
    return load_student(path, base_model), base_model
