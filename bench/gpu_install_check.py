"""Check the README's GPU install in a fresh virtual environment (no GPU needed; downloads ~255 MB).

    python bench/gpu_install_check.py [--keep]

onnxruntime and onnxruntime-gpu share the import name ``onnxruntime`` and cannot coexist, so the
project depends on neither by default: ``[cpu]`` brings the CPU build, ``[gpu]`` onnxruntime-gpu.
This script makes a new venv, installs the local CPU torch wheel and then ``.[gpu]`` as the README
says, and checks that

- ``onnxruntime.get_available_providers()`` lists ``CUDAExecutionProvider`` (and TensorRT's);
- ``pip check`` is clean and the CPU ``onnxruntime`` distribution is absent;
- ``cleandift_rt.build_info()["onnxruntime"]["providers"]`` reports the GPU build's providers;
- reinstalling, upgrading or force-reinstalling the project does not bring the CPU build back;
- switching an existing CPU install to the GPU one with the README's command works.

The project is built without CUDA kernels here (CLEANDIFT_CUDA=OFF) to save time: they do not
touch ONNX Runtime), in a build folder of its own, from the committed tree (``git archive HEAD``,
or ``--source DIR``). The result is printed and written to bench/results/gpu_install-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TORCH = "torch==2.13.0"  # the local CPU wheel of this workplace; any torch build works for this check

PROBE = ("import json, importlib.metadata as md, onnxruntime, cleandift_rt\n"
         "def dist(n):\n"
         "    try: return md.version(n)\n"
         "    except md.PackageNotFoundError: return None\n"
         "info = cleandift_rt.build_info()['onnxruntime']\n"
         "print(json.dumps({'providers': onnxruntime.get_available_providers(), 'build_info': info,\n"
         "                  'onnxruntime': dist('onnxruntime'), 'onnxruntime-gpu': dist('onnxruntime-gpu')}))\n")


def run(cmd: list[str], env: dict, what: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    print(f"[{what}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return proc


def probe(python: str, env: dict, what: str) -> dict:
    state = json.loads(run([python, "-c", PROBE], env, what, cwd=Path("/")).stdout.strip().splitlines()[-1])
    check = run([python, "-m", "pip", "check"], env, f"{what}: pip check")
    state["pip_check"] = check.stdout.strip()
    state["ok"] = ("CUDAExecutionProvider" in state["providers"] and state["onnxruntime"] is None
                   and state["onnxruntime-gpu"] is not None
                   and "CUDAExecutionProvider" in state["build_info"]["providers"]
                   and state["build_info"]["distribution"] == "onnxruntime-gpu")
    print(f"    providers {state['providers']}; onnxruntime (CPU dist) {state['onnxruntime']}; onnxruntime-gpu "
          f"{state['onnxruntime-gpu']}; pip check: {state['pip_check']!r} -> {'ok' if state['ok'] else 'NOT OK'}",
          flush=True)
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the virtual environment (its path is printed)")
    parser.add_argument("--source", metavar="DIR", help="project tree to install (default: this checkout's HEAD)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cleandift-gpu-install-"))
    venv = work / "venv"
    source = Path(args.source) if args.source else work / "src"
    if not args.source:  # the committed tree: work in progress beside it cannot break the check
        source.mkdir()
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    env = dict(os.environ, CLEANDIFT_CUDA="OFF", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("VIRTUAL_ENV", None)
    t0 = time.perf_counter()
    steps = {}
    try:
        run([sys.executable, "-m", "venv", str(venv)], env, "venv")
        py = str(venv / "bin" / "python")
        pip = [py, "-m", "pip", "install", "-q", f"--config-settings=build-dir={work / 'build'}"]
        run(pip + [TORCH], env, "torch")
        run(pip + [".[gpu]"], env, "README GPU install", source)
        steps["fresh install"] = probe(py, env, "fresh install")
        run(pip + [".[gpu]"], env, "reinstall", source)
        steps["reinstall"] = probe(py, env, "reinstall")
        run(pip + ["--upgrade", ".[gpu]"], env, "upgrade", source)
        steps["upgrade"] = probe(py, env, "upgrade")
        run(pip + ["--force-reinstall", "--no-deps", "."], env, "force-reinstall", source)
        steps["force-reinstall"] = probe(py, env, "force-reinstall")
        # a CPU install switched to the GPU build with the README's command
        run([py, "-m", "pip", "uninstall", "-q", "-y", "onnxruntime-gpu"], env, "back to CPU: remove GPU build")
        run(pip + [".[cpu]"], env, "back to CPU: install", source)
        run([py, "-m", "pip", "uninstall", "-q", "-y", "onnxruntime", "onnxruntime-gpu"], env, "switch: remove both")
        run(pip + [".[gpu]"], env, "switch: GPU install", source)
        steps["switch from CPU"] = probe(py, env, "switch from CPU")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"virtual environment kept in {venv}")
    result = {"script": "bench/gpu_install_check.py", "date": time.strftime("%Y-%m-%d %H:%M"),
              "seconds": round(time.perf_counter() - t0, 1), "steps": steps,
              "ok": all(step["ok"] for step in steps.values())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gpu_install-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"{'all steps ok' if result['ok'] else 'SOME STEPS FAILED'} in {result['seconds']:.0f} s; {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
