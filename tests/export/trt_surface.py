"""The real TensorRT Python API surface, read on a machine without CUDA or TensorRT's libraries.

The bindings wheels (``tensorrt-cu12-bindings``, ``tensorrt-cu13-bindings``, ~1.3 MB each) hold
only ``tensorrt_bindings/tensorrt.so``, which links ``libnvinfer.so.N``, ``libnvonnxparser.so.N``
and ``libnvinfer_plugin.so.N`` and imports about ten C functions from them. Stub libraries with
those SONAMEs that define those functions (returning NULL; attribute lookups never call them) let
the module import, and then every class, enum member, property and method is there to inspect,
with each method's argument names and types in the pybind11 signature of its ``__doc__``.

``surface(version)`` fetches the wheel with pip into a cache (reused between runs; ``Unavailable``
when the index cannot be reached), builds the stubs with the C compiler (SONAMEs from ``readelf
-d``, symbols from ``nm -D --undefined-only`` minus what the interpreter already resolves), and
imports the real module in a subprocess, which prints the surface as JSON (run this file with a
site folder to see it: ``LD_LIBRARY_PATH=STUBS python tests/export/trt_surface.py SITE``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# The versions the project supports (tensorrt>=10.12,<12): the oldest and the newest checked.
WHEELS = {"10.12": "tensorrt-cu12-bindings==10.12.0.36", "11.4": "tensorrt-cu13-bindings==11.4.0.106"}
CACHE = Path(os.environ.get("CLEANDIFT_TRT_BINDINGS_CACHE",
                            Path.home() / ".cache" / "cleandift-rt" / "trt-bindings"))
PACKAGE = "tensorrt_bindings"  # the wheels' import name; `pip install tensorrt` re-exports it as `tensorrt`


class Unavailable(RuntimeError):
    """The wheel, a tool or the platform is missing: the message is the test's one-line skip reason."""


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def fetch_wheel(version: str) -> Path:
    """The cached wheel for this interpreter, downloaded with pip the first time."""
    spec = WHEELS[version]
    name, number = spec.split("==")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    pattern = f"{name.replace('-', '_')}-{number}-{tag}-*.whl"
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    proc = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
                 spec], timeout=300, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    found = sorted(wheels.glob(pattern))
    if proc.returncode or not found:
        last = (proc.stderr.strip().splitlines() or ["no matching wheel"])[-1]
        raise Unavailable(f"cannot fetch {spec} for {tag} (package index unreachable?): {last[:200]}")
    return found[0]


def _extract(wheel: Path) -> Path:
    site = CACHE / wheel.stem / "site"
    if not (site / PACKAGE / "tensorrt.so").is_file():
        partial = site.with_name(f"site.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(partial)
        shutil.rmtree(site, ignore_errors=True)
        partial.rename(site)
    return site


def needed_nvidia_libraries(so: Path) -> list[str]:
    """SONAMEs of the TensorRT libraries the extension links (``readelf -d``'s NEEDED entries)."""
    out = _run(["readelf", "-d", str(so)], check=True).stdout
    return sorted(n for n in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out) if n.startswith("libnv"))


def missing_symbols(so: Path) -> list[str]:
    """Functions the extension imports that nothing in this process defines: TensorRT's own entry points."""
    import ctypes

    process = ctypes.CDLL(None)  # the interpreter, libc and what they loaded (Py_*, dlopen, ...)
    out = _run(["nm", "-D", "--undefined-only", str(so)], check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.split()[:1] == ["U"]]
    return sorted(n for n in names if "@" not in n and not hasattr(process, n))


def build_stubs(so: Path, folder: Path) -> Path:
    """One C file defining every missing function, compiled once per NEEDED SONAME into ``folder``."""
    libraries, symbols = needed_nvidia_libraries(so), missing_symbols(so)
    if not libraries or not symbols:
        raise RuntimeError(f"{so}: expected TensorRT libraries and symbols to stub, found {libraries} / {symbols}")
    if all((folder / lib).is_file() for lib in libraries):
        return folder
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise Unavailable("no C compiler (cc/gcc) to build the TensorRT stub libraries")
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "stubs.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in symbols))
    for lib in libraries:
        _run([compiler, "-shared", "-fPIC", "-o", str(folder / lib), f"-Wl,-soname,{lib}", str(source)], check=True)
    return folder


