"""``Engine``: one object for every way of running CleanDIFT feature extraction.

``Engine(path)`` picks the backend from the file (``backend=`` names one): ``.onnx`` -> ONNX
Runtime or OpenVINO (``choose_onnx_backend``), ``.plan`` -> TensorRT, a student ``_unet`` /
``_full`` safetensors file or a diffusers folder -> PyTorch. All share the input handling
(``preprocess.prepare_images``: same pixels everywhere), the tap checks, batch splitting to the
engine's profile and the output convention (torch in -> torch out, else numpy).

Outputs derived from taps (``formats.derived``): ``Engine(..., derived=[...])`` computes them in
PyTorch on the backend's taps, and a file exported with them has them in its graph. Either way
their names are listed in ``Engine.taps`` and ``extract`` returns them beside the requested taps
(``taps=["hyper"]`` asks for one alone). ``aggregator=FILE`` is the Diffusion Hyperfeatures
descriptor ``"hyper"`` (an ``aggregator.safetensors`` of the ``cleandift`` or ``cleandift-heads``
source, aggregator and heads run in PyTorch): an option that ``hyper`` registers with
``formats.derived``, so the runtime never imports it.

The way of an image: ``extract`` checks and prepares each image once (``prepare_images``: pixels
``B x 3 x H x W`` in [-1, 1]) and each prompt embedding once (``check_prompt_embeds``); the
backend (``backends.Backend``) runs on those prepared tensors and checks nothing again.
"""

from __future__ import annotations

import importlib.util
import queue
import re
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..checks import check_int, check_size
from ..features.extractor import check_prompt_embeds
from ..features.preprocess import check_policy, load_image, prepare_images
from ..formats.artifact import ArtifactInfo, read_info
from ..formats.quantized import file_precision
from ..kernels import precision as precision_rules
from ..kernels.precision import check_precision, cpu_precision
from ..models.robot_dift import is_robot_dift_package
from .backends.common import Backend, check_finite_outputs
from .derived import DerivedOutputs
from .latest import check_policy as check_stream_policy, frames as policy_frames
from .quantized import int8_choice


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")  # the device strings every backend understands
BACKENDS = {"onnxruntime": ".onnx", "openvino": ".onnx", "tensorrt": ".plan", "torch": "student"}
_ALIASES = {"pytorch": "torch"}  # the torch backend's info["backend"] name, accepted too
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
MAX_THREADS = 1024  # CPU threads a runtime may be given (ONNX Runtime takes a C int)
_INSTALL = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_onnx_backend(backend: str | None, device: str | None, precision: str | None) -> tuple[str, str]:
    """(backend, precision that will run) for an ``.onnx`` file.

    ``precision=None`` is the fast precision where the file runs on a CPU with native bf16
    (AVX512_BF16 or AMX) and OpenVINO is installed: bf16, as OpenVINO itself defaults to there
    (per-tap cosine to fp32 >= 0.995, docs/cpu.md); else fp32. ``"fp32"`` keeps the reference path.
    The rule for ``backend=None`` (docs/engine.md): bf16 runs on OpenVINO (ONNX Runtime has no bf16
    CPU path); fp32 runs on ONNX Runtime when it is installed (its GPU build brings the CUDA and
    TensorRT providers; on the CPU it is the parity-tested reference path, faster than OpenVINO
    fp32 at the tiny size and level with it at SD 2.1 size), else on OpenVINO (CPU only). bf16 is
    honoured only where the CPU has it natively; elsewhere it warns once and runs fp32
    (``kernels.precision``).
    """
    on_cuda = device is not None and device.startswith("cuda")
    if precision is None and backend != "onnxruntime" and _cpu_bf16_default(device, backend):
        precision = "bf16"
    if precision == "fp16":
        raise ValueError("precision 'fp16' is for CUDA: build a TensorRT plan (export/build_engine.py --fp16) or run "
                         "the student with backend='torch' on a CUDA device; .onnx files run 'fp32' or 'bf16'")
    if precision == "bf16":
        if backend == "onnxruntime":
            raise ValueError("ONNX Runtime has no bf16 CPU path: use backend='openvino' (or backend=None, which picks "
                             "it for bf16), backend='torch' with a student file, or precision='fp32'")
        if on_cuda:
            raise ValueError("bf16 for .onnx files runs on the CPU (OpenVINO): pass device='cpu', or build a TensorRT "
                             "plan for CUDA (export/build_engine.py)")
        precision = cpu_precision("bf16", stacklevel=4)
    precision = precision or "fp32"
    if backend is not None:
        return backend, precision
    if precision == "bf16":
        return "openvino", precision
    for name in ("onnxruntime",) if on_cuda else ("onnxruntime", "openvino"):
        if installed(name):
            return name, precision
    raise ImportError("running .onnx files needs ONNX Runtime or OpenVINO: " +
                      (f"{_INSTALL['onnxruntime']} (onnxruntime-gpu for CUDA)" if on_cuda else
                       f"{_INSTALL['openvino']} (CPU, fp32 and native bf16) or {_INSTALL['onnxruntime']}"))


