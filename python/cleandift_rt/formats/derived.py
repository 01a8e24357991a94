"""Outputs derived from taps: what one is (``DerivedOutput``), how a file records it, and the options
that open one from a file.

A derived output is a small network over some taps whose result is returned beside them, named,
``B x channels x H/stride x W/stride`` for an ``H x W`` input (the Diffusion Hyperfeatures
descriptor ``"hyper"`` of ``hyper.Aggregator`` is one). ``Engine(..., derived=[...])`` computes it
in PyTorch on its backend's taps; ``export_onnx(..., derived=[...])`` traces it into the graph,
and the file then lists it in its metadata (``ArtifactInfo.derived``: name, channels, stride, the
taps it reads) with the output's own description under ``extra[name]``.

User-facing options that take a file (``Engine(aggregator=FILE)``, ``export_onnx.py --aggregator``)
are resolved through ``register_option``: the subpackage that owns the file kind registers how to
open it when it is imported (the package root imports them all), so neither the runtime nor the
export imports that subpackage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, runtime_checkable

from ..taps import TAP_TABLE, TAPS
from .metadata_check import MAX_CHANNELS

if TYPE_CHECKING:
    import torch

GRAPH_INPUTS = ("images", "prompt_embeds")  # the feature graph's inputs (no output may take their names)
MAX_OUTPUTS = 16
MAX_STRIDE = 64  # inputs are multiples of 64 pixels, so a stride dividing 64 gives whole output sides
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Files written before the ``derived`` list recorded their one derived output, the Diffusion
# Hyperfeatures descriptor, only as ``extra["hyper"]`` = {channels, stride, source, layers, ...}.
LEGACY_OUTPUT = "hyper"


@dataclass(frozen=True)
class DerivedExport:
    """What the ONNX export puts into the graph for one derived output."""

    module: "torch.nn.Module"  # traced: ``{tap: B x C x h x w}`` -> the output, on the CPU in fp32
    description: dict  # JSON, recorded as the file's ``extra[name]`` (``cleandift-rt info`` shows it)


@runtime_checkable
class DerivedOutput(Protocol):
    """An output computed from taps; its shape for an ``H x W`` input is ``channels x H/stride x W/stride``."""

    name: str  # its key beside the taps in ``Engine.extract`` and the graph's output name
    reads: tuple[str, ...]  # the taps its forward reads
    channels: int
    stride: int

    def __call__(self, taps: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        """The torch forward: ``{tap: B x C x h x w}`` (at least ``reads``) -> ``B x channels x h' x w'``."""

    def describe(self) -> dict:
        """What it is, as plain JSON-able data (``Engine.info``)."""

    def for_export(self, tap_channels: Mapping[str, int]) -> DerivedExport:
        """The ONNX-export hook: check it fits a model with these tap widths (``ValueError`` naming the
        mismatch), and give the module to trace, with anything that does not depend on the image
        computed once (it enters the graph as constants)."""


def check_derived(output, where: str = "derived output") -> DerivedOutput:
    """``output`` implements ``DerivedOutput`` with a usable name, taps, channels and stride."""
    if not isinstance(output, DerivedOutput):
        raise TypeError(f"{where} {output!r:.60} is not a derived output: it needs name, reads, channels, stride, "
                        "a torch forward, describe() and for_export() (formats.derived.DerivedOutput)")
    reads = output.reads
    _check_entry({"name": output.name, "channels": output.channels, "stride": output.stride,
                  "reads": list(reads) if isinstance(reads, (list, tuple)) else reads}, where, "", need_reads=True)
    return output


def record(output: DerivedOutput) -> dict:
    """The file's entry for a derived output in ``ArtifactInfo.derived``."""
    return {"name": output.name, "channels": int(output.channels), "stride": int(output.stride),
            "reads": [t for t in TAPS if t in set(output.reads)]}


def records_in(derived: list, extra: dict) -> list:
    """Every derived output a file declares: its ``derived`` list, and the old ``extra["hyper"]`` of files
    written before that list (when the list does not name it)."""
    old = extra.get(LEGACY_OUTPUT) if isinstance(extra, dict) else None
    listed = derived if isinstance(derived, list) else []
    if not isinstance(old, dict) or any(isinstance(r, dict) and r.get("name") == LEGACY_OUTPUT for r in listed):
        return listed
    layers = old.get("layers")
    return [*listed, {"name": LEGACY_OUTPUT, "channels": old.get("channels"), "stride": old.get("stride"),
                      "reads": [t for t in TAPS if isinstance(layers, list) and t in layers]}]


