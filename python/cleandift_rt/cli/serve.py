"""``cleandift-rt export-triton | serve | serve-env``: an engine behind NVIDIA Triton's protocol.

``export-triton`` writes a model repository for NVIDIA's Triton container; ``serve`` runs an Engine
behind the same HTTP / gRPC protocol on PyTriton, in a Python with numpy < 2, which ``serve-env``
builds over this environment (docs/serving.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import NoReturn

from .common import UserError, add_engine_args, non_negative_int, open_engine, port, positive_int

SERVE_EXAMPLES = """\
examples (in a server environment: cleandift-rt serve-env --out .venv-serve):
  .venv-serve/bin/cleandift-rt serve --engine sd21.onnx
  .venv-serve/bin/cleandift-rt serve --engine sd21.plan --max-batch 8 --queue-delay-us 2000
  python -c "from cleandift_rt.serving import Client; print(Client('127.0.0.1:8001').taps)"
Models: cleandift (uint8 images -> one FP32 tensor per tap), cleandift_match (two images or two
feature maps -> match indices and similarities). Stop with Ctrl+C or SIGTERM."""

EXPORT_EXAMPLES = """\
examples:
  cleandift-rt export-triton --engine sd21.plan --out model_repository/            # TensorRT, GPU
  cleandift-rt export-triton --engine sd21.onnx --out model_repository/ --instances 2
  cleandift-rt export-triton --engine sd21.onnx --out model_repository/ --instance-kind cpu   # OpenVINO
