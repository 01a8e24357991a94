"""Export a CleanDIFT student to one ONNX graph: image -> VAE encoder -> student U-Net -> named taps.

Graph contract (recorded in the file's ``metadata_props``, see ``artifact.ArtifactInfo``):

- input ``images``: float32 ``B x 3 x H x W``, RGB in [-1, 1] (what ``preprocess.prepare_images``
  produces; the Engine applies the size policy before the graph);
- input ``prompt_embeds``: float32 ``E x L x D`` text embeddings, E = 1 (shared) or B. It is also
  an initializer holding the baked prompt's embedding, so ONNX Runtime uses that default when
  the input is not fed (``build_engine`` turns it into a plain input for TensorRT);
- outputs: one ``B x C x h x w`` float32 tensor per requested tap, named after the tap. The graph
  ends at the last requested tap (the tracer only records what ran: ``capture.unet_taps`` stops
  the forward there), so later decoder blocks, ``conv_out`` and the VAE decoder are absent;
- then one output per derived output (``derived=[...]``, ``formats.derived``), ``B x C x H/s x W/s``
  computed in the graph from the taps it reads through the module its export hook gives,
  listed in the metadata's ``derived`` (name, channels, stride, taps read) and described by its
  ``extra[name]``. ``aggregator=`` (an ``aggregator.safetensors`` of the ``cleandift`` /
  ``cleandift-heads`` source, the option that ``hyper`` registers) is the Diffusion Hyperfeatures
  descriptor ``hyper``, heads included; its ``extra["hyper"]`` holds channels, stride, source,
  layers, timesteps and the file name.

The posterior mean is used (deterministic), times the VAE scaling factor; the student's timestep
is a constant, so its embedding MLP folds away. ``encoder=`` (a fast-encoder folder,
``models.fast_encoder``) puts that encoder in the graph in place of the VAE's; the metadata's
``encoder`` names it with its hash (None: the VAE's).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..checkpoint import check_finite_weights, staging_folder
from ..formats.artifact import (EMBEDS_INPUT, IMAGE_INPUT, SIZE_MULTIPLE, ArtifactInfo, parse_batch, read_onnx_info,
                                size_fields, tap_records)
from ..features.capture import unet_taps
from ..formats.derived import DerivedOutput, open_derived, record
from ..models import BaseModel, Student, load_base, load_student
from ..models.fast_encoder import FastEncoder, check_pairing, load_fast_encoder, pairing_warning, read_record
from ..models.robot_dift import export_latent, is_robot_dift_package, load_robot_dift
from ..features.preprocess import check_policy
from ..taps import resolve_taps, tap_channels
from .onnx_files import check_onnx, save_onnx, set_metadata
from .mixed_precision import PrecisionPolicy, calibration_feeds, convert_to_fp16, measure_ranges

OPSET = 17


class FeatureGraph(nn.Module):
    """The traced forward: pixels in [-1, 1] and prompt embeddings -> tuple of taps (in table order),
    then the derived outputs (``formats.derived.DerivedOutput``), each from the module of its export hook.
    ``encoder``: a ``FastEncoder`` that gives the latents in place of the base VAE's encoder."""

    def __init__(self, base: BaseModel, student: Student, taps: Sequence[str], derived=(),
                 encoder: FastEncoder | None = None):
        super().__init__()
        self.encoder = encoder
        self.vae = base.vae if encoder is None else None
        self.unet = student.unet
        self.timestep = float(student.timestep)
        self.scaling_factor = base.scaling_factor
        self.taps = tuple(taps)
        derived = [derived] if isinstance(derived, DerivedOutput) else list(derived)
        channels = tap_channels(base.block_out_channels)
        exports = [d.for_export(channels) for d in derived]  # raises when one does not fit this model
        self.descriptions = {d.name: e.description for d, e in zip(derived, exports)}
        self.derived = nn.ModuleList(e.module for e in exports)
        self.derived_reads = [tuple(d.reads) for d in derived]
        self.computed = resolve_taps([*self.taps, *(t for reads in self.derived_reads for t in reads)])

    def forward(self, images: torch.Tensor, prompt_embeds: torch.Tensor):
        if self.encoder is not None:
            latents = self.encoder(images)
        else:
            latents = self.vae.encode(images).latent_dist.mean * self.scaling_factor
        embeds = prompt_embeds.expand(images.shape[0], -1, -1)
        feats = unet_taps(self.unet, latents, self.timestep, embeds, self.computed)
        outputs = tuple(feats[t] for t in self.taps)
        for reads, module in zip(self.derived_reads, self.derived):
            outputs += (module({t: feats[t] for t in reads}),)
        return outputs


