"""Tap capture on any diffusers ``UNet2DConditionModel`` without copying its code.

Forward hooks on the modules of the tap table record the outputs; the hook of the last requested
tap raises an internal signal that ends the forward there, so decoder blocks after it (and
``conv_norm_out`` / ``conv_out``) are never computed. Works in eager mode, under autocast and
under ``torch.jit.trace`` (the ONNX exporter), where the graph then simply ends at the last tap.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from ..taps import TAP_TABLE, TAPS, resolve_taps

# Hooks live on the module, so two threads tapping the same U-Net at once would see each other's
# hooks: serialise per U-Net (compute inside is multi-threaded anyway).
_locks: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


class _StopForward(Exception):
    pass


def _lock_for(unet: nn.Module) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(unet)
        if lock is None:
            lock = _locks[unet] = threading.Lock()
        return lock


def _as_tensor(output) -> torch.Tensor:
    # Transformer2DModel returns an output object (or tuple with return_dict=False).
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot take a tensor from a module output of type {type(output).__name__}")


def check_unet_topology(unet: nn.Module) -> None:
    """Fail early, naming the module, when a U-Net lacks the SD decoder layout of the tap table."""
    for name in TAPS:
        path = TAP_TABLE[name].module
        try:
            unet.get_submodule(path)
        except AttributeError:
            raise ValueError(f"this U-Net has no module {path!r} for tap {name!r}: cleandift-rt needs the SD 1.x/2.x "
                             "decoder layout (4 up blocks, layers_per_block=2, cross-attention in the last three)") from None


def unet_taps(unet: nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
              taps=None) -> dict[str, torch.Tensor]:
    """Run ``unet`` and return ``{tap: B x C x h x w}`` for the requested taps (all when ``None``).

    The forward stops right after the last requested tap. Values equal forward hooks on the
    modules of the tap table bit for bit (they are such hooks).
    """
    wanted = resolve_taps(taps)
    check_unet_topology(unet)
    last = wanted[-1]
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            captured[name] = _as_tensor(output)
            if name == last:
                raise _StopForward

        return hook

    with _lock_for(unet):
        handles = [unet.get_submodule(TAP_TABLE[n].module).register_forward_hook(make_hook(n)) for n in wanted]
        try:
            unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
    missing = [n for n in wanted if n not in captured]
    if missing:
        raise RuntimeError(f"taps {missing} were not produced by the U-Net forward; the module layout is not SD's")
    return {n: captured[n] for n in wanted}
