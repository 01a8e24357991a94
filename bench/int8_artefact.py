"""Which int8 artefact: the QDQ .onnx that `export --precision int8` writes against an OpenVINO IR.

Both come from the same fp32 graph and the same NNCF post-training quantization (calibration on the
bundled photos, MIXED preset, transformer patterns, the image-independent paths kept in floating
point), without accuracy control, so what differs is the artefact and NNCF's backend that writes it:
its ONNX backend (QDQ pairs; OpenVINO, ONNX Runtime and TensorRT read them) or its OpenVINO backend
(FakeQuantize in an .xml/.bin that only OpenVINO reads). Each quantization runs in its own process
(seconds, peak memory); then one process compiles the fp32 graph in bf16 (the engine int8 must beat),
the QDQ file and the IR on OpenVINO (the int8 ones with their float layers in bf16 where the CPU has it,
as the Engine runs int8 files) and times them round-robin, and the QDQ file on ONNX Runtime's CPU
provider; per tap, the cosine to the fp32 graph (OpenVINO fp32) on the bundled photos and us6 match
agreement.

    python bench/int8_artefact.py --tiny          # the tiny model at 128 px (checks the script)
    python bench/int8_artefact.py --size 256      # SD 2.1 size, random weights (bench/extract.py's cache)
Writes bench/results/int8-artefact-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import RESULTS, ensure_model, ensure_onnx  # noqa: E402

PHOTOS_AT = {"tiny": 128}


def quantize(kind: str, fp32: Path, out: Path) -> dict:
    """One quantization (in a worker process): ``qdq`` with NNCF's ONNX backend, ``ir`` with its OpenVINO backend."""
    import nncf
    import onnx

    from cleandift_rt.export.calibration import CalibrationSet
    from cleandift_rt.export.int8 import Int8Options, image_independent_compute, quantization_parameters
    from cleandift_rt.formats.artifact import read_onnx_info

    info = read_onnx_info(fp32)
    images = CalibrationSet.bundled(tuple(info.default_size), info.resize)
    external = fp32.parent if fp32.with_name(fp32.name + ".data").exists() else None
    ignored = image_independent_compute(onnx.load(str(fp32), load_external_data=False))
    params = quantization_parameters(nncf, Int8Options(), ignored, len(images.validation), external)
    common = dict(preset=params["preset"], model_type=params["model_type"], target_device=params["target_device"],
                  ignored_scope=params["ignored_scope"], subset_size=len(images.calibration))
    t0 = time.perf_counter()
    if kind == "qdq":
        from cleandift_rt.export.onnx_files import save_onnx, set_metadata

        data = nncf.Dataset([{"images": images.calibration[i : i + 1]} for i in range(len(images.calibration))])
        model = nncf.quantize(onnx.load(str(fp32), load_external_data=external is None), data,
                              advanced_parameters=params["advanced_quantization_parameters"], **common)
        set_metadata(model, info)  # the fp32 graph's record: opened with the int8 files' float-layer hint
        save_onnx(model, out, external is not None)
    else:
        import openvino as ov

        from cleandift_rt.runtime.backends.openvino import _fold_timestep_embedding, _prompt_as_parameter

        model = ov.Core().read_model(str(fp32))
        default = _prompt_as_parameter(ov, model, fp32)  # as the Engine compiles the .onnx
        _fold_timestep_embedding(model)
        data = nncf.Dataset([{"images": images.calibration[i : i + 1], "prompt_embeds": default}
                             for i in range(len(images.calibration))])
        ov.save_model(nncf.quantize(model, data, **common), str(out))
    return {"kind": kind, "seconds": time.perf_counter() - t0,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(fp32: Path, qdq: Path, ir: Path, rounds: int) -> dict:
    """bf16 / int8 QDQ / int8 IR on OpenVINO round-robin, the QDQ file on ONNX Runtime, accuracy of each."""
    from collections import Counter

    import numpy as np
    import openvino as ov

    from cleandift_rt import Engine
    from cleandift_rt.assets import PHOTOS, load_photo
    from cleandift_rt.features.preprocess import prepare_images
    from cleandift_rt.runtime.backends.openvino import HINTS, layer_precisions
    from cleandift_rt.runtime.compare import FeatureComparison
    from cleandift_rt.runtime.quantized import float_layers

    photos = [np.asarray(load_photo(p)) for p in PHOTOS]
    reference = Engine(fp32, backend="openvino", precision="fp32")
    size, taps = reference.size, reference.taps
    pixels = prepare_images(photos, size, reference.resize).pixels.numpy()
    want = reference.extract(pixels)
    del reference
    engines = {"bf16": Engine(fp32, backend="openvino", precision="bf16"),
               "int8-qdq": Engine(qdq, backend="openvino", precision=float_layers())}
    core = ov.Core()
    compiled = core.compile_model(str(ir), "CPU", {"INFERENCE_PRECISION_HINT": HINTS[float_layers()],
                                                    "INFERENCE_NUM_THREADS": engines["bf16"].info["threads"],
                                                    "PERFORMANCE_HINT": "LATENCY"})
    request, outputs = compiled.create_infer_request(), {n: o for o in compiled.outputs for n in o.get_names()}
    embeds = engines["bf16"].backend._entry.default_embeds  # the baked prompt, fed as the Engine feeds it

    def run_ir(x):
        result = request.infer({"images": x, "prompt_embeds": embeds})
        return {t: np.array(result[outputs[t]]) for t in taps}

    runs = {"bf16": engines["bf16"].extract, "int8-qdq": engines["int8-qdq"].extract, "int8-ir": run_ir}
    result = {name: {"features": run(pixels)} for name, run in runs.items()}  # warm-up and accuracy
    one = pixels[:1]
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(one)
            times[name].append(time.perf_counter() - t0)
    ort = Engine(qdq, backend="onnxruntime", device="cpu")
    result["int8-qdq-ort"] = {"features": ort.extract(pixels)}
    times["int8-qdq-ort"] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ort.extract(one)
        times["int8-qdq-ort"].append(time.perf_counter() - t0)
    layers = {name: engines[name].info["compute_precision"] for name in engines}
    layers["int8-ir"] = dict(Counter(layer_precisions(compiled).values()))
    out = {}
    for name, entry in result.items():
        comparison = FeatureComparison(taps)
        for i in range(len(pixels)):
            comparison.add({t: want[t][i] for t in taps}, {t: entry["features"][t][i] for t in taps})
        per_tap = comparison.result()
        out[name] = {"best_seconds": min(times[name]), "median_seconds": statistics.median(times[name]),
                     "seconds": times[name], "cosine_min": min(r["cosine_min"] for r in per_tap.values()),
                     "cosine": {t: r["cosine_min"] for t, r in per_tap.items()},
                     "match_agreement": {t: r["match_agreement"] for t, r in per_tap.items()},
                     "compute_precision": layers.get(name)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model at 128 px")
    p.add_argument("--size", type=int, default=256, help="SD 2.1-size input side (default 256)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin timing rounds (the best and median kept)")
    p.add_argument("--cache", type=Path, default=RESULTS / "cache")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "FP32", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, fp32, out = args.worker
        print(json.dumps(quantize(kind, Path(fp32), Path(out))))
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    size = PHOTOS_AT["tiny"] if args.tiny else args.size
    fp32 = ensure_onnx(ensure_model("tiny" if args.tiny else "sd21", args.cache), args.cache, size, None)
    quantized = {"qdq": fp32.with_name(fp32.stem + ".qdq.onnx"), "ir": fp32.with_name(fp32.stem + ".ir.xml")}
    runs = {}
    for kind, out in quantized.items():  # each in its own process: its peak memory is its own
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(fp32), str(out)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(f"quantization {kind} failed:\n{proc.stderr[-2000:]}")
            return 1
        runs[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"quantized ({kind}) in {runs[kind]['seconds']:.0f} s, peak {runs[kind]['peak_gib']:.1f} GiB", flush=True)
    rows = measure(fp32, quantized["qdq"], quantized["ir"], args.rounds)
    bf16 = rows["bf16"]
    print(f"\n{'model tiny' if args.tiny else 'SD 2.1 size, random weights'}, {size} px, batch 1, all taps, "
          f"load {os.getloadavg()[0]:.1f}")
    for name, r in rows.items():
        print(f"  {name:13s} best {r['best_seconds']:7.3f} s, median {r['median_seconds']:7.3f} s; bf16 / this: "
              f"{bf16['best_seconds'] / r['best_seconds']:.2f}x (best), "
              f"{bf16['median_seconds'] / r['median_seconds']:.2f}x (median); worst per-tap cosine {r['cosine_min']:.5f}, us6 agreement "
              f"{r['match_agreement'].get('us6', float('nan')):.4f}; {r['compute_precision'] or ''}")
    ir, qdq = rows["int8-ir"], rows["int8-qdq"]
    print(f"  IR / QDQ on OpenVINO: {qdq['best_seconds'] / ir['best_seconds']:.2f}x (best), "
          f"{qdq['median_seconds'] / ir['median_seconds']:.2f}x (median)")
    result = {"bench": "int8-artefact", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": "tiny" if args.tiny else "sd21-random", "size": size, "load_average": os.getloadavg(),
              "quantization": runs, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"int8-artefact-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