def check_records(derived, extra, source: str) -> None:
    """A file's derived outputs, typed and bounded before a runtime sizes a buffer from them (its
    ``derived`` list and the old ``extra["hyper"]``, which must agree when both name it)."""
    fix = " (corrupt file: re-export it)"
    if not isinstance(derived, list) or len(derived) > MAX_OUTPUTS:
        raise ValueError(f"{source}: metadata field derived must list at most {MAX_OUTPUTS} outputs{fix}")
    old = extra.get(LEGACY_OUTPUT) if isinstance(extra, dict) else None
    if old is not None:
        if not isinstance(old, dict):
            raise ValueError(f"{source}: metadata extra.{LEGACY_OUTPUT} must be an object{fix}")
        for key in ("channels", "stride"):
            _bounded(old.get(key), f"{source}: metadata extra.{LEGACY_OUTPUT}.{key}", key == "stride", fix)
    names = []
    for i, entry in enumerate(records_in(derived, extra)):
        where = f"{source}: metadata derived[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object{fix}")
        _check_entry(entry, where, fix, need_reads=False)  # files before the list may not say
        names.append(entry["name"])
        if entry["name"] == LEGACY_OUTPUT and old is not None and any(entry[k] != old[k] for k in ("channels", "stride")):
            raise ValueError(f"{where} and extra.{LEGACY_OUTPUT} disagree on the output's shape{fix}")
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: metadata derived names {names} repeat{fix}")


def _bounded(value, where: str, stride: bool, fix: str) -> None:
    hi = MAX_STRIDE if stride else MAX_CHANNELS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise ValueError(f"{where} = {value!r:.40} must be an integer in [1, {hi}]{fix}")
    if stride and MAX_STRIDE % value:
        raise ValueError(f"{where} = {value} must divide {MAX_STRIDE}{fix}")


def _check_entry(entry: dict, where: str, fix: str, need_reads: bool) -> None:
    """One derived output's name, channels, stride and taps (an object's or a file's record)."""
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}: name {name!r:.40} must be lower-case letters, digits and '_', starting with a "
                         f"letter, at most 64{fix}")
    if name in TAP_TABLE or name in GRAPH_INPUTS:
        raise ValueError(f"{where}: name {name!r} is taken by a {'tap' if name in TAP_TABLE else 'graph input'}{fix}")
    for field in ("channels", "stride"):
        _bounded(entry.get(field), f"{where} {name!r}: {field}", field == "stride", fix)
    reads = entry.get("reads")
    if not isinstance(reads, list) or (need_reads and not reads) or not all(
            isinstance(t, str) and t in TAP_TABLE for t in reads):
        raise ValueError(f"{where} {name!r}: reads {reads!r:.80} must list taps among {', '.join(TAPS)}{fix}")


# -- options that open a derived output from a file ----------------------------------------------


@dataclass(frozen=True)
class DerivedOption:
    """A keyword of ``Engine`` and the ONNX export that opens a derived output (``aggregator=FILE``)."""

    keyword: str  # "aggregator"
    output: str  # the name of the output it opens: "hyper"
    open: Callable[[object], DerivedOutput]  # the keyword's value (a path, or a ready object) -> the output
    missing: str  # what the output is and how to get it, said when it is asked for but absent


_OPTIONS: dict[str, DerivedOption] = {}


def register_option(option: DerivedOption) -> None:
    """Make ``option.keyword`` open ``option.output`` (called by the subpackage owning the file kind)."""
    known = _OPTIONS.get(option.keyword)
    if known is not None and known.output != option.output:
        raise ValueError(f"the derived-output option {option.keyword!r} is already registered (for "
                         f"{known.output!r})")
    _OPTIONS[option.keyword] = option


def open_option(keyword: str, value) -> DerivedOutput:
    """The derived output ``keyword=value`` stands for (``Engine(aggregator=FILE)``)."""
    option = _OPTIONS.get(keyword)
    if option is None:
        raise LookupError(f"{keyword}= opens no derived output here: the subpackage that registers it was not "
                          "imported (import cleandift_rt, which imports them all)")
    output = check_derived(option.open(value), f"{keyword}={value!s:.60}")
    if output.name != option.output:
        raise ValueError(f"{keyword}= opened an output named {output.name!r}, not {option.output!r}")
    return output


def missing_hint(name: str) -> str | None:
    """What an absent derived output is and how to get it, when an option opens it."""
    return next((o.missing for o in _OPTIONS.values() if o.output == name), None)


@dataclass(frozen=True)
class Given:
    """A derived output as a caller gave it: through an option (``aggregator=FILE``) or ``derived=``."""

    output: DerivedOutput
    keyword: str  # "aggregator", or "derived"
    value: object  # what the caller passed


def open_derived(derived=(), **options) -> list[Given]:
    """``derived=[...]`` objects and ``keyword=value`` options (None: not given) as checked outputs;
    their names must differ."""
    given = [Given(open_option(k, v), k, v) for k, v in options.items() if v is not None]
    for d in [derived] if isinstance(derived, DerivedOutput) else list(derived):
        given.append(Given(check_derived(d), "derived", d))
    names = [g.output.name for g in given]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"derived outputs named {twice} are given more than once: give each output once")
    return given
