"""Coverage-guided fuzzing (atheris) of every file reader: what a hostile or corrupted file can do.

    python bench/fuzz.py [--runs N | --seconds S] [--targets NAME ...] [--out FILE.json]

One atheris process fuzzes all readers: the first byte of an input picks the reader, the rest is
the file. Each reader may refuse a file only with the errors the project documents for bad input
(ValueError, TypeError, FileNotFoundError, UnicodeDecodeError inside ValueError); anything else (an
IndexError, a KeyError, a MemoryError, a crash of the process) is a finding, and atheris stops with
the input that caused it. Seeds are valid files of each kind, so mutations start from the real
formats. ``--runs 3000`` is the CI-sized run (tests/reliability/test_fuzz.py); the long run of
docs/reliability.md is ``--seconds 600``.

Readers: student safetensors (header, metadata, U-Net config, tensors), ONNX engine metadata,
TensorRT plan header, SPair-71k pair annotation, pairs.json, PF-Pascal CSV, images, training config
files, aggregator files (metadata, config, tensors) and extraction manifests. The JSON readers'
seeds include documents nested past ``MAX_JSON_DEPTH`` and, for the config reader, one past the
size limit (the worker lowers ``CLEANDIFT_MAX_JSON_BYTES`` to 64 KiB so mutations cross it): a
``RecursionError`` or an unbounded read is a finding like any other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGETS = ("student", "onnx", "plan", "spair", "pairs_json", "pf_csv", "image", "config", "aggregator", "manifest")
DEEP = 5000  # nesting of the deep seeds: far past MAX_JSON_DEPTH (64) and Python's parser limit (~1000)
JSON_BYTES = 64 << 10  # the worker's CLEANDIFT_MAX_JSON_BYTES
ALLOWED = (ValueError, TypeError, FileNotFoundError)


# -- seeds: one valid file of every kind -------------------------------------------------------


def _tiny_student_bytes(folder: Path) -> bytes:
    import diffusers
    import torch

    from cleandift_rt.models import save_student_unet

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4,
        attention_head_dim=1, cross_attention_dim=8, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                                        "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    path = folder / "student.safetensors"
    save_student_unet(path, unet.half(), 261.0)
    return path.read_bytes()


def _artifact_info():
    from cleandift_rt.formats.artifact import ArtifactInfo, tap_records

    return ArtifactInfo(taps=tap_records(["us6"], [32, 64, 64, 64]), height=128, width=128, size_range=None,
                        default_size=[128, 128], resize="stretch", batch={"min": 1, "opt": 2, "max": 4},
                        base_model="tiny", variant="tiny", student="s.safetensors", prompt="", timestep=261.0,
                        cross_attention_dim=32, prompt_tokens=77, block_out_channels=[32, 64, 64, 64],
                        scaling_factor=0.18215)


def _deep(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def _onnx_bytes(deep: bool = False) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 128, 128])
    y = helper.make_tensor_value_info("us6", TensorProto.FLOAT, ["b", 64, 8, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["images"], ["us6"])], "g", [x], [y]))
    for k, v in _artifact_info().to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, (_deep() if deep and k.endswith("batch") else v)
    return model.SerializeToString()


def _plan_bytes(deep: bool = False) -> bytes:
    import numpy as np

    from cleandift_rt.export.trt_build import plan_header
    from cleandift_rt.formats.plan import plan_header_bytes

    header = plan_header(_artifact_info(), "11.4.0", (9, 0), "H200", {"min": 1, "opt": 2, "max": 4}, True, 8.0,
                         np.zeros((1, 77, 32), np.float32), {"engine_layers": 3, "precision_mix": {"fp16": 3}},
                         "tiny.onnx", 16)
    if deep:
        header["profile"]["batch"] = "@@"
        return plan_header_bytes(header).replace(b'"@@"', _deep().encode()) + bytes(16)
    return plan_header_bytes(header) + bytes(16)


def _aggregator_bytes(folder: Path, deep: bool = False) -> bytes:
    import torch

    from cleandift_rt.checkpoint import read_safetensors, read_safetensors_metadata, write_safetensors
    from cleandift_rt.hyper.aggregator import Aggregator
    from cleandift_rt.hyper.network import AggregationConfig, AggregationNetwork

    torch.manual_seed(0)
    config = AggregationConfig(layers=("us6",), channels=(32,), strides=(16,), timesteps=(261.0,), projection_dim=128)
    path = Aggregator(AggregationNetwork(config), "cleandift").save(folder / "aggregator.safetensors")
    if deep:
        meta = dict(read_safetensors_metadata(path), config=_deep())
        write_safetensors(path, read_safetensors(path), meta)
    return path.read_bytes()


def _manifest_bytes(deep: bool = False) -> bytes:
    config = {"format": "shards", "taps": ["us6"], "shapes": {"us6": [64, 4, 4]}, "input_size": [64, 64],
              "resize": "stretch", "precision": "fp32", "engine": "e.onnx", "engine_digest": "0" * 16, "prompt": ""}
    lines = [{"manifest": "cleandift-rt-extract", "version": 2, "config": config},
             {"shard": "shard-a.safetensors", "images": ["a.jpg", "b.jpg"], "inputs": ["d1", "d2"], "digest": "d",
              "failed": [["c.jpg", "c.jpg", "cannot decode"]]},
             {"files": [["x.jpg", "x.jpg.safetensors", "d3", "d4"]], "failed": []},
             {"redo": ["a.jpg"], "drop": ["shard-a.safetensors"]}]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    return (text + _deep() + "\n").encode() if deep else text.encode()


def _image_seeds() -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    out = []
    rng = np.random.default_rng(0)
    for mode, fmt in (("RGB", "PNG"), ("RGB", "JPEG"), ("P", "PNG"), ("LA", "PNG")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (70, 66, 3), dtype=np.uint8)).convert(mode).save(buf, fmt)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)).save(buf, "PNG")
    return out + [buf.getvalue()]


def seeds(folder: Path) -> dict[str, list[bytes]]:
    spair = {"src_imname": "a.jpg", "trg_imname": "b.jpg", "src_imsize": [66, 70, 3], "trg_imsize": [66, 70, 3],
             "src_kps": [[1, 2], [30, 40]], "trg_kps": [[3, 4], [20, 10]], "trg_bndbox": [0, 0, 60, 60],
             "src_bndbox": [0, 0, 60, 60], "category": "cat", "kps_ids": ["0", "1"]}
    pairs = {"pairs": [{"source": "a.jpg", "target": "b.jpg", "source_points": [[1, 2]],
                        "target_points": [[3, 4]], "category": "cat", "bbox": [0, 0, 60, 60]}]}
    config = {"steps": 10, "lr": 1e-5, "taps": ["us6"], "adam_betas": [0.9, 0.999], "size": 64, "bf16": False}
    return {"student": [_tiny_student_bytes(folder)], "onnx": [_onnx_bytes(), _onnx_bytes(deep=True)],
            "plan": [_plan_bytes(), _plan_bytes(deep=True)],
            "spair": [json.dumps(spair).encode(), json.dumps(dict(spair, src_kps=_deep())).encode()],
            "pairs_json": [json.dumps(pairs).encode(), _deep().encode()],
            "pf_csv": [b"source_image,target_image,class,XA,YA,XB,YB\na.jpg,b.jpg,1,1;2,3;4,5;6,7;8\n"],
            "image": _image_seeds(),
            "config": [json.dumps(config).encode(), json.dumps(dict(config, taps="@@")).replace('"@@"', _deep()).encode(),
                       json.dumps(dict(config, pad="x" * JSON_BYTES)).encode()],
            "aggregator": [_aggregator_bytes(folder), _aggregator_bytes(folder, deep=True)],
            "manifest": [_manifest_bytes(), _manifest_bytes(deep=True)]}


# -- the readers ---------------------------------------------------------------------------------


def make_readers(work: Path):
    from cleandift_rt.evaluation.pairs import load_pairs_json, load_pf_csv
    from cleandift_rt.evaluation.spair import load_spair
    from cleandift_rt.extraction import read_manifest
    from cleandift_rt.features.preprocess import load_image
    from cleandift_rt.formats.artifact import describe, read_onnx_info
    from cleandift_rt.formats.plan import decode_array, read_plan_header
    from cleandift_rt.hyper.aggregator import Aggregator
    from cleandift_rt.models import load_student
    from cleandift_rt.training import build_config

    spair_root = work / "SPair"
    (spair_root / "PairAnnotation" / "test").mkdir(parents=True, exist_ok=True)
    (spair_root / "JPEGImages" / "cat").mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> Path:
        path = work / name
        path.write_bytes(data)
        return path

    def plan(data):
        path = write("x.plan", data)
        header, _, _ = read_plan_header(path)
        describe(path)
        decode_array(header["default_prompt_embeds"])

    def spair(data):
        (spair_root / "PairAnnotation" / "test" / "0-a-b:cat.json").write_bytes(data)
        load_spair(spair_root, "test")

    return {"student": lambda d: load_student(write("x.safetensors", d)),
            "onnx": lambda d: (read_onnx_info(write("x.onnx", d)), describe(work / "x.onnx")),
            "plan": plan, "spair": spair,
            "pairs_json": lambda d: load_pairs_json(write("pairs.json", d), work),
            "pf_csv": lambda d: load_pf_csv(write("pairs.csv", d), work),
            "image": lambda d: load_image(write("x.img", d)),
            "config": lambda d: build_config(config_file=write("config.json", d)),
            "aggregator": lambda d: Aggregator.from_file(write("aggregator.safetensors", d)),
            "manifest": lambda d: (write("manifest-shards.jsonl", d), read_manifest(work, "shards"))}


def instrument_package(atheris) -> int:
    """Coverage for our own code only (instrumenting torch too costs 10x the speed). Functions are
    patched in place, so it works whichever import hook loaded the package (atheris'
    instrument_imports sees nothing behind an editable install's redirecting finder)."""
    import inspect

    count, seen = 0, set()

    def visit(obj):
        nonlocal count
        for value in vars(obj).values():
            func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if inspect.isfunction(func) and func.__module__.startswith("cleandift_rt") and id(func) not in seen:
                seen.add(id(func))
                atheris.instrument_func(func)
                count += 1
            elif inspect.isclass(value) and value.__module__.startswith("cleandift_rt") and id(value) not in seen:
                seen.add(id(value))
                visit(value)

    for name, module in list(sys.modules.items()):
        if name.startswith("cleandift_rt") and module is not None:
            visit(module)
    return count


def fuzz_main(argv) -> None:
    """Inside the atheris process: ``fuzz.py --fuzz-worker STATS_FILE TARGETS -- atheris args``."""
    import atheris

    stats_file, targets = Path(argv[0]), argv[1].split(",")
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    readers = make_readers(work)
    instrument_package(atheris)
    executions = {t: 0 for t in targets}

    def one_input(data: bytes) -> None:
        if not data:
            return
        target = targets[data[0] % len(targets)]
        executions[target] += 1
        stats_file.write_text(json.dumps(executions))  # libFuzzer exits without Python's atexit
        try:
            readers[target](data[1:])
        except ALLOWED:
            pass

    atheris.Setup([sys.argv[0], *argv[3:]], one_input)
    atheris.Fuzz()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--fuzz-worker":
        fuzz_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--runs", type=int, default=3000, help="executions in all (default 3000: the CI-sized run)")
    limit.add_argument("--seconds", type=int, help="fuzz for this long instead")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--out", metavar="FILE.json", help="result file (default bench/results/fuzz-*.json)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fuzz-corpus-"))
    corpus = work / "corpus"
    corpus.mkdir()
    all_seeds = seeds(work)
    for i, target in enumerate(args.targets):
        for j, seed in enumerate(all_seeds[target]):
            (corpus / f"{target}-{j}").write_bytes(bytes([i]) + seed)
    stats = work / "stats.json"
    limit_args = [f"-max_total_time={args.seconds}"] if args.seconds else [f"-runs={args.runs}"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fuzz-worker", str(stats), ",".join(args.targets), "--",
           *limit_args, "-max_len=262144", "-len_control=0", "-rss_limit_mb=4096", "-timeout=30", f"-artifact_prefix={work}/",
           str(corpus)]
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", CLEANDIFT_MAX_JSON_BYTES=str(JSON_BYTES))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    findings = sorted(str(p) for p in work.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-", "leak-")))
    executions = json.loads(stats.read_text()) if stats.is_file() else {}
    coverage = re.findall(r"cov: (\d+)", proc.stdout + proc.stderr)
    result = {"script": "bench/fuzz.py", "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(seconds, 1),
              "executions": executions, "total_executions": sum(executions.values()), "findings": findings,
              "coverage_edges": int(coverage[-1]) if coverage else 0,
              "exit_code": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-3000:] if findings or
              proc.returncode else ""}
    out = Path(args.out) if args.out else RESULTS / f"fuzz-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{result['total_executions']} executions in {seconds:.0f} s, {result['coverage_edges']} edges, over "
          f"{len(executions)} readers "
          f"({', '.join(f'{k} {v}' for k, v in executions.items())}); findings: {len(findings)}; {out}")
    if findings:
        print(result["log_tail"])
    return 1 if findings or proc.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
