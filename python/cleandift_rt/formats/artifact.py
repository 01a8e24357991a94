"""What an exported feature engine is, written into the file itself and read back by every runtime.

One schema for the ONNX graph (``metadata_props``), the TensorRT plan (a JSON header in front of
the serialized engine, see ``trt_build``) and the CLI's ``info``: taps with channels and strides,
input size and resize policy, batch range, base model, prompt, timestep, the student's text
conditioning, the outputs derived from taps in the graph (``formats.derived``) and the package
version that wrote it, and which encoder gives the latents (the base VAE's or a fast encoder, by name
and hash). ``describe(path)`` reads it without ONNX
Runtime, TensorRT or a GPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..build_info import _package_version
from ..checks import loads_json, read_json_file
from ..features.preprocess import SIZE_MULTIPLE, check_model_size
from ..taps import TAP_TABLE, TAPS, resolve_taps
from .derived import GRAPH_INPUTS, check_records, records_in
from .metadata_check import check_artifact_fields
from .plan import read_plan_header

SCHEMA = 1
FORMAT = "cleandift-rt-features"
META_PREFIX = "cleandift_rt."
IMAGE_INPUT, EMBEDS_INPUT = GRAPH_INPUTS  # "images", "prompt_embeds"


@dataclass
class ArtifactInfo:
    """The self-description of an exported engine (all JSON-serialisable)."""

    taps: list[dict]  # [{name, module, channels, stride}] in table order
    height: int | None  # fixed input size, or None when dynamic
    width: int | None
    size_range: list[int] | None  # [min, max] per side when the size is dynamic
    default_size: list[int]  # the size the Engine uses unless told otherwise
    resize: str  # size policy applied to images ("stretch" or "pad")
    batch: dict  # {"min", "opt", "max"}; max None = unbounded (ONNX Runtime)
    base_model: str
    variant: str
    student: str
    prompt: str
    timestep: float
    cross_attention_dim: int
    prompt_tokens: int
    block_out_channels: list[int]
    scaling_factor: float
    # how the student was trained to take text ("captions", "none", "distill"; conditioning.py), None when
    # its file did not say (the release's files, and exports from before this field)
    text_conditioning: str | None = None
    # the image encoder before the U-Net: None for the base model's VAE encoder (posterior mean x scaling_factor;
    # files from before this field too), else a fast encoder's record (models.fast_encoder: kind, architecture,
    # name, hash, parameters, the VAE it imitates, its held-out latent error)
    encoder: dict | None = None
    input: dict = field(default_factory=lambda: {
        "name": IMAGE_INPUT, "dtype": "float32", "layout": "NCHW", "range": [-1.0, 1.0], "channels": "RGB"})
    package_version: str = field(default_factory=_package_version)
    schema: int = SCHEMA
    format: str = FORMAT
    extra: dict = field(default_factory=dict)  # backend-specific facts (TensorRT version, GPU arch, ...)
    # outputs the graph computes from taps, after them ({name, channels, stride, reads}; formats.derived),
    # each described by its own extra[name]
    derived: list = field(default_factory=list)

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.taps)

    @property
    def dynamic_size(self) -> bool:
        return self.size_range is not None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_props(self) -> dict[str, str]:
        """ONNX ``metadata_props``: one key per field, JSON values, readable in Netron."""
        return {META_PREFIX + k: json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "file") -> "ArtifactInfo":
        if d.get("format") != FORMAT:
            raise ValueError(f"{source} was not written by cleandift-rt (no '{FORMAT}' metadata): "
                             "export it with `python export/export_onnx.py`")
        check_compatible(d, source)
        known = set(cls.__dataclass_fields__)
        try:
            info = cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"{source} has incomplete cleandift-rt metadata ({exc})") from None
        check_artifact_fields(info, source)
        check_records(info.derived, info.extra, source)
        return info

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "file") -> "ArtifactInfo":
        d = {}
        for k, v in props.items():
            if k.startswith(META_PREFIX):
                d[k[len(META_PREFIX):]] = loads_json(v, f"{source}: metadata entry {k!r}")  # depth bounded
        return cls.from_dict(d, source)

    # -- size and batch policy ---------------------------------------------------------------

    def check_size(self, size: Sequence[int] | int | None) -> tuple[int, int]:
        """The input size an Engine should use: the fixed size, or ``size`` inside the dynamic range."""
        if size is None:
            return tuple(self.default_size)
        h, w = check_model_size(size)
        if not self.dynamic_size:
            if (h, w) != (self.height, self.width):
                raise ValueError(f"this engine was exported for {self.height}x{self.width} images, not {h}x{w}: "
                                 "re-export with --size H W or --dynamic-size MIN MAX")
        else:
            lo, hi = self.size_range
            if not (lo <= h <= hi and lo <= w <= hi):
                raise ValueError(f"size {h}x{w} is outside this engine's dynamic range [{lo}, {hi}] per side")
        return h, w

    def check_taps(self, taps) -> tuple[str, ...]:
        """Requested taps (default: all of the file's), each of which the file must provide."""
        if taps is None:
            return self.tap_names
        wanted = resolve_taps(taps)
        missing = [t for t in wanted if t not in self.tap_names]
        if missing:
            raise ValueError(f"taps {missing} are not in this engine (it has {', '.join(self.tap_names)}): "
                             "re-export with --taps including them")
        return wanted

    def tap_shape(self, tap: str, height: int, width: int) -> tuple[int, int, int]:
        t = next(t for t in self.taps if t["name"] == tap)
        return t["channels"], height // t["stride"], width // t["stride"]

    @property
    def derived_outputs(self) -> list[dict]:
        """The graph's derived outputs, files from before the ``derived`` list included (formats.derived)."""
        return records_in(self.derived, self.extra)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Every output of the graph: the taps, then its derived outputs."""
        return self.tap_names + tuple(d["name"] for d in self.derived_outputs)

    def output_shape(self, name: str, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of one output (a tap or a derived output) for an input of ``height`` x ``width`` pixels."""
        for d in self.derived_outputs:
            if d["name"] == name:
                return int(d["channels"]), height // int(d["stride"]), width // int(d["stride"])
        return self.tap_shape(name, height, width)


def tap_records(taps: Sequence[str], block_out_channels: Sequence[int]) -> list[dict]:
    return [{"name": n, "module": TAP_TABLE[n].module, "channels": TAP_TABLE[n].channels(block_out_channels),
             "stride": TAP_TABLE[n].stride} for n in resolve_taps(taps)]


def size_fields(size: Sequence[int] | None, dynamic: Sequence[int] | None, native: int) -> dict:
    """``height``/``width``/``size_range``/``default_size`` from ``--size`` or ``--dynamic-size``."""
    if (size is None) == (dynamic is None):
        raise ValueError("give exactly one of a fixed size (H, W) or a dynamic range (MIN, MAX)")
    if size is not None:
        h, w = check_model_size(size)
        return dict(height=h, width=w, size_range=None, default_size=[h, w])
    lo, hi = (int(v) for v in dynamic)
    if lo % SIZE_MULTIPLE or hi % SIZE_MULTIPLE or not 0 < lo <= hi:
        raise ValueError(f"dynamic size range [{lo}, {hi}] must be multiples of {SIZE_MULTIPLE} with 0 < MIN <= MAX")
    default = min(max(native, lo), hi)
    return dict(height=None, width=None, size_range=[lo, hi], default_size=[default, default])


def parse_batch(spec: str | None) -> dict:
    """``"MIN:OPT:MAX"`` (or a single number for a fixed batch) -> {"min", "opt", "max"}."""
    if spec is None:
        return {"min": 1, "opt": 1, "max": None}
    parts = str(spec).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"batch range {spec!r} must be MIN:OPT:MAX integers, e.g. 1:4:8") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"batch range {spec!r} must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, e.g. 1:4:8")
    if values[2] >= 64:  # diffusers' Upsample2D switches code paths at batch 64
        raise ValueError(f"batch maximum {values[2]} must be below 64 (larger batches are split by the Engine)")
    return dict(zip(("min", "opt", "max"), values))