def _cpu_bf16_default(device: str | None, backend: str | None) -> bool:
    """Whether ``precision=None`` means bf16: OpenVINO installed, a CPU with native bf16, and the file
    runs on the CPU (``device="cpu"``, OpenVINO, or no device named and no GPU build of ONNX Runtime
    that would take it to a GPU)."""
    if (device is not None and not device.startswith("cpu")) or not precision_rules.native_bf16() \
            or not installed("openvino"):
        return False
    if device is not None or backend == "openvino" or not installed("onnxruntime"):
        return True
    import onnxruntime

    return not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers())


def _check_backend(backend, kind: str, path: Path):
    """The canonical backend name, checked against the kind of file (".onnx", ".plan", "student")."""
    if backend is None:
        return None
    name = _ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(map(repr, BACKENDS))} (or None to "
                         "choose from the file)")
    if BACKENDS[name] != kind:
        runs = {".onnx": "'onnxruntime' or 'openvino'", ".plan": "'tensorrt'", "student": "'torch'"}[kind]
        how = {".onnx": "export the student with export/export_onnx.py", ".plan": "build a plan with export/build_engine.py",
               "student": "pass a student .safetensors file or a diffusers folder"}[BACKENDS[name]]
        raise ValueError(f"backend {backend!r} cannot run {path.name} (it runs on {runs}); for {name}, {how}")
    return name


@dataclass
class StreamResult:
    """One item of ``Engine.stream``: its position in the input, its features, and how long it took."""

    index: int
    features: dict
    latency: float  # seconds from reading the item off the iterable to its features being ready
    inference: float  # seconds of the backend call that produced it (shared by a batch)
    capture_time: float = 0.0  # time.perf_counter() when the item was read off the iterable
    dropped: int = 0  # items dropped since the previous result (policy="latest")


