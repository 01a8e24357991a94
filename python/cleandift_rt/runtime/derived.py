"""The Engine's side of outputs derived from taps (``formats.derived``).

An Engine returns its file's taps, the derived outputs its graph computes (listed in the file),
and those given to it (``derived=[...]``, ``aggregator=FILE``), which it computes here in PyTorch
on the taps they read, chunk by chunk, after the backend ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..formats.artifact import ArtifactInfo
from ..formats.derived import DerivedOutput, missing_hint, open_derived, record


class DerivedOutputs:
    """The derived outputs of one Engine: those in its file's graph and those given to it."""

    def __init__(self, derived=(), **options):
        self.given = {g.output.name: g for g in open_derived(derived, **options)}
        self.in_graph: tuple[str, ...] = ()

    @property
    def computed(self) -> dict[str, DerivedOutput]:
        """The outputs computed here, in PyTorch, by name."""
        return {name: g.output for name, g in self.given.items()}

    def configure(self, meta: ArtifactInfo, path: Path) -> None:
        """Read the file's derived outputs; each given one must be new to it and find its taps there."""
        self.in_graph = tuple(d["name"] for d in meta.derived_outputs)
        for name, given in self.given.items():
            if name in self.in_graph:
                raise ValueError(f"{path.name} already computes {name!r} in its graph (exported with it): open "
                                 f"it without {given.keyword}=")
            try:
                meta.check_taps(given.output.reads)
            except ValueError as exc:
                raise ValueError(f"the {given.keyword}= output {name!r} needs taps the engine lacks: {exc}") from None

    def default(self, meta: ArtifactInfo, taps) -> tuple[str, ...]:
        """What ``extract`` returns unless told: ``select(taps)``, and the given outputs whatever ``taps`` says."""
        chosen = self.select(meta, taps)
        return chosen + tuple(name for name in self.given if name not in chosen)

    def select(self, meta: ArtifactInfo, taps) -> tuple[str, ...]:
        """The requested taps in table order, then the derived outputs asked for (all of both when None)."""
        derived = (*self.in_graph, *self.given)
        if taps is None:
            return meta.check_taps(None) + derived
        requested = [taps] if isinstance(taps, str) else list(taps)
        for name in requested:
            hint = missing_hint(name) if name not in derived else None
            if hint is not None:
                raise ValueError(f"tap {name!r} is {hint}")
        rest = [t for t in requested if t not in derived]
        return (meta.check_taps(rest) if rest or not requested else ()) + tuple(d for d in derived if d in requested)

    def run(self, run: Callable[[list[str]], dict[str, torch.Tensor]], outputs: tuple[str, ...],
            taps) -> dict[str, torch.Tensor]:
        """``taps`` of one chunk: ``run(names)`` gives the backend's outputs (``outputs`` lists them), then
        the given outputs asked for are computed on the taps they read."""
        here = [name for name in taps if name in self.given]
        if not here:
            return run(list(taps))
        reads = {t for name in here for t in self.given[name].output.reads}
        out = run([t for t in outputs if (t in taps and t not in here) or t in reads])
        device = next(iter(out.values())).device
        with torch.no_grad():
            for name in here:
                output = self.given[name].output
                if isinstance(output, torch.nn.Module):
                    output.to(device)
                out[name] = output({t: out[t] for t in output.reads}).float()
        return {t: out[t] for t in taps}

    def describe(self, meta: ArtifactInfo) -> dict:
        """``Engine.info``'s entries: every derived output and where it is computed, and each option's file."""
        d = {"derived": [{**entry, "computed": "in the graph"} for entry in meta.derived_outputs]}
        d["derived"] += [{**record(g.output), "computed": "pytorch", "given": g.keyword} for g in self.given.values()]
        for g in self.given.values():
            if g.keyword != "derived":  # the option's file, e.g. d["aggregator"]
                d[g.keyword] = {**g.output.describe(), "path": str(g.value)}
        return d
