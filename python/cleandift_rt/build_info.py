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
    if info.get("cuda_compiled"):
        info["cuda_status"] = cuda_driver_status(info)
    ort = _module_version("onnxruntime")
    if ort["available"]:
        import onnxruntime

        ort["providers"] = onnxruntime.get_available_providers()
        ort["distribution"] = _onnxruntime_distribution()
    info["onnxruntime"] = ort
    info["openvino"] = _module_version("openvino")
    info["tensorrt"] = _module_version("tensorrt")
    torch_info = _module_version("torch")
    if torch_info["available"]:
        import torch

        torch_info["cuda_available"] = torch.cuda.is_available()
        torch_info["threads"] = torch.get_num_threads()
    info["torch"] = torch_info
    return info


# The oldest driver branch that runs each CUDA runtime major version (NVIDIA's compatibility table):
# cudaDriverGetVersion's number for that CUDA version, and the branch users look for.
DRIVER_FOR_RUNTIME = {13: (13000, "R580"), 12: (12000, "R525")}


def required_driver(toolkit: str) -> tuple[int, str] | None:
    """(driver CUDA version number, driver branch) the statically linked runtime of ``toolkit`` needs."""
    try:
        major = int(str(toolkit).split(".")[0])
    except ValueError:
        return None
    return DRIVER_FOR_RUNTIME.get(major)


def cuda_driver_status(info: dict) -> str:
    """The native module's CUDA status, saying which driver to install when the one present is too old."""
    status = info.get("cuda_status", "")
    need = required_driver(info.get("cuda_toolkit", ""))
    driver = int(info.get("cuda_driver_version") or 0)
    if need is None or (driver and driver >= need[0]):
        return status
    have = f"this driver supports CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "no NVIDIA driver found"
    return (f"{status}: {have}; the CUDA {info['cuda_toolkit']} runtime linked into cleandift_rt needs an NVIDIA "
            f"driver {need[1]} or newer")


def cpu_kernels(info: dict) -> str:
    """Which CPU kernels match / project run (fp32, bf16) and why: AMX's absence, a forced kernel."""
    error = info["cpu_kernel_error"]
    none_bf16 = "refused" if error else "none (no native bf16: precision='bf16' runs fp32)"
    text = f"fp32 {info['match_cpu_kernel'] or 'refused'}, bf16 {info['cpu_kernel_bf16'] or none_bf16}"
    if info["amx_unavailable"] and info["amx_unavailable"] not in (error or ""):
        text += f"; AMX not used: {info['amx_unavailable']}"
    if error:
        text += f"; {error}"
    elif info["cpu_kernel_forced"]:
        text += f"; chosen by CLEANDIFT_CPU_KERNEL={info['cpu_kernel_forced']}"
    return text


def _onnxruntime_distribution() -> str:
    """Which package provides ``import onnxruntime``: the CPU build or onnxruntime-gpu (they share the name)."""
    found = []
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            importlib.metadata.version(dist)
            found.append(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return " + ".join(found) if found else "unknown"


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
        lines.append(f"  CPU kernels   : {cpu_kernels(info)}")
        if info["cuda_compiled"]:
            lines.append(f"  CUDA kernels  : compiled for sm_{info['cuda_archs'].replace(',', ', sm_')} "
                         f"(toolkit {info['cuda_toolkit']})")
            devs = ", ".join(f"{d['name']} (sm {d['capability']})" for d in info["cuda_devices"])
            lines.append(f"  CUDA devices  : {devs or 'none'} [{info['cuda_status']}]")
        else:
            lines.append(f"  CUDA kernels  : not compiled ({info['cuda_status']})")
    else:
        lines.append(f"  native module : MISSING ({info['native_error']})")
    for name in ("onnxruntime", "openvino", "tensorrt", "torch"):
        m = info[name]
        if m["available"]:
            extra = f", providers: {', '.join(m['providers'])}" if "providers" in m else ""
            if m.get("distribution", name) not in (name, "unknown"):
                extra += f" (from {m['distribution']})"
            lines.append(f"  {name:<14}: {m['version']}{extra}")
        else:
            lines.append(f"  {name:<14}: not available ({m['reason']})")
    return "\n".join(lines)