PRECISIONS = ("fp32", "fp16", "int8")


def fp32_reference_path(out: str | Path) -> Path:
    """Where an fp16 or int8 export keeps the fp32 graph it was made from (calibration and build-time checks)."""
    out = Path(out)
    return out.with_name(out.stem + ".fp32.onnx")


def check_export_args(out: str | Path, size: Sequence[int] | None, dynamic_size: Sequence[int] | None,
                      taps=None, batch: str | None = None, resize: str = "stretch",
                      precision: str = "fp32", aggregator=None, derived=(), encoder=None) -> tuple[list[str], dict]:
    """Everything about an export request that can be wrong before the (multi-GB) models load.

    Returns the resolved taps and batch range; raises ``ValueError`` naming the problem.
    """
    open_derived(derived, aggregator=aggregator)
    if encoder is not None and not isinstance(encoder, FastEncoder):
        read_record(encoder)  # the folder and its record, before the models load
    if Path(out).suffix != ".onnx":
        raise ValueError(f"output {out} must end in .onnx")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        from .int8 import import_nncf

        import_nncf()  # before the models load
    wanted = resolve_taps(taps)
    check_policy(resize)
    batch_range = parse_batch(batch)
    if size is not None or dynamic_size is not None:
        size_fields(size, dynamic_size, native=SIZE_MULTIPLE)  # the native size only picks a default
    return wanted, batch_range


