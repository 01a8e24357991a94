"""fp16 feature graph vs its fp32 export, per tap, and what each fp32-island rule is worth.

    python bench/fp16_policy.py            # SD2.1-size random weights, 512 px (about 20 minutes on 2 cores, 12 GB)
    python bench/fp16_policy.py --tiny     # the tiny model, 128 px (a minute)

For the full policy and for the policy with each rule switched off (and with none), the fp16 graph
runs on ONNX Runtime CPU beside the fp32 export on the bundled photos; the script prints per-tap
cosine and max relative error, the nodes each rule keeps in fp32, file sizes, and the measured
value ranges that decide the islands (largest |x| overall and at the inputs of Softmax and of the
normalisations, whose squares are what overflows fp16 statistics).

Read it with two facts in mind: ONNX Runtime on x86 computes most fp16 ops in fp32 (it inserts
casts), so this shows the rounding of weights and stored activations, not fp16 accumulation; and
random weights do not overflow where SD2.1's real weights do. The check that matters for real
weights is the user's first step (docs/engine.md):

    python export/export_onnx.py --student S --base SD21 --out sd21.onnx --size 768 768 --precision fp16
    python export/build_engine.py --onnx sd21.onnx --out sd21.plan     # verifies per tap on the GPU
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_json  # noqa: E402

VARIANTS = {
    "full": {},
    "no attention_scores": {"attention_scores": False},
    "no normalization": {"normalization": False},
    "no constant_paths": {"constant_paths": False},
    "no max_abs (no calibration)": {"max_abs": None},
    "none (all fp16)": {"attention_scores": False, "normalization": False, "constant_paths": False, "max_abs": None},
}


def fp32_export(tiny: bool, size: int) -> Path:
    models = RESULTS / "models"
    models.mkdir(parents=True, exist_ok=True)
    from cleandift_rt.export.onnx_export import export_onnx
    from cleandift_rt.models import Student, load_base, write_tiny_base

    if tiny:
        folder = models / "tiny-base"
        if not folder.is_dir():
            write_tiny_base(folder)
    else:
        from extract import ensure_random_sd21

        folder = ensure_random_sd21(models / "sd21-random")
    path = models / f"{'tiny' if tiny else 'sd21'}-{size}-fp32.onnx"
    if not path.is_file():
        base = load_base(folder)
        export_onnx(Student(unet=copy.deepcopy(base.unet) if tiny else base.unet, source=str(folder)), base, path,
                    size=(size, size))
    return path


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(reference: dict, got: dict) -> dict:
    out = {}
    for tap, a in reference.items():
        a64, b64 = a.astype(np.float64).reshape(len(a), -1), got[tap].astype(np.float64).reshape(len(a), -1)
        cos = (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)
        rel = np.abs(a64 - b64).max() / np.abs(a64).max()
        out[tap] = {"cosine": round(float(cos.min()), 7), "max_relative_error": float(rel),
                    "finite": bool(np.isfinite(b64).all())}
    return out


def range_summary(model, ranges: dict) -> dict:
    def largest(op_types):
        values = [ranges.get(n.input[0], 0.0) for n in model.graph.node if n.op_type in op_types]
        return max(values, default=0.0)

    top = sorted(((v, k) for k, v in ranges.items()), reverse=True)[:10]
    softmax_in = largest({"Softmax"})
    norm_in = largest({"InstanceNormalization", "LayerNormalization"})
    return {"largest": [[k, v] for v, k in top], "softmax_input_max": softmax_in, "norm_input_max": norm_in,
            "norm_input_max_squared_over_fp16_max": norm_in**2 / 65504.0}


def main(argv=None) -> int:
    import onnx

    from cleandift_rt.export.mixed_precision import (PrecisionPolicy, calibration_feeds, convert_to_fp16,
                                                     measure_ranges)
    from cleandift_rt.formats.artifact import IMAGE_INPUT, read_onnx_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model at 128 px instead of SD2.1 size at 512 px")
    parser.add_argument("--size", type=int, help="input size (default 512, tiny 128)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    size = args.size or (128 if args.tiny else 512)
    fp32 = fp32_export(args.tiny, size)
    taps = list(read_onnx_info(fp32).tap_names)
    feeds = calibration_feeds((size, size))
    t0 = time.perf_counter()
    ranges = measure_ranges(fp32, feeds, progress=True)
    calibration_seconds = time.perf_counter() - t0
    reference = dict(zip(taps, session(fp32).run(taps, {IMAGE_INPUT: feeds[IMAGE_INPUT]})))
    rows = {}
    for name in args.variants:
        policy = PrecisionPolicy(**VARIANTS[name])
        model = onnx.load(str(fp32))
        t1 = time.perf_counter()
        summary = convert_to_fp16(model, policy, ranges if policy.max_abs is not None else None)
        convert_seconds = time.perf_counter() - t1
        path = fp32.with_name(fp32.stem.replace("fp32", "fp16-probe") + ".onnx")
        from cleandift_rt.export.onnx_export import save_onnx

        save_onnx(model, path)
        del model
        got = dict(zip(taps, session(path).run(taps, {IMAGE_INPUT: feeds[IMAGE_INPUT]})))
        per_tap = compare(reference, got)
        data = path.with_name(path.name + ".data")
        rows[name] = {"per_tap": per_tap, "fp32_nodes": summary["fp32_nodes"], "fp16_nodes": summary["fp16_nodes"],
                      "file_mb": round((path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20, 1),
                      "convert_seconds": round(convert_seconds, 1),
                      "worst_cosine": min(v["cosine"] for v in per_tap.values())}
        print(f"{name:<30} worst tap cosine {rows[name]['worst_cosine']:.7f}  fp32 nodes {summary['fp32_nodes']}  "
              f"{rows[name]['file_mb']} MB", flush=True)
        for p in (path, data):
            if p.exists():
                p.unlink()
    full = rows.get("full")
    if full:
        print("\nfull policy, per tap: cosine / max relative error")
        for tap, v in full["per_tap"].items():
            print(f"  {tap:>4}: {v['cosine']:.7f} / {v['max_relative_error']:.2e}")
    fp32_data = fp32.with_name(fp32.name + ".data")
    result = {"script": "bench/fp16_policy.py", "model": "tiny" if args.tiny else "SD2.1-size random weights",
              "size": size, "machine": machine(), "calibration_seconds": round(calibration_seconds, 1),
              "fp32_mb": round((fp32.stat().st_size + (fp32_data.stat().st_size if fp32_data.exists() else 0)) / 2**20, 1),
              "ranges": range_summary(onnx.load(str(fp32), load_external_data=False), ranges), "variants": rows}
    print(f"\ncalibration {calibration_seconds:.0f} s; ranges: softmax inputs up to {result['ranges']['softmax_input_max']:.3g}, "
          f"norm inputs up to {result['ranges']['norm_input_max']:.3g}")
    print(f"results: {write_json('fp16_policy', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
