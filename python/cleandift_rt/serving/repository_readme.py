"""The README that ``export-triton`` writes beside a model's ``config.pbtxt``: what the container must
have, how to start it, how to call the model. ``model`` is a ``repository.TritonModel``."""

from __future__ import annotations

from pathlib import Path

from ..build_info import _package_version


def readme(model, engine: Path) -> str:
    info, name = model.info, model.name
    h, w = info.default_size
    size = (f"{h} x {w}" if not info.dynamic_size
            else f"{info.size_range[0]}-{info.size_range[1]} per side (multiples of 64; warm-up at {h} x {w})")
    gpu = model.kind == "KIND_GPU"
    lines = [f"# Triton model `{name}`", "",
             f"Exported by cleandift-rt {_package_version()} (`cleandift-rt export-triton`) from `{engine.name}`: "
             f"{_runtime(model)}.", ""]
    if model.backend == "tensorrt":
        lines += [f"**The container must carry TensorRT {model.tensorrt}**: a plan runs only on the TensorRT "
                  f"version that built it, and on GPUs of the architecture it was built for ({model.gpu}). Pick the "
                  f"Triton release whose TensorRT is {model.tensorrt} (NVIDIA's Frameworks Support Matrix lists the "
                  "TensorRT of every release), or rebuild the plan inside that container with "
                  "`cleandift-rt build-plan`.", ""]
    lines += ["## Serve", "", "```bash",
              f"docker run {'--gpus all ' if gpu else ''}--rm --shm-size=1g \\",
              "    -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -p 127.0.0.1:8002:8002 \\",
              '    -v "$PWD":/models nvcr.io/nvidia/tritonserver:YY.MM-py3 \\',
              "    tritonserver --model-repository=/models",
              f"curl -s 127.0.0.1:8000/v2/models/{name}/ready && echo ready",
              "```", "",
              "Run it from the repository folder (the one holding this model's folder). The ports are published on "
              "loopback only; drop `127.0.0.1:` to expose them.", "",
              "## Call", "",
              "| tensor | type | shape (B = batch) |", "|---|---|---|",
              f"| input `images` | FP32 | B x 3 x {h if not info.dynamic_size else 'H'} x "
              f"{w if not info.dynamic_size else 'W'}: RGB, NCHW, values in [-1, 1]; {size} |"]
    if model.embeds_shape:
        tokens, width = model.embeds_shape
        lines.append(f"| input `prompt_embeds` | FP32 | B x {tokens} x {width}: the text embedding; the baked prompt's "
                     f"is `{name}/warmup/prompt_embeds` (raw little-endian float32) |")
    for out in info.output_names:
        c, oh, ow = model.output_dims(out)
        lines.append(f"| output `{out}` | FP32 | B x {c} x {'h' if oh < 0 else oh} x {'w' if ow < 0 else ow} |")
    preferred = f"preferred batch sizes {', '.join(map(str, model.preferred))}, " if model.preferred else ""
    lines += ["", f"Batches of 1 to {model.max_batch} images per request; Triton's dynamic batcher joins requests "
              f"({preferred}queue delay {model.queue_delay_us} us). "
              f"Images become pixels as `cleandift_rt.Engine` makes them (size policy `{info.resize}`):", "",
              "```python", "import numpy as np", "import tritonclient.grpc as grpcclient",
              "from cleandift_rt.features.preprocess import load_image, prepare_images", "",
              f'pixels = prepare_images([load_image("a.jpg")], ({h}, {w}), "{info.resize}").pixels.numpy()',
              'client = grpcclient.InferenceServerClient("127.0.0.1:8001")',
              'images = grpcclient.InferInput("images", list(pixels.shape), "FP32")',
              "images.set_data_from_numpy(pixels)", "inputs = [images]"]
    if model.embeds_shape:
        tokens, width = model.embeds_shape
        lines += [f'embeds = np.fromfile("{name}/warmup/prompt_embeds", "<f4").reshape(1, {tokens}, {width})',
                  "embeds = np.repeat(embeds, len(pixels), axis=0)",
                  'prompt = grpcclient.InferInput("prompt_embeds", list(embeds.shape), "FP32")',
                  "prompt.set_data_from_numpy(embeds)", "inputs.append(prompt)"]
    tap = "us6" if "us6" in info.output_names else info.output_names[0]
    lines += [f'result = client.infer("{name}", inputs, outputs=[grpcclient.InferRequestedOutput("{tap}")])',
              f'features = result.as_numpy("{tap}")   # float32 [B, C, h, w], as Engine.extract returns it',
              "```", "",
              "Throughput and latency: `perf_analyzer -m " + name + " -u 127.0.0.1:8001 -i grpc "
              "--concurrency-range 1:16` (in the `-py3-sdk` container).", "",
              "The model configuration's parameter `cleandift_rt` holds these facts as JSON (taps, size, resize "
              "policy, input range). Without a container: `cleandift-rt serve --engine "
              f"{engine.name}` serves the same engine on the same protocols (docs/serving.md).", ""]
    return "\n".join(lines)


def _runtime(model) -> str:
    if model.backend == "tensorrt":
        return f"TensorRT plan (TensorRT {model.tensorrt}, built on {model.gpu}), `tensorrt_plan` on GPU instances"
    where = "GPU" if model.kind == "KIND_GPU" else "CPU"
    platform = "`onnxruntime_onnx`" if model.backend == "onnxruntime" else "the `openvino` backend"
    return f"ONNX graph, {platform} on {where} instances"