def export_onnx(student: str | Path | Student, base: str | Path | BaseModel, out: str | Path, *,
                size: Sequence[int] | None = None, dynamic_size: Sequence[int] | None = None,
                taps=None, batch: str | None = None, prompt: str = "", resize: str = "stretch",
                external_data: bool | None = None, precision: str = "fp32", policy: PrecisionPolicy | None = None,
                aggregator=None, derived=(), allow_pickle: bool = False, latent: str | None = None,
                encoder=None, int8=None, log=print) -> ArtifactInfo:
    """Write ``out`` (and ``out`` + ``.data`` when the weights go outside) and return its metadata.

    ``size`` (H, W) fixes the input size; ``dynamic_size`` (MIN, MAX) makes H and W dynamic within
    that range (multiples of 64). ``batch`` "MIN:OPT:MAX" is recorded for TensorRT profiles; the
    ONNX batch axis is always dynamic. ``external_data`` None = only when the model exceeds 2 GB.
    ``precision="fp16"`` writes the fp32 graph to ``fp32_reference_path(out)`` first and ``out`` as
    its fp16 conversion with fp32 islands (``write_fp16_onnx``; strongly typed TensorRT needs it).
    ``precision="int8"`` does the same with the int8 quantization of the fp32 graph (``export.int8``;
    ``int8``: its ``Int8Options``, calibration images and accuracy target).
    ``derived`` (``formats.derived.DerivedOutput``s) and ``aggregator`` (a path or an ``Aggregator``: the
    ``hyper`` output) add outputs computed from taps (module docstring). ``student`` may be a
    Robot-DIFT package folder (``models.robot_dift``; ``allow_pickle`` for ``.bin`` weights, ``latent="mode"``
    for ``"sample"`` packages): instructions then go in through the ``prompt_embeds`` input. ``encoder``
    (a fast-encoder folder or ``FastEncoder``) replaces the VAE encoder in the graph; a student adapted
    to another encoder is warned about.
    """
    import onnx

    out = Path(out)
    wanted, batch_range = check_export_args(out, size, dynamic_size, taps, batch, resize, precision, encoder=encoder)
    outputs_derived = [given.output for given in open_derived(derived, aggregator=aggregator)]
    t0 = time.perf_counter()
    base_model = base if isinstance(base, BaseModel) else load_base(base)
    package = None
    if not isinstance(student, Student) and is_robot_dift_package(student):
        package = load_robot_dift(student, base_model, allow_pickle=allow_pickle)
        latent = export_latent(package, latent, base_model.vae)
        student_model = package.student
    elif allow_pickle or latent is not None:
        raise ValueError("allow_pickle= and latent= apply to Robot-DIFT package folders (with metadata.json)")
    else:
        student_model = student if isinstance(student, Student) else load_student(student, base_model)
    fast = _fast_encoder(encoder, base_model, student_model, package is not None)
    base_model.to(device="cpu", dtype=torch.float32)
    student_model.unet.to(device="cpu", dtype=torch.float32)
    sizes = size_fields(size, dynamic_size, base_model.resolution)
    embeds = base_model.encode_prompt(prompt).float()
    info = ArtifactInfo(
        taps=tap_records(wanted, base_model.block_out_channels), resize=resize, batch=batch_range,
        base_model=Path(base_model.source).name, variant=base_model.variant,
        student=Path(student_model.source).name if student_model.source else "", prompt=prompt,
        timestep=float(student_model.timestep), cross_attention_dim=int(embeds.shape[-1]),
        prompt_tokens=int(embeds.shape[1]), block_out_channels=base_model.block_out_channels,
        scaling_factor=base_model.scaling_factor, text_conditioning=student_model.text_conditioning,
        encoder=None if fast is None else fast.describe(), **sizes)
    if package is not None:
        info.extra["robot_dift"] = package.record(latent)
    graph = FeatureGraph(base_model, student_model, wanted, outputs_derived, encoder=fast).eval()
    check_finite_weights(graph.state_dict(), f"the model to export ({student_model.source or 'student'})")
    info.derived = [record(d) for d in outputs_derived]
    info.extra.update(graph.descriptions)  # each derived output describes itself under its name
    outputs = [*wanted, *(d.name for d in outputs_derived)]
    log(f"loaded models in {time.perf_counter() - t0:.1f} s; exporting {', '.join(outputs)}")

    h, w = sizes["default_size"]
    example = (torch.zeros(2, 3, h, w), embeds)  # batch 2: nothing gets specialised to 1
    dynamic_axes = {IMAGE_INPUT: {0: "batch"}, EMBEDS_INPUT: {0: "prompt_batch", 1: "tokens"}}
    for tap in outputs:
        # every output its own spatial axis names: shared names make ONNX Runtime reuse buffers wrongly
        dynamic_axes[tap] = {0: "batch", **({2: f"{tap}_h", 3: f"{tap}_w"} if info.dynamic_size else {})}
    if info.dynamic_size:
        dynamic_axes[IMAGE_INPUT].update({2: "height", 3: "width"})

    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent, "export") as tmp:  # what a killed export left here is removed first
        raw = Path(tmp) / "raw.onnx"
        t1 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            # diffusers' shape asserts and the exporter's folding notes are expected here, not news
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            # the TorchScript exporter is chosen on purpose (docs/engine.md): its deprecation notes are known
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            torch.onnx.export(graph, example, str(raw), input_names=[IMAGE_INPUT, EMBEDS_INPUT],
                              output_names=outputs, dynamic_axes=dynamic_axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        log(f"traced and exported in {time.perf_counter() - t1:.1f} s")
        model = onnx.load(str(raw))  # pulls in the per-tensor external files the exporter may write
    _finish_graph(model, embeds, info)
    fp32_out = fp32_reference_path(out) if precision in ("fp16", "int8") else out
    save_onnx(model, fp32_out, external_data)
    del model
    log(f"wrote {fp32_out} ({_size_text(fp32_out)}) in {time.perf_counter() - t0:.1f} s")
    if precision == "fp16":
        info = write_fp16_onnx(fp32_out, out, policy or PrecisionPolicy(), external_data=external_data, log=log)
    if precision == "int8":
        from .int8 import Int8Options, write_int8_onnx

        info = write_int8_onnx(fp32_out, out, int8 or Int8Options(), external_data=external_data, log=log)
    return info


def _fast_encoder(encoder, base: BaseModel, student: Student, robot_dift: bool) -> FastEncoder | None:
    """The fast encoder to trace (None: the VAE's), checked against the base; warns when the student was
    adapted to another encoder than the one the graph will run."""
    if encoder is not None and robot_dift:
        raise ValueError("--encoder applies to CleanDIFT students; a Robot-DIFT package encodes with its own VAE")
    fast = None if encoder is None else load_fast_encoder(encoder).to(device="cpu", dtype=torch.float32).eval()
    for message in [] if fast is None else check_pairing(fast, base):
        warnings.warn(message, stacklevel=3)
    message = pairing_warning(getattr(student, "encoder", None), fast, Path(student.source).name or "student")
    if message:
        warnings.warn(message, stacklevel=3)
    return fast


def write_fp16_onnx(fp32_path: str | Path, out: str | Path, policy: PrecisionPolicy = PrecisionPolicy(),
                    calibration: dict | None = None, external_data: bool | None = None, log=print) -> ArtifactInfo:
    """Convert an exported fp32 graph into an fp16 one with fp32 islands (``export.mixed_precision``).

    Value ranges are measured on ``calibration`` feeds (default: the bundled photos at the graph's
    size) unless the policy has no ``max_abs``. The metadata keeps everything the fp32 file says,
    plus the precision, the policy with its node counts and the fp32 reference's file name.
    """
    import onnx

    fp32_path, out = Path(fp32_path), Path(out)
    info = read_onnx_info(fp32_path)
    if info.extra.get("precision", "fp32") != "fp32":
        raise ValueError(f"{fp32_path} is already a {info.extra['precision']} graph; convert the fp32 export")
    if fp32_path.resolve() == out.resolve():
        raise ValueError(f"the fp16 graph needs its own file: {out} is the fp32 input")
    t0 = time.perf_counter()
    ranges = None
    if policy.max_abs is not None:
        feeds = calibration if calibration is not None else calibration_feeds(tuple(info.default_size))
        ranges = measure_ranges(fp32_path, feeds, progress=True)
        log(f"measured value ranges of {len(ranges)} tensors in {time.perf_counter() - t0:.1f} s")
    model = onnx.load(str(fp32_path))
    summary = convert_to_fp16(model, policy, ranges)
    info = dataclasses.replace(info, extra=dict(info.extra, precision="fp16", precision_policy=summary,
                                                fp32_reference=fp32_path.name))
    set_metadata(model, info)
    save_onnx(model, out, external_data)
    kept = ", ".join(f"{rule} {n}" for rule, n in summary["fp32_nodes"].items()) or "none"
    log(f"wrote {out} ({_size_text(out)}): {summary['fp16_nodes']} nodes fp16, fp32 islands: {kept}; "
        f"reference {fp32_path.name}")
    return info


def _finish_graph(model, embeds: torch.Tensor, info: ArtifactInfo) -> None:
    """Drop unused weights, bake the default prompt embedding, attach the metadata."""
    from onnx import numpy_helper

    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    for subgraph_node in graph.node:  # If/Loop bodies (none expected, but never drop their weights)
        for attr in subgraph_node.attribute:
            if attr.g is not None:
                used.update(n for node in attr.g.node for n in node.input)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.initializer.append(numpy_helper.from_array(embeds.detach().cpu().numpy(), EMBEDS_INPUT))
    # The tracer's symbolic shapes unify unrelated dims (an output's height can come out named
    # "batch"), and ONNX Runtime trusts them when planning buffers: drop the intermediate ones and
    # state the outputs' shapes from the tap table.
    del graph.value_info[:]
    for output in graph.output:
        _set_output_shape(output, info)
    set_metadata(model, info)


def _set_output_shape(output, info: ArtifactInfo) -> None:
    name = output.name  # a tap or a derived output
    channels, *spatial = info.output_shape(name, *info.default_size)
    if info.dynamic_size:
        spatial = [f"{name}_h", f"{name}_w"]
    dims = output.type.tensor_type.shape.dim
    for dim, value in zip(dims, ["batch", channels, *spatial]):
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value


def remove_onnx(path: str | Path) -> None:
    """Delete an exported model and its external data file."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def _size_text(path: Path) -> str:
    data = path.with_name(path.name + ".data")
    total = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return f"{total / 2**20:.1f} MiB" + (f", weights in {data.name}" if data.exists() else "")


__all__ = ["export_onnx", "write_fp16_onnx", "fp32_reference_path", "FeatureGraph", "save_onnx", "check_onnx",
           "remove_onnx", "OPSET"]