def check_compatible(d: dict, source: str) -> None:
    """Refuse files from another schema or another major version of the package, naming both."""
    schema = d.get("schema")
    if schema != SCHEMA:
        raise ValueError(f"{source} uses metadata schema {schema}, this cleandift-rt reads schema {SCHEMA}: "
                         "re-export it with this version")
    theirs, ours = str(d.get("package_version", "?")), _package_version()
    if _major(theirs) != _major(ours):
        raise ValueError(f"{source} was written by cleandift-rt {theirs}, this is {ours} (major versions differ): "
                         "re-export the model with this version")


def _major(version: str) -> str:
    return version.split(".")[0].split("+")[0]


# -- reading files without any runtime ---------------------------------------------------------


def read_onnx_info(path: str | Path) -> ArtifactInfo:
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): an export or a copy was interrupted; export or copy it again")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path} is truncated or not an ONNX model ({type(exc).__name__}): re-export it") from None
    return ArtifactInfo.from_props({p.key: p.value for p in model.metadata_props}, str(path))


def read_info(path: str | Path) -> ArtifactInfo:
    """The metadata of an exported ``.onnx`` or ``.plan`` file (checked for compatibility)."""
    path = Path(path)
    if path.suffix == ".plan":
        return ArtifactInfo.from_dict(read_plan_header(path)[0]["info"], str(path))
    return read_onnx_info(path)