def surface(version: str) -> dict:
    """The real module's surface for one supported version (see ``dump``)."""
    if not sys.platform.startswith("linux"):
        raise Unavailable("the TensorRT bindings are checked on Linux only (ELF stubs with SONAMEs)")
    for tool in ("readelf", "nm"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} (binutils) is needed to read the TensorRT extension")
    site = _extract(fetch_wheel(version))
    so = site / PACKAGE / "tensorrt.so"
    stubs = build_stubs(so, site.parent / "stubs")
    library_path = os.pathsep.join(filter(None, [str(stubs), os.environ.get("LD_LIBRARY_PATH")]))
    env = dict(os.environ, LD_LIBRARY_PATH=library_path)
    proc = _run([sys.executable, __file__, str(site)], env=env, timeout=120)
    if proc.returncode:
        raise RuntimeError(f"importing the real {PACKAGE} {version} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


# -- the dump, run in the subprocess that imports the real module ---------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split a parameter list at commas outside brackets, angle brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>" and depth:
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def parse_params(text: str) -> list[dict]:
    """pybind11 parameters: ``name: type = default``; ``/`` ends positional-only, ``*`` starts keyword-only."""
    params, kind = [], "any"
    for part in _split_top_level(text):
        if part == "/":
            for p in params:
                p["kind"] = "positional"
            continue
        if part == "*":
            kind = "keyword"
            continue
        head, _, default = part.partition("=")
        name, _, annotation = head.partition(":")
        name = name.strip()
        if name.startswith("*"):
            params.append({"name": name, "type": "", "default": True, "kind": "variadic"})
            if not name.startswith("**"):
                kind = "keyword"  # what follows *args is keyword-only
            continue
        params.append({"name": name, "type": annotation.strip(), "default": bool(default.strip()), "kind": kind})
    return params


def parse_signatures(doc: str | None, name: str) -> list[dict]:
    """Every overload in a pybind11 docstring: ``[N. ]name(params) -> returns`` lines, ``self`` dropped."""
    pattern = re.compile(rf"^(?:\d+\.\s+)?{re.escape(name)}\((.*)\)\s*->\s*(.+?)\s*$")
    sigs = []
    for line in (doc or "").splitlines():
        m = pattern.match(line.strip())
        if not m or m.group(1) == "*args, **kwargs":  # the header of an overloaded function
            continue
        params = parse_params(m.group(1))
        bound = bool(params) and params[0]["name"] in ("self", "arg0") and name != ""
        sigs.append({"params": params[1:] if bound else params, "returns": m.group(2)})
    return sigs


def _python_signature(fn) -> list[dict]:
    kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "any",
             inspect.Parameter.KEYWORD_ONLY: "keyword"}
    params = [{"name": p.name, "type": "", "default": p.default is not inspect.Parameter.empty,
               "kind": kinds.get(p.kind, "variadic")} for p in inspect.signature(fn).parameters.values()]
    return [{"params": params, "returns": ""}]


_DEPRECATED = re.compile(r"\[DEPRECATED\]|Deprecated in TensorRT", re.IGNORECASE)


def _member_docs(doc: str | None) -> dict[str, str]:
    """Per-name text of a class docstring: enum members (``NAME : text``) and ``:ivar NAME: text``."""
    out = {}
    for line in (doc or "").splitlines():
        m = re.match(r"\s*(?::ivar\s+)?(\w+)\s?:\s(.*)", line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def dump(module) -> dict:
    """{"version", "module": {name: entry}, "classes": {qualname: {"bases", "members", "attrs"}}}."""
    classes: dict[str, dict] = {}

    def ours(cls) -> bool:
        return isinstance(cls, type) and cls.__module__.startswith(PACKAGE)

    def type_name(value) -> str:
        t = type(value)
        return t.__qualname__ if ours(t) else f"builtins.{t.__name__}"

    def visit(cls) -> str:
        qual = cls.__qualname__
        if qual in classes:
            return qual
        members = getattr(cls, "__members__", None)
        entry = {"bases": [b.__qualname__ for b in cls.__mro__[1:] if ours(b)], "attrs": {},
                 "members": {k: int(v) for k, v in members.items()} if isinstance(members, dict) else None}
        classes[qual] = entry
        docs = _member_docs(cls.__doc__)
        for name in dir(cls):
            if name.startswith("_") and name != "__init__":
                continue
            try:
                raw, value = inspect.getattr_static(cls, name), getattr(cls, name)
            except AttributeError:
                continue
            if isinstance(raw, property):
                fget = parse_signatures(raw.fget.__doc__, "") if raw.fget else []
                attr = {"kind": "property", "type": fget[0]["returns"] if fget else "",
                        "writable": raw.fset is not None, "doc": raw.__doc__ or ""}
            elif isinstance(value, type):
                attr = {"kind": "class", "qualname": visit(value) if ours(value) else value.__qualname__, "doc": ""}
            elif callable(value):
                if inspect.isfunction(value):  # Python helpers the package's __init__ attaches
                    sigs = _python_signature(value)
                    sigs[0]["params"] = [p for p in sigs[0]["params"] if p["name"] not in ("self", "this")]
                else:
                    sigs = parse_signatures(value.__doc__, name)
                attr = {"kind": "method", "signatures": sigs, "doc": value.__doc__ or ""}
            else:
                attr = {"kind": "value", "type": type_name(value), "doc": ""}
                if ours(type(value)) and hasattr(value, "__int__"):
                    attr["int"] = int(value)
            text = docs.get(name, "") + " " + attr.pop("doc")
            attr["deprecated"] = bool(_DEPRECATED.search(text))
            entry["attrs"][name] = attr
        return qual

    names = {}
    for name in [*dir(module), "__version__"]:
        if name.startswith("_") and name != "__version__":
            continue
        value = getattr(module, name)
        if ours(value):
            names[name] = {"kind": "class", "qualname": visit(value)}
        elif inspect.isfunction(value):
            names[name] = {"kind": "function", "signatures": _python_signature(value)}
        elif callable(value) and not isinstance(value, type):
            names[name] = {"kind": "function", "signatures": parse_signatures(value.__doc__, name)}
        else:
            names[name] = {"kind": "value", "type": type_name(value)}
    return {"version": module.__version__, "module": names, "classes": classes}


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    import tensorrt_bindings

    json.dump(dump(tensorrt_bindings), sys.stdout)
