"""Fused projection head: ``project(features, t, heads, tap)`` == ``heads(tap, features, t)``.

The native kernel (``csrc/ops/project_head*``) runs the three modulated SwiGLU layers of a head on
tiles of pixels that stay in cache (CPU) instead of six full-size tensors per layer. Both head kinds
run there: AdaRMS (the release) and FiLM (``heads.conditioning == "film"``). What is cheap and
shared stays in PyTorch: ``cond(t)`` and each layer's modulation (``1 + scale``, and FiLM's shift;
computed once per t and cached), and the weights, packed once per head into the micro-kernel's panel
layout (re-packed automatically when the head's parameters change).

Precision (CPU): ``precision="bf16"`` packs the weights as bf16 and rounds both GEMMs' inputs
(the normalised, modulated rows and the SwiGLU output) to bf16, summing products in fp32 (AMX-BF16
tiles, else AVX512_BF16); RMS statistics, SwiGLU and the residual stream stay fp32. The default
follows the features: bf16 features use it where the CPU has native bf16, everything else fp32.
Without native bf16, ``"bf16"`` warns once and runs fp32. The CUDA kernel is exact fp32 whatever
the precision.
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import torch

from ..build_info import native
from ..models.heads import COND_DIM, ProjectionHeads
from ..timesteps import check_timestep
from .precision import NATIVE_COMPUTE, check_precision, kernel_precision

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_MODULATION_CACHE_SIZE = 16


class _HeadCache:
    """Packed weights and modulations of one ProjectionHeads module, per tap."""

    def __init__(self):
        self.packed: dict[tuple, object] = {}
        self.modulations: dict[tuple, tuple] = {}
        # project releases the GIL in the kernel, so callers on several threads share this cache.
        self.lock = threading.Lock()


_caches: "weakref.WeakKeyDictionary[ProjectionHeads, _HeadCache]" = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _params_key(heads: ProjectionHeads, tap: str, device: torch.device, compute: str,
                kernel: str | None) -> tuple:
    """(tap, device, compute, kernel) + the parameters' identities: packings are per micro-kernel
    layout (CLEANDIFT_CPU_KERNEL may change the kernel between calls)."""
    params = list(heads.adapters[tap].parameters()) + list(heads.mapping.parameters()) + \
        [heads.time_in_proj.weight, heads.time_emb.weight]
    return ((tap, str(device), compute, kernel) + tuple((p.data_ptr(), p._version) for p in params)
            + (_sampled(params),))


def _sampled(params) -> str:
    """A digest of a strided sample of every parameter (up to ~1024 values each): a write through
    ``p.data`` (``p.data.copy_(...)``), which no version counter sees, changes it, so the packing and
    the modulations are computed again instead of the old weights being used."""
    with torch.no_grad():
        sample = torch.cat([p.detach().reshape(-1)[:: max(1, p.numel() // 1024)].float() for p in params])
    return hashlib.blake2b(sample.cpu().numpy().tobytes(), digest_size=16).hexdigest()


def _stacked_weights(heads: ProjectionHeads, tap: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    layers = heads.adapters[tap].layers
    up = torch.stack([layer.up_proj.weight.detach().float() for layer in layers]).to(device).contiguous()
    down = torch.stack([layer.down_proj.weight.detach().float() for layer in layers]).to(device).contiguous()
    return up, down


def _made_here(device: torch.device):
    """For tensors cached on a GPU: an event on the stream that made them (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _reuse(tensors, made, device: torch.device) -> None:
    """A cached GPU tensor made on one stream and read on another: the reader waits for its making,
    and the allocator learns that this stream uses it (so an evicted entry is not reused early)."""
    if made is None:
        return
    stream = torch.cuda.current_stream(device)
    stream.wait_event(made)
    for tensor in tensors:
        tensor.record_stream(stream)


def _modulation(heads: ProjectionHeads, tap: str, t, batch: int, cache: _HeadCache,
                key: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scales, shifts)``, each [3, B, D] float32 (shifts None for AdaRMS): the layers' modulation
    of cond(t), computed once per t."""
    if isinstance(t, torch.Tensor) and t.ndim == 2:  # a cond [B, 256] given directly
        if t.shape != (batch, COND_DIM):
            raise ValueError(f"a cond tensor must be [B={batch}, {COND_DIM}], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"a cond tensor must be floating point (heads.cond(t) makes one), got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("the cond tensor holds NaN or Inf: every projected feature would be NaN; pass the cond "
                             "of finite timesteps (heads.cond(t))")
        cond, t_key = t, None
    else:
        try:
            check_timestep(t)  # before the cache: t=False must not hit the entry of t=0
            t_vals = torch.as_tensor(t, dtype=torch.float32).flatten().tolist()
        except TypeError:
            raise TypeError(f"t must be a number, a 1-D tensor of B timesteps or a [B, {COND_DIM}] cond tensor, "
                            f"got {type(t).__name__} {t!r:.40}") from None
        t_key = key + (tuple(t_vals), batch)
        if t_key in cache.modulations:
            modulation, made = cache.modulations[t_key]
            _reuse([m for m in modulation if m is not None], made, modulation[0].device)
            return modulation
        with torch.no_grad():
            cond = heads.cond(t, batch=batch)
        if cond.shape[0] != batch:
            raise ValueError(f"got {cond.shape[0]} timesteps for a batch of {batch}")
    with torch.no_grad():
        layers = heads.adapters[tap].layers
        cond = cond.float().to(layers[0].up_proj.weight.device)  # fp32 whatever the heads' dtype
        scale_list, shift_list = zip(*(layer.modulation(cond) for layer in layers))
        scales = torch.stack(scale_list).contiguous()
        shifts = None if shift_list[0] is None else torch.stack(shift_list).contiguous()  # FiLM only
    modulation = (scales, shifts)
    if t_key is not None:
        if len(cache.modulations) >= _MODULATION_CACHE_SIZE:
            cache.modulations.pop(next(iter(cache.modulations)))
        cache.modulations[t_key] = (modulation, _made_here(scales.device))
    return modulation


def _check_finite(features: torch.Tensor) -> None:
    if torch.isfinite(features).all():  # one pass on the hot path; the position only on failure
        return
    b, c, y, x = (int(i) for i in (~torch.isfinite(features)).nonzero()[0])
    raise ValueError(f"features contain NaN or Inf (first at batch {b}, channel {c}, pixel y={y} x={x}); "
                     "clean them or pass allow_nonfinite=True to propagate them as PyTorch would")


def project(features: torch.Tensor, t, heads: ProjectionHeads, tap: str, *, precision: str | None = None,
            allow_nonfinite: bool = False) -> torch.Tensor:
    """The projection head of ``tap`` on ``features [B, D, h, w]`` at timestep(s) ``t``.

    ``t``: an int / float, a 1-D tensor of B timesteps, or a ``[B, 256]`` cond tensor. Returns a
    tensor like ``features`` (same dtype and device; float32, float16 or bfloat16; CPU, or CUDA when
    built with CUDA) equal to ``heads(tap, features, t)``: within 1e-5 relative in float32, 1e-2 in
    half precision (the kernel keeps fp32 between layers where PyTorch rounds each op).
    NaN / Inf features raise ``ValueError`` naming the first one; ``allow_nonfinite=True`` skips
    the check (non-finite values then spread through their pixel's outputs, as in PyTorch).
    ``precision``: ``"fp32"``, ``"bf16"`` or None (bf16 for bf16 features where the CPU has native
    bf16, else fp32); see the module docstring. The bf16 path is within about 1e-2 relative of fp32.
    """
    if not isinstance(heads, ProjectionHeads):
        raise TypeError(f"heads must be a cleandift_rt.ProjectionHeads, got {type(heads).__name__}")
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dtype not in _DTYPES:
        raise TypeError(f"features have dtype {features.dtype}; use float32, float16 or bfloat16")
    check_precision(precision)
    b, c, h, w = heads.check_features(tap, features)
    if b == 0 or h * w == 0:
        raise ValueError(f"features are empty (shape {tuple(features.shape)})")
    features = features.detach()
    dev = features.device
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"project runs on CPU or CUDA tensors, got device {dev}")
    if not allow_nonfinite:
        _check_finite(features)

    compute = kernel_precision(features.dtype, precision) if dev.type == "cpu" else "fp32"
    kernel = native().cpu_kernel(NATIVE_COMPUTE[compute]) if dev.type == "cpu" else None
    with _caches_lock:
        cache = _caches.setdefault(heads, _HeadCache())
    key = _params_key(heads, tap, dev, compute, kernel)
    with cache.lock:
        scales, shifts = (None if m is None else m.to(dev) for m in _modulation(heads, tap, t, b, cache, key))
        if key not in cache.packed:
            for old in [k for k in cache.packed if k[:4] == key[:4]]:  # stale packing of changed weights
                del cache.packed[old]
            up, down = _stacked_weights(heads, tap, dev)
            cache.packed[key] = ((native().pack_head(up.numpy(), down.numpy(), NATIVE_COMPUTE[compute])
                                  if dev.type == "cpu" else (up, down)), _made_here(dev))
        packed, made = cache.packed[key]
        if dev.type == "cuda":
            _reuse(packed, made, dev)

    rows = features.flatten(2).transpose(1, 2)  # [B, P, D] view, no copy
    dtype = _DTYPES[features.dtype]
    if dev.type == "cpu":
        out = torch.empty_like(features, memory_format=torch.contiguous_format)
        out_rows = out.flatten(2).transpose(1, 2)
        as_np = (lambda x: x.view(torch.int16).numpy()) if features.dtype == torch.bfloat16 else (lambda x: x.numpy())
        native().project_cpu(packed, as_np(rows), as_np(out_rows), dtype, scales.numpy(), heads.conditioning,
                             None if shifts is None else shifts.numpy())
        return out
    if not native().build_info()["cuda_compiled"]:
        raise RuntimeError("project got CUDA tensors but this build of cleandift_rt has no CUDA kernels")
    rows = rows.contiguous()
    out_rows = torch.empty_like(rows)
    up, down = packed
    with torch.cuda.device(dev):
        native().project_cuda(rows.data_ptr(), out_rows.data_ptr(), b, h * w, c, dtype, up.data_ptr(),
                              down.data_ptr(), scales.data_ptr(), torch.cuda.current_stream().cuda_stream,
                              heads.conditioning, 0 if shifts is None else shifts.data_ptr())
    return out_rows.transpose(1, 2).reshape(b, c, h, w)

