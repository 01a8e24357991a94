"""Timesteps as they enter the package, checked once there (docs/method.md).

- ``check_timestep`` for the projection heads, ``project`` and the timesteps files carry in their
  metadata: finite numbers in [0, 999], the range of the noise schedule the heads were trained
  on. Fractions are kept as they are (the heads embed ``t / 999`` continuously; nothing rounds).
- ``check_unet_timestep`` for the U-Net entry points: any finite number (the hyperfeatures
  one-step call uses -1, docs/method.md, Diffusion Hyperfeatures; DDIM inversion passes fractional steps).

Both refuse booleans (``True`` is 1 to Python, never a timestep a user meant), NaN and Inf, and
name what they got. Tensors are accepted where a batch of timesteps makes sense.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

T_MIN, T_MAX = 0.0, 999.0


def _values(t, what: str) -> list[float]:
    if isinstance(t, (bool, np.bool_)) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
        raise TypeError(f"{what} must be a number, got the boolean {t!r}")
    if isinstance(t, torch.Tensor):
        if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
            raise TypeError(f"{what} must be numeric, got a {t.dtype} tensor")
        return [float(v) for v in t.detach().flatten().cpu().tolist()]
    if isinstance(t, np.ndarray):
        if t.dtype.kind not in "iuf":
            raise TypeError(f"{what} must be numeric, got an array of {t.dtype}")
        return [float(v) for v in t.ravel()]
    if isinstance(t, (list, tuple)):
        out = []
        for v in t:
            out.extend(_values(v, what))
        return out
    if isinstance(t, numbers.Real):
        return [float(t)]
    raise TypeError(f"{what} must be a number (or a 1-D tensor of them), got {type(t).__name__} {t!r:.40}")


def check_timestep(t, what: str = "timestep t"):
    """``t`` unchanged when every value is finite and in [0, 999]; else a ValueError/TypeError."""
    values = _values(t, what)
    if not values:
        raise ValueError(f"{what} is empty")
    bad = [v for v in values if not math.isfinite(v) or not T_MIN <= v <= T_MAX]
    if bad:
        raise ValueError(f"{what} must be finite (not NaN or Inf) and in [{T_MIN:g}, {T_MAX:g}] (the noise schedule "
                         f"the heads were trained on), got {bad[0]!r}")
    return t


def check_unet_timestep(t, what: str = "U-Net timestep"):
    """``t`` unchanged when every value is finite (-1, the one-step hyperfeatures call, included)."""
    values = _values(t, what)
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what} must be finite (not NaN or Inf), got {bad[0]!r}")
    return t
