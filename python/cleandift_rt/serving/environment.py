"""Where the server runs: PyTriton's two requirements on its Python, checked and met.

1. **numpy < 2.** ``nvidia-pytriton`` 0.7 pins it, and the pin is real: measured with numpy 2.4 the
   server starts and answers, but every output tensor arrives empty. This project's own environment
   has numpy 2 (onnx's ``ml_dtypes`` 0.7, pandas 3 and OpenCV 5 need it), so the server gets an
   environment of its own: either a separate virtual environment (``pip install ".[serve,cpu]"``,
   pip then resolves every package for numpy 1.26), or a thin one *layered* over an existing
   environment (``layered_env``): numpy 1.26, ``ml_dtypes`` 0.5 and PyTriton in its own
   site-packages, everything else (torch, ONNX Runtime, OpenVINO, this package) read from the base.
   Extension modules built against numpy 2 run on numpy 1.x by numpy's ABI rules (checked here:
   torch, ONNX Runtime, OpenVINO, onnx and this package's kernels import and serve).
2. **The same libpython.** PyTriton's Python-backend stub links ``libpythonX.Y.so.1.0`` by name. When
   the dynamic loader finds another build of that version first (the system's Python beside a pyenv
   or conda interpreter), model loading fails deep inside the stub (``'_thread.RLock' object has no
   attribute '_recursion_count'``). ``libpython_fix`` asks the loader (``ldd``) which library the
   stub would get and, when it is not this interpreter's, puts the interpreter's own ``lib/`` first
   on ``LD_LIBRARY_PATH`` (the server's children inherit it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# What a layered server environment installs over its base (pip requirement strings).
LAYER_REQUIREMENTS = ("nvidia-pytriton==0.7.0", "numpy>=1.24,<2", "ml_dtypes>=0.5,<0.6")
_MARKER = "cleandift-serve-env.json"

STANDALONE_ENV = 'python -m venv serve-env && serve-env/bin/pip install torch==2.13.0 ".[serve,cpu]"'
LAYERED_ENV = "cleandift-rt serve-env --out .venv-serve"


def how_to_get_one() -> str:
    return (f"make a server environment: `{LAYERED_ENV}` (layered over this one) or `{STANDALONE_ENV}` "
            "(standalone), then run `serve` from it (docs/serving.md)")


def check_server_python() -> None:
    """Raise a RuntimeError naming the fix when this interpreter cannot run PyTriton."""
    import numpy

    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise RuntimeError(f"PyTriton is not installed in this environment ({sys.prefix}): "
                           f"{how_to_get_one()}") from None
    if int(numpy.__version__.split(".")[0]) >= 2:
        raise RuntimeError(f"PyTriton 0.7 needs numpy<2 and this environment has numpy {numpy.__version__} (with "
                           f"numpy 2 its outputs arrive empty): {how_to_get_one()}")


def _own_libpython() -> Path | None:
    name, libdir = sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LIBDIR")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not name or not libdir:
        return None
    path = Path(libdir) / name
    return path if path.is_file() else None


def stub_path() -> Path:
    """PyTriton's Python-backend stub for this interpreter's version."""
    import pytriton

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / version / \
        "triton_python_backend_stub"


def resolved_libpython(stub: Path, env: dict) -> Path | None:
    """The libpython the dynamic loader gives ``stub`` under ``env`` (``ldd``), None when it finds none."""
    result = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env, timeout=60, check=False)
    found = re.search(r"libpython\S*\s+=>\s+(\S+)", result.stdout)
    if not found or found.group(1) == "not":
        return None
    return Path(found.group(1))


def libpython_fix(env: dict | None = None) -> str | None:
    """Put this interpreter's ``lib/`` first on ``LD_LIBRARY_PATH`` in ``env`` (default ``os.environ``)
    when the stub would load another libpython; returns what was done (None: nothing was needed)."""
    env = os.environ if env is None else env
    stub = stub_path()
    if not stub.is_file():
        raise RuntimeError(f"PyTriton has no Python-backend stub for Python {sys.version_info.major}."
                           f"{sys.version_info.minor} ({stub} is missing): run the server on a Python it supports "
                           "(3.8-3.13)")
    own = _own_libpython()
    try:
        resolved = resolved_libpython(stub, dict(env))
    except FileNotFoundError:  # no ldd: the interpreter's own library first is right whenever it has one
        resolved = None
    if own is None:
        if resolved is None:
            raise RuntimeError(f"PyTriton's Python backend needs a shared libpython{sys.version_info.major}."
                               f"{sys.version_info.minor}, and this interpreter ({sys.executable}) has none: use a "
                               "Python built with --enable-shared (a distribution's python3, pyenv with "
                               "PYTHON_CONFIGURE_OPTS=--enable-shared, conda)")
        return None  # a statically linked interpreter: the loader's library is the only candidate
    if resolved is not None and resolved.exists() and os.path.samefile(resolved, own):
        return None
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(own.parent), *paths])
    return (f"the Python-backend stub would load {resolved or 'no libpython'}, not this interpreter's {own}: "
            f"LD_LIBRARY_PATH starts with {own.parent}")


# -- a server environment layered over an existing one -------------------------------------------


def base_site_dirs() -> list[str]:
    """This environment's site-packages (pure and platform), the base a layered environment reads."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def layer_identity(base: list[str]) -> dict:
    return {"python": sys.version.split()[0], "executable": sys.executable, "base": base,
            "requirements": list(LAYER_REQUIREMENTS)}