then: docker run ... nvcr.io/nvidia/tritonserver:YY.MM-py3 tritonserver --model-repository=/models
(the exact command, and the TensorRT version a plan needs, are in model_repository/cleandift/README.md)"""


def register(sub) -> None:
    """Add the 'export-triton', 'serve' and 'serve-env' commands to the cleandift-rt parser."""
    p = sub.add_parser("export-triton", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="a Triton model repository for NVIDIA's container (TensorRT, ONNX Runtime, OpenVINO)",
                       description="Write a model repository for NVIDIA's Triton Inference Server container: "
                       "config.pbtxt (platform, inputs and outputs from the file's metadata, batching from the "
                       "plan's optimisation profile, instances, warm-up, CUDA graphs for plans), the model file and a "
                       "README with the container and client commands.", epilog=EXPORT_EXAMPLES)
    p.add_argument("--engine", required=True, metavar="FILE", help="an exported .plan or .onnx file")
    p.add_argument("--out", required=True, metavar="DIR", help="the model repository (created; other models in it "
                   "are left alone)")
    p.add_argument("--name", default="cleandift", help="model name (default cleandift)")
    p.add_argument("--max-batch", type=positive_int, metavar="N", help="max_batch_size (default: the plan's profile "
                   "maximum; for .onnx the export's recorded maximum, else 8)")
    p.add_argument("--instances", type=positive_int, default=1, metavar="K", help="model instances (default 1)")
    p.add_argument("--queue-delay-us", type=non_negative_int, default=1000, metavar="D",
                   help="dynamic batcher's max_queue_delay_microseconds (default 1000)")
    p.add_argument("--instance-kind", choices=["gpu", "cpu"], default="gpu",
                   help="where instances run (default gpu); an .onnx on cpu runs on the OpenVINO backend")
    p.add_argument("--backend", choices=["tensorrt", "onnxruntime", "openvino"],
                   help="Triton backend (default: tensorrt for .plan; onnxruntime for .onnx on gpu, openvino on cpu)")
    p.set_defaults(func=cmd_export_triton)

    p = sub.add_parser("serve", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="serve an engine over Triton's HTTP / gRPC protocol (PyTriton)",
                       description="Serve an engine on Triton's HTTP and gRPC protocol (binary tensors) with dynamic "
                       "batching: model cleandift (features per tap) and cleandift_match (matches). Listens on "
                       "loopback unless --host says otherwise. Needs PyTriton and numpy<2 (docs/serving.md).",
                       epilog=SERVE_EXAMPLES)
    add_engine_args(p, tap=None)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--http-port", type=port, default=8000, metavar="P", help="HTTP port (default 8000)")
    g.add_argument("--grpc-port", type=port, default=8001, metavar="P", help="gRPC port (default 8001)")
    g.add_argument("--metrics-port", type=port, default=8002, metavar="P",
                   help="Prometheus metrics port (default 8002)")
    g.add_argument("--max-batch", type=positive_int, metavar="N", help="most images per batch, requests joined "
                   "(default: the engine's maximum, else 8)")
    g.add_argument("--queue-delay-us", type=non_negative_int, default=1000, metavar="D",
                   help="how long the dynamic batcher waits to fill a batch (default 1000)")
    g.add_argument("--no-dynamic-batching", action="store_true", help="run every request on its own")
    g.add_argument("--match-tap", metavar="TAP", help="tap cleandift_match uses for images (default us6, else the "
                   "engine's first)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-env", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="build a server environment (numpy<2 + PyTriton) over this one",
                       epilog="example:\n  cleandift-rt serve-env --out .venv-serve && "
                       ".venv-serve/bin/cleandift-rt serve --engine sd21.onnx",
                       description="Build a Python environment for `cleandift-rt serve` layered over this one: numpy "
                       "1.26, ml_dtypes 0.5 and PyTriton in its own site-packages, everything else read from this "
                       "environment (nothing here changes). Built once; reused while this environment, its Python "
                       "and the pins stay the same. Prints the server command.")
    p.add_argument("--out", metavar="DIR", help="where (default: ~/.cache/cleandift-rt/serve-env-HASH, or under "
                   "$CLEANDIFT_CACHE)")
    p.set_defaults(func=cmd_serve_env)


def cmd_export_triton(args) -> int:
    from ..serving.repository import export_triton

    folder = export_triton(args.engine, args.out, name=args.name, max_batch=args.max_batch, instances=args.instances,
                           queue_delay_us=args.queue_delay_us, instance_kind=args.instance_kind,
                           backend=args.backend)
    print(f"wrote {folder}: config.pbtxt, {next((folder / '1').iterdir()).name} and README.md (how to serve and call "
          "it)")
    return 0


def cmd_serve(args) -> NoReturn:
    from ..serving.environment import check_server_python
    from ..serving.server import ServeOptions, serve

    check_server_python()  # before the engine loads
    if not _is_loopback(args.host):
        print(f"serve: warning: listening on {args.host}: other machines can reach the server, which has no "
              "authentication", file=sys.stderr)
    engine = open_engine(args)
    limit = engine.max_batch
    if args.max_batch is not None and limit is not None and args.max_batch > limit:
        raise UserError(f"--max-batch {args.max_batch} is above this engine's maximum batch {limit}")
    recorded = engine.info.get("batch", {}).get("max")
    max_batch = args.max_batch or limit or recorded or 8
    options = ServeOptions(max_batch=int(max_batch), host=args.host, http_port=args.http_port,
                           grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                           queue_delay_us=args.queue_delay_us, dynamic_batching=not args.no_dynamic_batching,
                           match_tap=args.match_tap)
    serve(engine, options, log=lambda line: print(line, flush=True))
    # Stopped and released: Triton, its stubs, shared memory and workspace are gone. What would remain is
    # the interpreter tearing down the engine's heap object by object (2-5 s on a busy machine), which
    # would keep a stopped server's process alive: end it here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve_env(args) -> int:
    from ..serving.environment import default_layered_dir, layered_env

    python = layered_env(args.out or default_layered_dir(), log=lambda line: print(line, flush=True))
    print(f"server environment ready: {python}\nrun: {python.parent / 'cleandift-rt'} serve --engine MODEL.onnx")
    return 0