def describe(path: str | Path) -> dict:
    """What a file holds, as a plain dict, without creating a session or needing a GPU.

    ``.onnx`` and ``.plan`` give their exported metadata (``derived``: every derived output, those of
    files from before that list included); student files and diffusers folders give their taps and
    U-Net facts (the PyTorch backend exports nothing, so there is less to say).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".onnx":
        info = read_onnx_info(path)
        d = dict(info.to_dict(), derived=info.derived_outputs)
        needed = external_data(path)
        d.update(kind="onnx", file_bytes=path.stat().st_size, external_data=sorted(needed))
        unsafe = [f"external data {loc!r}: {why}" for loc in needed if (why := unsafe_location(loc))]
        if unsafe:
            d["warnings"] = unsafe
        return d
    if path.suffix == ".plan":
        header, _, engine_bytes = read_plan_header(path)
        info = ArtifactInfo.from_dict(header["info"], str(path))
        d = dict(info.to_dict(), derived=info.derived_outputs)
        d.update(kind="tensorrt", engine_bytes=engine_bytes, tensorrt=header.get("tensorrt"),
                 build=header.get("build", {}))
        return d
    return _describe_pytorch(path)


def external_data(path: str | Path) -> dict[str, int]:
    """{location: bytes the graph needs from that file} of an ONNX model's external weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    needed: dict[str, int] = {}
    for init in model.graph.initializer:
        entries = {e.key: e.value for e in init.external_data}
        if "location" in entries:
            try:
                end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
            except ValueError:
                raise ValueError(f"{path}: external data entry of {init.name!r} has a non-numeric offset or length "
                                 "(corrupt file: re-export it)") from None
            needed[entries["location"]] = max(needed.get(entries["location"], 0), end)
    return needed


def unsafe_location(location: str) -> str | None:
    """Why an external-data location cannot be used (ONNX Runtime refuses paths outside the model's
    folder), or None when it is a plain file name or path inside it."""
    parts = Path(location).parts
    if Path(location).is_absolute():
        return "an absolute path; ONNX Runtime only reads weights inside the model's folder (copy it there, re-export)"
    if ".." in parts:
        return "outside the model's folder; ONNX Runtime refuses it (move the file beside the .onnx and re-export)"
    return None


def check_external_data(path: Path) -> list[str]:
    """The external weight files of an ``.onnx`` graph, each checked to be inside the model's folder, present
    and long enough (a truncated copy fails here, by name, instead of deep in ONNX Runtime or OpenVINO)."""
    needed = external_data(path)
    for name, end in needed.items():
        why = unsafe_location(name)
        if why:
            raise ValueError(f"{path} keeps its weights in {name!r}, {why}")
        data = path.parent / name
        if not data.is_file():
            raise ValueError(f"{path} keeps its weights in {name}, which is missing: copy it beside the .onnx file")
        if data.stat().st_size < end:
            raise ValueError(f"{data} is truncated: {data.stat().st_size} bytes, the model needs {end}")
    return list(needed)


def _describe_pytorch(path: Path) -> dict:
    from ..taps import tap_channels

    if path.is_dir():
        config_file = path / "unet" / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is not a diffusers model folder (no unet/config.json)")
        config = read_json_file(config_file)
        kind, timestep, training = "diffusers-folder", None, {}
    elif path.suffix == ".safetensors":
        from ..checkpoint import read_safetensors_metadata

        meta = read_safetensors_metadata(path)
        if "unet_config" not in meta:
            return {"kind": "student", "format": meta.get("format", "release"), "path": str(path),
                    **_student_conditioning(path, meta),
                    "note": "no U-Net config inside (a public-release file): pass base=... to Engine"}
        config = loads_json(meta["unet_config"], f"{path}: its unet_config metadata")
        kind, timestep = "student", meta.get("timestep")
        training = _student_conditioning(path, meta)
    else:
        raise ValueError(f"{path}: unknown file type (expected .onnx, .plan, a student .safetensors or a diffusers folder)")
    channels = tap_channels(config["block_out_channels"])
    return {"kind": kind, "path": str(path), "backend": "pytorch",
            "taps": [{"name": n, "module": TAP_TABLE[n].module, "channels": channels[n], "stride": TAP_TABLE[n].stride}
                     for n in TAPS],
            "timestep": timestep, "native_size": int(config.get("sample_size", 0)) * 8,
            "block_out_channels": list(config["block_out_channels"]),
            "cross_attention_dim": config.get("cross_attention_dim"), **training}


def _student_conditioning(path: Path, meta: dict) -> dict:
    """What a student file says of its training: text conditioning (metadata; None when not recorded,
    as in the release's files), the fast encoder it was adapted to (None: the VAE's) and, when it holds
    heads, their kind (from the key names)."""
    from ..checkpoint import read_safetensors_shapes
    from ..models.heads import head_conditioning_of
    from ..models.student import read_student_encoder, read_text_conditioning

    out: dict = {"text_conditioning": read_text_conditioning(meta, path),
                 "adapted_encoder": read_student_encoder(meta, path)}
    keys = read_safetensors_shapes(path)
    if any(k.startswith("adapters.") for k in keys):
        out["head_conditioning"] = head_conditioning_of(keys, str(path))
    return out