def default_layered_dir(cache: str | Path | None = None) -> Path:
    """``~/.cache/cleandift-rt/serve-env-<hash>`` (``CLEANDIFT_CACHE`` or ``cache`` replaces the folder):
    one per base environment, interpreter and layer requirements."""
    root = Path(cache or os.environ.get("CLEANDIFT_CACHE") or Path.home() / ".cache" / "cleandift-rt")
    digest = hashlib.sha256(json.dumps(layer_identity(base_site_dirs()), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"serve-env-{digest}"


def layered_python(target: Path) -> Path:
    return Path(target) / "bin" / "python"


def layered_env(target: str | Path, log=print, timeout: float = 900) -> Path:
    """A server environment in ``target`` over this one (built once, reused while its base, interpreter and
    requirements stay the same); returns its python. pip installs only ``LAYER_REQUIREMENTS`` (and what
    PyTriton needs that the base lacks) into ``target``; the base is never modified."""
    target = Path(target).absolute()
    base = base_site_dirs()
    identity = layer_identity(base)
    marker = target / _MARKER
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if marker.is_file() and _read_marker(marker) == identity and layered_python(target).is_file():
            return layered_python(target)
        if target.exists():
            if not marker.is_file() and any(target.iterdir()):
                raise ValueError(f"{target} exists and is not a server environment made by cleandift-rt: "
                                 "name an empty or new folder")
            shutil.rmtree(target)
        log(f"serve-env: building a server environment in {target} over {base[0]} ({', '.join(LAYER_REQUIREMENTS)})")
        _run([sys.executable, "-m", "venv", str(target)], "creating the virtual environment", timeout)
        python = layered_python(target)
        site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    "asking it for its site-packages", timeout).strip()
        # a .pth line starting with "import" runs: the base's own .pth files (editable installs) are read too
        Path(site, "zz_cleandift_base.pth").write_text(
            "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in base) + "\n")
        # pip reports the base's packages that want numpy 2 (pandas, OpenCV) as conflicts: the server imports none
        _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *LAYER_REQUIREMENTS],
             "installing " + " ".join(LAYER_REQUIREMENTS), timeout)
        _run([str(python), "-c", "import numpy, pytriton, cleandift_rt.serving; "
              "assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__"], "checking it", timeout)
        script = target / "bin" / "cleandift-rt"
        script.write_text(f"#!{python}\nimport sys\nfrom cleandift_rt.cli.main import main\nsys.exit(main())\n")
        script.chmod(0o755)
        marker.write_text(json.dumps(identity, indent=2))
    return python


def _run(argv: list[str], what: str, timeout: float) -> str:
    """Run a step of the build; its output only when it fails, in a RuntimeError naming the step."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"serve-env: {what} took over {timeout:.0f} s") from None
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
        raise RuntimeError(f"serve-env: {what} failed (exit status {done.returncode}):\n{tail}")
    return done.stdout


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def _locked(path: Path):
    """One builder at a time (two test sessions starting together)."""
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
