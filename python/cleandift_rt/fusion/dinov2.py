"""DINOv2 patch features as "A Tale of Two Features" / "Telling Left from Right" use them (docs/method.md, zero-shot fusion).

The image goes on a square canvas (long side ``size``, centred, black padding), is normalised with
the ImageNet mean and std, and runs through a transformers ``Dinov2Model``; the result is the
tokens of the last block *before* the final LayerNorm (transformers' ``hidden_states[-1]``, not
``last_hidden_state``), CLS dropped, as a ``B x C x h x w`` map (``h = w = size / 14``).

Position embeddings are interpolated the torch-hub way, which both reference implementations ran:
bicubic with ``scale_factor = (grid + 0.1) / sqrt(N)``, no antialiasing, and no interpolation at
all when the grid is the checkpoint's own. transformers' own forward resizes to the exact output
size instead, which shifts every embedding a little; only the hub way reproduces the reference
numbers.

Weights come from the user's disk only: a transformers ``Dinov2Model`` folder (safetensors), a
``.safetensors`` file of a torch-hub checkpoint (converted on load, ``hub_checkpoint``), or the
hub's pickled ``.pth`` with an explicit ``allow_pickle=True`` (then ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import check_state_dict, read_safetensors
from .canvas import square_canvas
from .hub_checkpoint import hub_config, hub_to_transformers, is_hub_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_INTERPOLATE_OFFSET = 0.1
DEFAULT_SIZE = 840


def hub_position_embeddings(position_embeddings: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[1, 1 + N, D]`` checkpoint embeddings -> ``[1, 1 + grid_h * grid_w, D]`` as torch-hub DINOv2
    computes them (``interpolate_pos_encoding`` with ``interpolate_offset=0.1``, no antialias)."""
    n = position_embeddings.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} position embeddings do not form a square grid")
    if grid_h == grid_w and grid_h * grid_w == n:
        return position_embeddings
    dim = position_embeddings.shape[-1]
    cls, patch = position_embeddings[:, :1], position_embeddings[:, 1:].float()
    patch = patch.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid_h + HUB_INTERPOLATE_OFFSET) / side, (grid_w + HUB_INTERPOLATE_OFFSET) / side)
    patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (grid_h, grid_w):  # the offset guards against exactly this rounding
        raise RuntimeError(f"hub interpolation gave a {tuple(patch.shape[-2:])} grid, expected {(grid_h, grid_w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(position_embeddings.dtype)
    return torch.cat([cls, patch], dim=1)


def _load_pickle(path: Path) -> dict:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (a torch-hub DINOv2 .pth does)")
    return state


def load_dinov2(path, allow_pickle: bool = False):
    """A ``Dinov2Model`` (eval mode, fp32, CPU) from a folder, a hub ``.safetensors`` or (opt-in) a hub ``.pth``."""
    from transformers import Dinov2Model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DINOv2 weights {path} do not exist (a transformers Dinov2Model folder, or a "
                                "torch-hub checkpoint converted to .safetensors)")
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{path} holds no .safetensors weights: cleandift-rt loads no pickles (save the model "
                             "with save_pretrained(..., safe_serialization=True))")
        try:
            return Dinov2Model.from_pretrained(str(path), local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a transformers Dinov2Model folder: {exc}") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle; pickles can run code, so they load only with allow_pickle=True "
                             "(then through torch.load(weights_only=True)). Better: convert it once with "
                             "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'dinov2.safetensors')`")
        state = _load_pickle(path)
    else:
        state = read_safetensors(path)
    if not is_hub_state_dict(state):
        raise ValueError(f"{path} is not a torch-hub DINOv2 checkpoint (no pos_embed / patch_embed.proj.weight); "
                         "for a transformers model pass its folder")
    config = hub_config(state)
    model = Dinov2Model(config).eval()
    try:
        converted = hub_to_transformers(state, config, model.state_dict().keys())
    except KeyError as exc:
        raise ValueError(f"{path}: the DINOv2 hub checkpoint lacks {exc.args[0]!r} (truncated or another model)") from None
    check_state_dict(model.state_dict(), converted, str(path))
    model.load_state_dict(converted, strict=True)
    return model


class Dinov2Features:
    """DINOv2 pre-LayerNorm patch features ``B x C x h x w`` of images on a ``size`` x ``size`` canvas.

    Args:
        path: a transformers ``Dinov2Model`` folder, a torch-hub checkpoint as ``.safetensors``, or a
            hub ``.pth`` with ``allow_pickle=True``.
        size: canvas side in pixels, a multiple of the patch size (default 840: 60 x 60 patches).
        device: torch device (default: CUDA when available, else CPU).
    """

    def __init__(self, path, size: int = DEFAULT_SIZE, *, device=None, allow_pickle: bool = False):
        self.path = Path(path)
        self.model = load_dinov2(self.path, allow_pickle=allow_pickle)
        self.patch = int(self.model.config.patch_size)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < self.patch or size % self.patch:
            raise ValueError(f"size must be a positive multiple of the patch size {self.patch}, got {size!r} "
                             f"(840 = 60 patches, as the reference)")
        self.size = int(size)
        self.grid = self.size // self.patch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)

    @property
    def channels(self) -> int:
        return int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return f"Dinov2Features({str(self.path)!r}, size={self.size}, {self.channels} channels, {self.grid}x{self.grid})"

    @torch.no_grad()
    def canvas_features(self, canvas: torch.Tensor) -> torch.Tensor:
        """``B x 3 x size x size`` canvases in [0, 1] -> ``B x C x grid x grid`` float32 (on the CPU)."""
        if canvas.ndim != 4 or tuple(canvas.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"canvases must be B x 3 x {self.size} x {self.size}, got {tuple(canvas.shape)}")
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        pixels = ((canvas.float() - mean) / std).to(self.device)
        emb = self.model.embeddings
        tokens = emb.patch_embeddings(pixels)
        tokens = torch.cat([emb.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + hub_position_embeddings(emb.position_embeddings, self.grid, self.grid)
        hidden = self.model.encoder(tokens).last_hidden_state  # the last block's output, before the LayerNorm
        b, _, c = hidden.shape
        return hidden[:, 1:].reshape(b, self.grid, self.grid, c).permute(0, 3, 1, 2).float().cpu().contiguous()

    def features(self, images):
        """Patch features of ``images`` (as ``Engine.extract`` takes them): ``B x C x h x w``; torch in ->
        torch out (on the input's device), else numpy."""
        canvas, _ = square_canvas(images, self.size)
        out = self.canvas_features(canvas)
        if isinstance(images, torch.Tensor):
            return out.to(images.device)
        return out.numpy()

    __call__ = features