class Engine:
    """Dense CleanDIFT features from an exported or PyTorch model.

    Args:
        path: ``.onnx``, ``.plan``, a student ``.safetensors`` (``_unet`` or ``_full``) or a diffusers folder.
        base: base model folder (VAE, text encoder) for student files; ignored by exported files.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; None = the best available.
        taps: default tap selection for ``extract`` (all the file's taps when None).
        size: input size (H, W) for dynamic-size files and the PyTorch backend; fixed files keep theirs.
        resize: size policy, ``"stretch"`` or ``"pad"`` (default: the one recorded at export).
        precision: ``"fp32"`` (the reference), ``"bf16"`` (native bf16 on CPUs with AVX512_BF16 or AMX:
            OpenVINO's bf16 for ``.onnx``, CPU autocast for the PyTorch backend; on other CPUs it warns once
            and runs fp32) or ``"fp16"`` (PyTorch backend on CUDA). None: bf16 for an ``.onnx`` file run on a
            CPU with native bf16 (OpenVINO installed), fp32 otherwise (``choose_onnx_backend``).
            ``info["precision"]`` says what ran.
        threads: CPU threads of ONNX Runtime / OpenVINO (default: all cores this process may use).
        max_batch: split batches into chunks of at most this many images (default: the plan's profile).
        cuda_graph: TensorRT only: replay captured CUDA graphs for fixed-size plans.
        prompt: PyTorch backend only: the prompt whose embedding is the default (exports bake theirs).
        backend: ``"onnxruntime"`` or ``"openvino"`` (``.onnx``), ``"tensorrt"`` (``.plan``), ``"torch"``
            (student files, diffusers folders); None chooses from the file (``choose_onnx_backend``).
        aggregator: an ``aggregator.safetensors`` (``cleandift-rt train-aggregator``, source ``cleandift`` or
            ``cleandift-heads``): the derived output ``"hyper"``, the Diffusion Hyperfeatures descriptor.
        derived: outputs computed from taps (``formats.derived.DerivedOutput``, e.g. a ``hyper.Aggregator``),
            run in PyTorch on the backend's taps. Each is added to ``taps`` (beside the default taps, whatever
            ``taps`` says); ``extract(taps=[...])`` still returns exactly those asked for.
        allow_pickle, latent, seed: Robot-DIFT package folders only (``models.robot_dift``): read ``.bin``
            weights; how a ``"sample"`` package encodes (``latent="sample", seed=N`` or ``latent="mode"``).
        encoder: student files only: a fast-encoder folder (``cleandift-rt distill-encoder``) that gives the
            latents in place of the base VAE's encoder (exports carry theirs: ``export_onnx.py --encoder``);
            ``info["encoder"]`` names the encoder that runs (None: the VAE's).
    """

    def __init__(self, path, base=None, device: str | None = None, taps=None, *, size=None, resize: str | None = None,
                 precision: str | None = None, threads: int | None = None, max_batch: int | None = None,
                 cuda_graph: bool = False, prompt: str = "", backend: str | None = None, aggregator=None,
                 derived=(), allow_pickle: bool = False, latent: str | None = None, seed: int | None = None,
                 encoder=None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist")
        suffix = self.path.suffix
        if isinstance(base, str) and _DEVICE.fullmatch(base) and not Path(base).exists():
            # Engine(path, "cuda") reads as a device, but the second argument is the base model folder
            raise ValueError(f"base={base!r} looks like a device; pass it as device={base!r} "
                             "(the second argument names the base model folder of a student checkpoint)")
        kind = suffix if suffix in (".onnx", ".plan") else "student"
        backend = _check_backend(backend, kind, self.path)
        check_precision(precision, PRECISIONS)
        if precision is not None and kind == ".plan":
            raise ValueError(f"precision={precision!r}: the precision of a .plan file is fixed when it is built "
                             "(export/build_engine.py)")
        if resize is not None:
            check_policy(resize)
        max_batch = None if max_batch is None else check_size(max_batch, "max_batch")
        threads = None if threads is None else check_int(threads, "threads (None: all usable cores)", 1, MAX_THREADS)
        if device is not None and not _DEVICE.fullmatch(str(device)):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (or None for the best available), got {device!r}")
        device = None if device is None else str(device)  # a torch.device works too
        _check_options_apply(kind, self.path, base=base, prompt=prompt, cuda_graph=cuda_graph, threads=threads,
                             device=device)
        if (allow_pickle or latent is not None or seed is not None) and not is_robot_dift_package(self.path):
            raise ValueError(f"allow_pickle=, latent= and seed= apply to Robot-DIFT package folders; {self.path.name} "
                             "is not one (no metadata.json)")
        if encoder is not None and (kind != "student" or is_robot_dift_package(self.path)):
            raise ValueError(f"encoder= gives a student file a fast encoder (PyTorch backend); {self.path.name} " + (
                "has its encoder in the graph: export the student with --encoder DIR" if kind != "student" else
                "is a Robot-DIFT package, which encodes with its own VAE"))
        # small files, read before the big models load; computed here, in PyTorch, on the backend's taps
        self._derived = DerivedOutputs(derived, aggregator=aggregator)
        extra = {}
        if suffix in (".onnx", ".plan"):  # check the options against the metadata before loading anything big
            meta = read_info(self.path)
            self._configure(meta, size, resize, taps)
            extra = meta.extra
        int8 = int8_choice(self.path, backend, device, precision, file_precision(extra), extra.get("fp32_reference"))
        self.requested_precision = precision
        self.backend: Backend
        if suffix == ".onnx":
            backend, precision = int8 or choose_onnx_backend(backend, device, precision)
            if backend == "openvino":
                from .backends.openvino import OpenVINOBackend

                self.backend = OpenVINOBackend(self.path, device=device, threads=threads, precision=precision)
            else:
                from .backends.onnxruntime import OnnxRuntimeBackend

                self.backend = OnnxRuntimeBackend(self.path, device=device, threads=threads)
        elif suffix == ".plan":
            from .backends.tensorrt import TensorRTBackend

            self.backend = TensorRTBackend(self.path, device=device, cuda_graph=cuda_graph)
        elif is_robot_dift_package(self.path):
            from .backends.robot_dift import RobotDiftBackend

            self.backend = RobotDiftBackend(self.path, base=base, device=device, precision=precision, size=size,
                                            resize=resize or "stretch", prompt=prompt, allow_pickle=allow_pickle,
                                            latent=latent, seed=seed)
        else:
            from .backends.torch import TorchBackend

            self.backend = TorchBackend(self.path, base=base, device=device, precision=precision, size=size,
                                        resize=resize or "stretch", prompt=prompt, encoder=encoder)
        self._configure(self.backend.info, size, resize, taps)
        limits = [m for m in (max_batch, self.backend.max_batch) if m is not None]
        self.max_batch = min(int(m) for m in limits) if limits else None
        if self.max_batch is not None and self.max_batch < self.backend.min_batch:
            raise ValueError(f"max_batch {self.max_batch} is below the engine's minimum batch {self.backend.min_batch}")

    def _configure(self, meta: ArtifactInfo, size, resize, taps) -> None:
        self.size = meta.check_size(size)
        self.resize = check_policy(resize or meta.resize)
        self._derived.configure(meta, self.path)
        self._taps = self._derived.default(meta, taps)

    # -- description ---------------------------------------------------------------------------

    @property
    def taps(self) -> tuple[str, ...]:
        """Taps ``extract`` returns by default."""
        return self._taps

    @property
    def derived(self) -> dict:
        """The derived outputs this Engine computes in PyTorch (``derived=``, ``aggregator=``), by name."""
        return self._derived.computed

    @property
    def info(self) -> dict:
        """The file's metadata plus what actually runs (backend, providers, device, size in use)."""
        d = self.backend.info.to_dict()
        d.update(self.backend.describe())
        d.setdefault("precision", _ran_precision(d))
        if self.requested_precision not in (None, d["precision"]):
            d["precision_requested"] = self.requested_precision  # not honoured here (see the warning)
        d.update(path=str(self.path), size=list(self.size), resize=self.resize, max_batch=self.max_batch,
                 default_taps=list(self._taps))
        d.update(self._derived.describe(self.backend.info))
        return d

    def __repr__(self) -> str:
        return (f"Engine({str(self.path)!r}, backend={self.backend.name}, precision={self.info['precision']}, "
                f"taps={','.join(self._taps)}, size={self.size[0]}x{self.size[1]})")

    # -- extraction ----------------------------------------------------------------------------

    def extract(self, images, taps=None, prompt_embeds=None, prompt=None) -> dict:
        """Features ``{tap: B x C x h x w}`` for a batch of images.

        ``images``: a list of PIL images or uint8 H x W x 3 arrays, a uint8 N x H x W x 3 array, or a
        float N x 3 x H x W numpy array / torch tensor in [-1, 1]. Torch tensors in -> torch tensors
        out (on the input's device); anything else -> numpy arrays. ``prompt_embeds``: ``[L, D]`` or
        ``[B, L, D]`` text embeddings replacing the baked prompt. ``prompt``: Robot-DIFT packages: the
        instruction, one text for the batch or one per image (encoded once per distinct text).
        """
        wanted = self._derived.select(self.backend.info, taps) if taps is not None else self._taps
        pixels = prepare_images(images, self.size, self.resize).pixels
        if prompt is not None:
            prompt_embeds = self._encode_prompt(prompt, pixels.shape[0], prompt_embeds)
        embeds = self._embeds(prompt_embeds, pixels.shape[0])
        feats = self._run_chunked(pixels, embeds, wanted)
        return _to_caller(feats, images)

    __call__ = extract

    def _encode_prompt(self, prompt, batch: int, prompt_embeds) -> torch.Tensor:
        """``[B, L, D]`` embeddings of one instruction for the batch or one per image, by the package's base."""
        encode = getattr(self.backend, "encode_prompt", None)
        if prompt_embeds is not None:
            raise ValueError("pass prompt= or prompt_embeds=, not both")
        if encode is None:
            raise ValueError(f"prompt= is for Robot-DIFT packages (Engine(folder, base=...)); for {self.path.name} "
                             "encode the text with its base model, cleandift_rt.models.load_base(DIR).encode_prompt("
                             "text), and pass prompt_embeds=")
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be one text or a list of {batch} texts (one per image), got {prompt!r:.80}")
        return encode(prompts)

    def _embeds(self, prompt_embeds, batch: int) -> torch.Tensor | None:
        if prompt_embeds is None:
            return None
        return check_prompt_embeds(prompt_embeds, batch, self.backend.info.cross_attention_dim).float()

    def _run_chunked(self, pixels: torch.Tensor, embeds, taps) -> dict[str, torch.Tensor]:
        n = pixels.shape[0]
        step = self.max_batch or n
        parts = []
        for start in range(0, n, step):
            stop = min(n, start + step)
            run = partial(self._run_padded, pixels[start:stop], None if embeds is None else embeds[start:stop])
            parts.append(self._derived.run(run, self.backend.info.output_names, taps))
        if len(parts) == 1:
            return parts[0]
        return {t: torch.cat([p[t] for p in parts]) for t in taps}

    def _run_padded(self, pixels, embeds, taps) -> dict[str, torch.Tensor]:
        """Run a chunk, repeating its last image up to the profile's minimum batch when needed."""
        n, need = pixels.shape[0], self.backend.min_batch
        if n < need:
            pad = need - n
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
            if embeds is not None:
                embeds = torch.cat([embeds, embeds[-1:].expand(pad, -1, -1)])
        out = check_finite_outputs(self.backend.run(pixels, embeds, taps), self.path)  # once per call, every backend
        return {t: f[:n] for t, f in out.items()} if n < need else out

    # -- streaming -----------------------------------------------------------------------------

    def stream(self, items: Iterable, taps=None, batch_size: int = 1, prefetch: int = 4,
               policy: str = "all") -> Iterator[StreamResult]:
        """Features for a stream of single images, in order, with per-item latency.

        A background thread reads the iterable, decodes (PIL image, uint8 H x W x 3 array, float
        3 x H x W array/tensor in [-1, 1], or an image file path) and preprocesses up to
        ``prefetch`` items ahead while the backend runs; up to ``batch_size`` ready items are run
        together. Each result's features follow ``extract``'s convention for that item.

        ``policy="latest"`` (live cameras): only the item in flight and the newest waiting one are
        held; older waiting items are dropped, unread, and counted in the next result's ``dropped``,
        so latency stays bounded when the source outruns the engine (``runtime.latest``; batch 1).
        """
        batch_size, prefetch = check_size(batch_size, "batch_size"), check_size(prefetch, "prefetch")
        wanted = self._derived.select(self.backend.info, taps) if taps is not None else self._taps
        if check_stream_policy(policy) == "latest":
            if batch_size != 1:
                raise ValueError("policy='latest' runs one item at a time (the newest): use batch_size=1")
            yield from self._stream_latest(items, wanted)
            return
        ready: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        done = object()

        def offer(entry) -> bool:
            """Queue ``entry`` unless the consumer has gone away (then never block)."""
            while not stop.is_set():
                try:
                    ready.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for index, item in enumerate(items):
                    if stop.is_set():  # the consumer is gone: end as soon as the iterable yields
                        return
                    t0 = time.perf_counter()
                    image, torch_device = _stream_item(item, index)
                    pixels = prepare_images(image, self.size, self.resize).pixels
                    if not offer((index, t0, pixels, torch_device)):
                        return
                offer(done)
            except BaseException as exc:  # handed to the consumer, raised there
                offer(exc)

        worker = threading.Thread(target=produce, name="cleandift-rt-stream", daemon=True)
        worker.start()
        try:
            end = None  # `done` or the producer's exception, once it arrives
            while end is None:
                batch = []
                while end is None and len(batch) < batch_size and (not batch or not ready.empty()):
                    entry = ready.get()
                    if entry is done or isinstance(entry, BaseException):
                        end = entry
                    else:
                        batch.append(entry)
                if batch:  # items decoded before a failure are still delivered, then the failure raised
                    t1 = time.perf_counter()
                    feats = self._run_chunked(torch.cat([e[2] for e in batch]), None, wanted)
                    t2 = time.perf_counter()
                    for j, (index, t0, _, torch_device) in enumerate(batch):
                        one = _as_output({t: f[j : j + 1] for t, f in feats.items()}, torch_device)
                        yield StreamResult(index, one, t2 - t0, t2 - t1, t0)
            if end is not done:
                raise end
        finally:
            # Never wait for the producer: it may be blocked inside the caller's iterable (a camera,
            # a socket). It sees `stop` and ends when the iterable next yields or raises.
            stop.set()

    def _stream_latest(self, items: Iterable, wanted) -> Iterator[StreamResult]:
        for frame in policy_frames(items, "latest"):
            image, torch_device = _stream_item(frame.item, frame.index)
            pixels = prepare_images(image, self.size, self.resize).pixels
            t1 = time.perf_counter()
            feats = self._run_chunked(pixels, None, wanted)
            t2 = time.perf_counter()
            yield StreamResult(frame.index, _as_output(feats, torch_device), t2 - frame.capture_time, t2 - t1,
                               frame.capture_time, frame.dropped)


def _ran_precision(d: dict) -> str:
    """Precision of backends that do not report their own: ONNX Runtime's TensorRT provider runs
    fp16 with fp32 islands, its other providers fp32; a plan records how it was built."""
    if d.get("backend") == "onnxruntime":
        return "fp16+fp32" if "TensorrtExecutionProvider" in d.get("providers", ()) else "fp32"
    return d.get("extra", {}).get("precision", "fp32")


def _check_options_apply(kind: str, path: Path, *, base, prompt, cuda_graph, threads, device) -> None:
    """Refuse options the chosen kind of engine would silently ignore."""
    exported = kind in (".onnx", ".plan")
    if exported and base is not None:
        raise ValueError(f"base= gives the VAE and text encoder of a student checkpoint; {path.name} carries its own "
                         "(for other prompts pass prompt_embeds to extract, encoded with that base model)")
    if exported and prompt:
        raise ValueError(f"prompt= applies to student checkpoints (PyTorch backend); {path.name} bakes the prompt it "
                         "was exported with: re-export with --prompt, or pass prompt_embeds to extract")
    if cuda_graph and kind != ".plan":
        raise ValueError(f"cuda_graph=True is for TensorRT plans; {path.name} does not run on TensorRT")
    if threads is not None and kind in (".plan", "student"):
        raise ValueError(f"threads= sets ONNX Runtime / OpenVINO CPU threads; {path.name} runs on "
                         f"{'TensorRT' if kind == '.plan' else 'PyTorch'} (use torch.set_num_threads for PyTorch)")
    if kind == "student" and device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but this PyTorch ({torch.__version__}) sees no CUDA device: install a "
                         "CUDA build of PyTorch on a machine with an NVIDIA GPU, or pass device='cpu'")


def _stream_item(item, index: int):
    """One stream element as an ``extract`` batch of one, and the torch device its features go to
    (None: the caller works in numpy)."""
    if isinstance(item, (str, Path)):
        return [np.asarray(load_image(item))], None
    if isinstance(item, torch.Tensor) or (isinstance(item, np.ndarray) and item.dtype.kind == "f"):
        if item.ndim != 3:
            raise ValueError(f"stream item {index}: float images must be 3 x H x W, got shape {tuple(item.shape)}")
        return item[None], item.device if isinstance(item, torch.Tensor) else None
    return [item], None


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def _as_output(feats: dict[str, torch.Tensor], torch_device) -> dict:
    """Torch tensors on ``torch_device`` (no copy when already there), or numpy when it is None
    (zero-copy on CPU)."""
    if torch_device is not None:
        return {t: f.to(torch_device) for t, f in feats.items()}
    return {t: _numpy(f) for t, f in feats.items()}


def _to_caller(feats: dict[str, torch.Tensor], images) -> dict:
    """Torch in -> torch out on the input's device; else numpy."""
    return _as_output(feats, images.device if isinstance(images, torch.Tensor) else None)


__all__ = ["Engine", "StreamResult"]
