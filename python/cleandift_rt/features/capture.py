"""Tap capture on any diffusers ``UNet2DConditionModel`` without copying its code.

Forward hooks on the modules of the tap table record the outputs; once everything requested has
been recorded, the last hook raises an internal signal that ends the forward there, so decoder
blocks after it (and ``conv_norm_out`` / ``conv_out``) are never computed. Works in eager mode,
under autocast and under ``torch.jit.trace`` (the ONNX exporter), where the graph then simply ends
at the last tap.

:func:`unet_capture` reaches further with the same mechanism: the taps of the table, the outputs
of other modules named by their diffusers path (e.g. ``up_blocks.3``, the last decoder block's
output) and the softmax probabilities of cross-attention layers, which diffusers' default SDPA
processor never materialises: for exactly those layers, and only for that call, a processor that
computes them explicitly replaces it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterable, Sequence

import torch
from torch import nn

from ..taps import TAP_TABLE, TAPS, resolve_taps
from ..timesteps import check_unet_timestep

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


def _module(unet: nn.Module, path: str) -> nn.Module:
    try:
        return unet.get_submodule(path)
    except AttributeError:
        raise ValueError(f"this U-Net has no module {path!r}: pass a diffusers module path such as 'up_blocks.3' "
                         "(print(unet) lists them)") from None


def _is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) and hasattr(module, "get_attention_scores")


def cross_attention_layers(unet: nn.Module, up_blocks: Iterable[int]) -> tuple[str, ...]:
    """Module paths of the cross-attention layers (``attn2``) inside the given decoder blocks, in run order."""
    paths = []
    for index in up_blocks:
        block = _module(unet, f"up_blocks.{index}")
        found = [f"up_blocks.{index}.{name}" for name, m in block.named_modules() if _is_cross_attention(m)]
        if not found:
            raise ValueError(f"up_blocks.{index} has no cross-attention layers (SD's decoder has them in blocks 1-3)")
        paths += found
    return tuple(paths)


class _ProbabilityProcessor:
    """diffusers' ``AttnProcessor`` math with the probabilities kept: ``softmax(q k^T * scale)`` over the
    text tokens, averaged over heads (``B x N x L``), handed to ``record`` before they weight the values."""

    def __init__(self, record):
        self.record = record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        self.record(probs.unflatten(0, (batch, attn.heads)).mean(1))  # (B*heads, N, L) is batch-major
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def check_unet_inputs(unet: nn.Module, sample, timestep, encoder_hidden_states) -> None:
    """Clear errors for what the U-Net would otherwise fail on deep inside (or silently turn into NaN)."""
    check_unet_timestep(timestep, "U-Net timestep")
    config = getattr(unet, "config", None)
    if config is None:
        return  # not a diffusers model: nothing known to check against
    if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
        raise ValueError(f"latents must be a B x {config.in_channels} x h x w tensor, got "
                         f"{tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__}")
    factor = 2 ** (len(config.block_out_channels) - 1)
    b, c, h, w = sample.shape
    if c != config.in_channels or h % factor or w % factor or b == 0:
        raise ValueError(f"latents of shape {tuple(sample.shape)}: this U-Net takes B x {config.in_channels} x h x w "
                         f"with B >= 1 and h, w multiples of {factor} (images of multiples of {8 * factor} px)")
    e = encoder_hidden_states
    if not isinstance(e, torch.Tensor) or e.ndim != 3 or e.shape[0] != b or e.shape[2] != config.cross_attention_dim:
        raise ValueError(f"encoder_hidden_states must be [{b}, L, {config.cross_attention_dim}] text embeddings, got "
                         f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")


def unet_capture(unet: nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                 taps: Sequence[str] = (), modules: Sequence[str] = (), attention_probs: Sequence[str] = (),
                 **unet_kwargs) -> dict[str, torch.Tensor]:
    """Run ``unet`` and return what was asked for, stopping the forward once all of it is recorded.

    ``taps``: names of the tap table (``B x C x h x w``); ``modules``: other module paths whose
    output to record, e.g. ``"up_blocks.3"``; ``attention_probs``: cross-attention layer paths
    (:func:`cross_attention_layers`) whose head-averaged probabilities ``B x (h*w) x L`` to record.
    Keys of the result: the tap names, then the module paths, then the attention paths.
    ``unet_kwargs`` go to the U-Net's forward (e.g. ControlNet's ``down_block_additional_residuals``).
    Taps and module outputs equal forward hooks bit for bit; the forward is unchanged except that
    the asked-for attention layers compute their softmax explicitly (float rounding apart, the same).
    """
    check_unet_inputs(unet, sample, timestep, encoder_hidden_states)
    tap_names = resolve_taps(taps) if taps else ()
    if tap_names:
        check_unet_topology(unet)
    hooked = {name: _module(unet, TAP_TABLE[name].module) for name in tap_names}
    hooked.update({path: _module(unet, path) for path in modules})
    attention = {path: _module(unet, path) for path in attention_probs}
    wrong = [p for p, m in attention.items() if not _is_cross_attention(m)]
    if wrong:
        raise ValueError(f"{wrong} are not cross-attention layers: use cross_attention_layers(unet, up_blocks)")
    if not hooked and not attention:
        raise ValueError("nothing to capture: pass taps, modules or attention_probs")
    order = [*hooked, *attention]
    captured: dict[str, torch.Tensor] = {}
    outstanding = set(order)

    def keep(name: str, value: torch.Tensor) -> None:
        captured[name] = value
        outstanding.discard(name)
        if not outstanding:
            raise _StopForward

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            keep(name, _as_tensor(output))

        return hook

    with _lock_for(unet):
        handles = [m.register_forward_hook(make_hook(n)) for n, m in hooked.items()]
        processors = {p: m.processor for p, m in attention.items()}
        try:
            for path, m in attention.items():
                m.set_processor(_ProbabilityProcessor(lambda probs, path=path: keep(path, probs)))
            unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **unet_kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
            for path, processor in processors.items():
                attention[path].set_processor(processor)
    missing = [n for n in order if n not in captured]
    if missing:
        what = "taps" if all(n in TAP_TABLE for n in missing) else "outputs"
        raise RuntimeError(f"{what} {missing} were not produced by the U-Net forward; the module layout is not SD's")
    return {n: captured[n] for n in order}


def unet_taps(unet: nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
              taps=None) -> dict[str, torch.Tensor]:
    """Run ``unet`` and return ``{tap: B x C x h x w}`` for the requested taps (all when ``None``).

    The forward stops right after the last requested tap. Values equal forward hooks on the
    modules of the tap table bit for bit (they are such hooks).
    """
    return unet_capture(unet, sample, timestep, encoder_hidden_states, taps=resolve_taps(taps))
