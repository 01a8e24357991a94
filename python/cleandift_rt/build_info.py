"""What this installation can do: native build, SIMD found at run time, CUDA, TensorRT, ONNX Runtime."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform


def native():
    """The compiled extension, or an ImportError that says how to get it."""
    try:
        from . import _native
    except ImportError as exc:
        raise ImportError(f"cleandift_rt._native is not built ({exc}); install the package with "
                          "`pip install .` (a C++17 compiler and CMake >= 3.24 are needed)") from None
    return _native


def _module_version(name: str) -> dict:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # a broken install can raise more than ImportError
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return {"available": True, "version": getattr(mod, "__version__", "unknown")}


def build_info() -> dict:
    """A plain dict describing this installation; ``cuda_compiled`` says whether CUDA kernels were built."""
    info: dict = {"package_version": _package_version(), "python": platform.python_version(),
                  "machine": platform.machine()}
    try:
        info.update(native().build_info())
        info["native"] = True
    except ImportError as exc:
        info.update(native=False, native_error=str(exc), cuda_compiled=False, simd=[], cuda_devices=[])
    ort = _module_version("onnxruntime")
    if ort["available"]:
        import onnxruntime

        ort["providers"] = onnxruntime.get_available_providers()
    info["onnxruntime"] = ort
    info["tensorrt"] = _module_version("tensorrt")
    torch_info = _module_version("torch")
    if torch_info["available"]:
        import torch

        torch_info["cuda_available"] = torch.cuda.is_available()
        torch_info["threads"] = torch.get_num_threads()
    info["torch"] = torch_info
    return info


def _package_version() -> str:
    try:
        return importlib.metadata.version("cleandift-rt")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def format_build_info(info: dict | None = None) -> str:
    info = info or build_info()
    lines = [f"cleandift-rt {info['package_version']} (python {info['python']}, {info['machine']})"]
    if info.get("native"):
        lines.append(f"  native module : {info['compiler']}; SIMD at run time: {', '.join(info['simd']) or 'none (portable)'}; "
                     f"L2 {info['l2_cache_bytes'] >> 10} KiB per core")
        if info["cuda_compiled"]:
            lines.append(f"  CUDA kernels  : compiled for sm_{info['cuda_archs'].replace(',', ', sm_')} "
                         f"(toolkit {info['cuda_toolkit']})")
            devs = ", ".join(f"{d['name']} (sm {d['capability']})" for d in info["cuda_devices"])
            lines.append(f"  CUDA devices  : {devs or 'none'} [{info['cuda_status']}]")
        else:
            lines.append(f"  CUDA kernels  : not compiled ({info['cuda_status']})")
    else:
        lines.append(f"  native module : MISSING ({info['native_error']})")
    for name in ("onnxruntime", "tensorrt", "torch"):
        m = info[name]
        if m["available"]:
            extra = f", providers: {', '.join(m['providers'])}" if "providers" in m else ""
            lines.append(f"  {name:<14}: {m['version']}{extra}")
        else:
            lines.append(f"  {name:<14}: not available ({m['reason']})")
    return "\n".join(lines)
