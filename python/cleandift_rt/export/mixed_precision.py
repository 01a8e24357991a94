"""fp16 feature graphs with fp32 islands, for strongly typed TensorRT engines (docs/method.md, TensorRT strong typing).

TensorRT 10.12+ builds strongly typed networks and 11.x knows no other kind: every tensor's type
comes from the ONNX graph. ``convert_to_fp16`` rewrites an exported fp32 graph into one whose
weights and activations are fp16 except where the policy keeps fp32, with casts at the island
borders and the graph inputs and outputs left fp32 (so every runtime feeds and reads it as before).

The policy (``PrecisionPolicy``; every rule can be switched off to measure what it is worth,
``bench/fp16_policy.py``):

- ``attention_scores``: every Softmax and the chain that feeds it back to the score MatMul
  (Q.K^T and its scaling): SD 2.1 overflows fp16 there (it ships ``upcast_attention=True``);
- ``normalization``: GroupNorm (exported as InstanceNormalization), LayerNorm and explicit
  reductions of squares, whose statistics leave the fp16 range;
- ``constant_paths``: nodes that do not depend on the image or the prompt (the time embedding of
  the baked timestep: ``sin(261 * f)`` has no correct digit in fp16), free at run time because
  every runtime folds them;
- ``max_abs``: nodes whose inputs or outputs reached more than this magnitude on calibration
  images (``measure_ranges``, fp32 on ONNX Runtime), so real weights that overflow where random
  ones do not are caught by measurement; fp16's largest finite value is 65504.

ONNX Runtime on x86 keeps fp16 storage but computes most fp16 ops in fp32, so a CPU comparison
checks the rounding of weights and activations, not fp16 accumulation: that is what
``build_engine.py --verify`` checks on the GPU, per tap, where the plan is built.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..features.store import FP16_MAX

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
ATTENTION_PASSTHROUGH = {"Mul", "Div", "Add", "Sub", "Cast", "Reshape", "Transpose", "Identity", "Unsqueeze",
                         "Squeeze", "Where", "Expand", "Neg"}
NORMALIZATION_OPS = {"InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization",
                     "ReduceMean", "ReduceSumSquare", "ReduceL2", "LpNormalization"}
SHAPE_ONLY_OPS = {"Shape", "Size"}  # their outputs depend on the input's shape, not its values
_TYPED_BY_ATTRIBUTE = {"Cast", "ConstantOfShape"}  # output type set by an attribute, not by the inputs


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which nodes stay fp32 in an fp16 feature graph (module docstring)."""

    attention_scores: bool = True
    normalization: bool = True
    constant_paths: bool = True
    max_abs: float | None = 4096.0  # 1/16 of fp16's range: headroom for images beyond the calibration set

    def to_dict(self) -> dict:
        return asdict(self)


# -- graph facts ----------------------------------------------------------------------------------


def _weightless_copy(model):
    """The graph without tensor payloads (type inference needs dims and types only; works above 2 GB)."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        init.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            init.ClearField(field)
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
    return light


def value_types(model, input_shapes: dict[str, list[int]] | None = None) -> tuple[dict[str, int], dict[str, list]]:
    """({value: ONNX element type}, {value: dims}) of every graph value, from ONNX type inference.

    ``input_shapes`` pins the graph inputs (for byte estimates of a calibration run).
    """
    import onnx

    light = _weightless_copy(model)
    for inp in light.graph.input:
        if input_shapes and inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for dim, value in zip(dims, input_shapes[inp.name]):
                dim.Clear()
                dim.dim_value = int(value)
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    types, shapes = {}, {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for init in model.graph.initializer:
        types[init.name] = init.data_type
        shapes[init.name] = list(init.dims)
    return types, shapes


def _producers(nodes) -> dict[str, int]:
    return {out: i for i, node in enumerate(nodes) for out in node.output if out}


def data_dependent(model, inputs=None) -> set[int]:
    """Indices of the nodes whose values depend on the values (not only the shape) of a graph input, or of
    one of ``inputs`` (names) when given."""
    tainted = set(inputs) if inputs is not None else {inp.name for inp in model.graph.input}
    found = set()
    for i, node in enumerate(model.graph.node):
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if any(name in tainted for name in node.input):
            found.add(i)
            tainted.update(node.output)
    return found


def attention_score_nodes(nodes) -> set[int]:
    """Every Softmax and the nodes from it back to the MatMul that computes the scores."""
    producer = _producers(nodes)
    keep = set()
    for i, node in enumerate(nodes):
        if node.op_type != "Softmax":
            continue
        keep.add(i)
        frontier = [i]
        while frontier:
            j = frontier.pop()
            for name in nodes[j].input:
                src = producer.get(name)
                if src is None or src in keep:
                    continue
                if nodes[src].op_type == "MatMul":
                    keep.add(src)
                elif nodes[src].op_type in ATTENTION_PASSTHROUGH:
                    keep.add(src)
                    frontier.append(src)
    return keep


# -- calibration ----------------------------------------------------------------------------------


def measure_ranges(onnx_path: str | Path, feeds: dict[str, np.ndarray], progress: bool = False) -> dict[str, float]:
    """Largest |value| of every float tensor of the fp32 graph on ``feeds`` (ONNX Runtime, CPU).

    One pass per calibration image: each intermediate tensor gets an ``Abs -> ReduceMax`` to a scalar
    output inside the graph, so ONNX Runtime frees the tensors as usual and memory stays that of one
    forward run (the earlier form exposed the tensors themselves a few GB at a time: 242 forward
    runs, about 7.5 hours, at SD2.1 size).
    Non-finite values count as infinite. The probe graph is written beside ``onnx_path`` so its
    external weights resolve without a copy.
    """
    import onnx

    from ..runtime.backends.onnxruntime import import_onnxruntime

    ort = import_onnxruntime()
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    types, _ = value_types(model, {name: list(array.shape) for name, array in feeds.items()})
    candidates = {out for node in model.graph.node for out in node.output if out and types.get(out) == FLOAT}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    # ReduceMax skips a NaN unless it comes first, so a second scalar catches non-finite values:
    # sum(x * 0) is 0 for finite x and NaN as soon as one value is NaN or infinite. The reductions
    # sit right after the node that makes their tensor and the session runs PRIORITY_BASED, which
    # keeps that order: in ONNX Runtime's default order they ran late and kept every activation
    # alive (over 19 GB at SD2.1 size; 5.2 GB and 135 s in this order).
    probe.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "__range_zero"))
    nodes, outputs, measured = [], [], []
    for node in model.graph.node:
        nodes.append(node)
        for name in node.output:
            if name not in candidates:
                continue
            index = len(measured)
            measured.append(name)
            absolute, top, zeroed, check = (f"__range_{kind}_{index}" for kind in ("abs", "max", "zeroed", "check"))
            nodes += [onnx.helper.make_node("Abs", [name], [absolute], name=absolute),
                      onnx.helper.make_node("ReduceMax", [absolute], [top], name=top, keepdims=0),
                      onnx.helper.make_node("Mul", [name, "__range_zero"], [zeroed], name=zeroed),
                      onnx.helper.make_node("ReduceSum", [zeroed], [check], name=check, keepdims=0)]
            outputs += [top, check]
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, FLOAT, []) for n in outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = False  # freed activations go back to the system, not to a growing arena
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    fd, tmp = tempfile.mkstemp(prefix=f".{onnx_path.stem}.calib-", suffix=".onnx", dir=onnx_path.parent)
    os.close(fd)
    try:
        onnx.save_model(probe, tmp)
        if progress:
            print(f"calibrating fp16 ranges: {len(measured)} tensors in one ONNX Runtime pass", flush=True)
        session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
        runs = [session.run(outputs, single) for single in _one_image_at_a_time(feeds)]
    finally:
        os.unlink(tmp)
    ranges = {}
    for i, name in enumerate(measured):
        tops, checks = [float(run[2 * i]) for run in runs], [float(run[2 * i + 1]) for run in runs]
        top = max(tops)
        ranges[name] = 0.0 if top == -math.inf else top if all(map(math.isfinite, tops + checks)) else math.inf
    for name, value in feeds.items():
        ranges[name] = float(np.abs(value).max())
    return ranges


def _one_image_at_a_time(feeds: dict[str, np.ndarray]):
    """The calibration batch as batches of one (a third of the activation memory for three photos);
    feeds without a shared batch dimension run as given."""
    sizes = {len(v) for v in feeds.values() if v.ndim}
    if len(sizes) != 1 or sizes == {1}:
        yield feeds
        return
    for i in range(sizes.pop()):
        yield {k: v[i:i + 1] if v.ndim else v for k, v in feeds.items()}


# -- assignment and rewrite -----------------------------------------------------------------------


def _initializer_ranges(model, base_dir: Path | None) -> dict[str, float]:
    from onnx import numpy_helper

    out = {}
    for init in model.graph.initializer:
        if init.data_type == FLOAT:
            array = numpy_helper.to_array(init, base_dir=str(base_dir) if base_dir else "")
            out[init.name] = float(np.abs(array).max()) if array.size else 0.0
    return out


def fp32_nodes(model, policy: PrecisionPolicy, ranges: dict[str, float] | None = None) -> dict[int, str]:
    """{node index: rule that keeps it fp32}; every other node computing floats goes to fp16.

    ``ranges`` ({value: max |x|}) holds measured activations and the weights; a node touching a
    value beyond ``policy.max_abs`` (beyond fp16's range when ``max_abs`` is None) stays fp32.
    """
    nodes = list(model.graph.node)
    ranges = ranges or {}
    reasons: dict[int, str] = {}
    if policy.constant_paths:
        live = data_dependent(model)
        reasons.update({i: "constant_paths" for i in range(len(nodes)) if i not in live})
    if policy.attention_scores:
        reasons.update({i: "attention_scores" for i in attention_score_nodes(nodes) if i not in reasons})
    if policy.normalization:
        reasons.update({i: "normalization" for i, n in enumerate(nodes)
                        if n.op_type in NORMALIZATION_OPS and i not in reasons})
    limit = policy.max_abs if policy.max_abs is not None else FP16_MAX
    for i, node in enumerate(nodes):
        if i not in reasons and any(ranges.get(v, 0.0) > limit for v in (*node.input, *node.output) if v):
            reasons[i] = "max_abs"
    return reasons


def _type_groups(node, opset: int):
    """{type parameter: ([input slots], [output slots])} from the operator's schema, and the
    float16-capable parameters."""
    from onnx import defs

    schema = defs.get_schema(node.op_type, opset, node.domain or "")
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    groups: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))

    def formal(params, i):
        return params[min(i, len(params) - 1)].type_str if params else ""

    for i in range(len(node.input)):
        groups[formal(schema.inputs, i)][0].append(i)
    for i in range(len(node.output)):
        groups[formal(schema.outputs, i)][1].append(i)
    capable = {p for p in groups if "tensor(float16)" in allowed.get(p, {p})}
    return groups, capable


class _Rewriter:
    """Applies a node-precision assignment to a graph: converts weights, retypes, inserts casts."""

    def __init__(self, model, keep_fp32: set[int], base_dir: Path | None):
        import onnx
        from onnx import helper, numpy_helper

        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.model, self.graph = model, model.graph
        self.keep_fp32, self.base_dir = keep_fp32, base_dir
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.types, _ = value_types(model)
        self.inputs = {i.name for i in self.graph.input}
        self.inits = {t.name: t for t in self.graph.initializer if t.name not in self.inputs}
        self.casts: dict[tuple[str, int], str] = {}
        self.new_nodes: list = []

    def node_precision(self, i: int, node) -> int | None:
        """fp16 or fp32 for nodes that compute floats, None otherwise (and for Constant nodes, whose
        type follows their consumers like a weight's)."""
        produces_float = any(self.types.get(o) in (FLOAT, FLOAT16) for o in node.output if o)
        if not produces_float or node.op_type == "Constant":
            return None
        return FLOAT if i in self.keep_fp32 else FLOAT16

    def requirements(self):
        """[(node index, input slot, required type)] for float inputs, and each node's output types."""
        needs, out_types = [], {}
        for i, node in enumerate(self.graph.node):
            p = self.node_precision(i, node)
            if node.op_type == "Constant":
                continue
            if node.op_type in _TYPED_BY_ATTRIBUTE:
                for o in node.output:
                    out_types[o] = p if p is not None else self.types.get(o)
                continue
            groups, capable = _type_groups(node, self.opset)
            for param, (ins, outs) in groups.items():
                float_ins = [s for s in ins if node.input[s] and self.types.get(node.input[s]) == FLOAT]
                float_outs = [s for s in outs if node.output[s] and self.types.get(node.output[s]) == FLOAT]
                if param not in capable:  # a fixed tensor(float) slot, e.g. Resize's scales
                    needs += [(i, s, FLOAT) for s in float_ins]
                    want = FLOAT
                elif float_outs:
                    want = p if p is not None else FLOAT
                    needs += [(i, s, want) for s in float_ins]
                elif len(float_ins) > 1:  # inputs that must agree, no float output (Equal): compare in fp32
                    needs += [(i, s, FLOAT) for s in float_ins]
                    want = FLOAT
                else:
                    want = None
                for s in float_outs:
                    out_types[node.output[s]] = want or FLOAT
        return needs, out_types

    def run(self) -> None:
        needs, out_types = self.requirements()
        dtype = {name: FLOAT for name in self.inputs}
        dtype.update({name: FLOAT for name in self.inits if self.inits[name].data_type == FLOAT})
        dtype.update(out_types)
        wanted_by: dict[str, set[int]] = defaultdict(set)
        by_node: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for i, slot, want in needs:
            wanted_by[self.graph.node[i].input[slot]].add(want)
            by_node[i].append((slot, want))
        self._convert_weights(wanted_by, dtype)
        for node in self.graph.node:
            if node.op_type == "Constant" and self.types.get(node.output[0]) == FLOAT:
                dtype[node.output[0]] = FLOAT16 if wanted_by.get(node.output[0]) == {FLOAT16} else FLOAT
        self._retype_constants(dtype)
        rebuilt = []
        for i, node in enumerate(self.graph.node):
            for slot, want in by_node.get(i, ()):
                name = node.input[slot]
                if dtype.get(name) != want:
                    node.input[slot] = self._cast(name, want, rebuilt)
            rebuilt.append(node)
        del self.graph.node[:]
        self.graph.node.extend(rebuilt)
        self._fp32_outputs(dtype)
        del self.graph.value_info[:]

    def _convert_weights(self, wanted_by, dtype) -> None:
        for name, init in self.inits.items():
            if init.data_type != FLOAT or wanted_by.get(name) != {FLOAT16}:
                continue  # used in fp32 somewhere (or only as fp32): casts are added per use
            array = self.numpy_helper.to_array(init, base_dir=str(self.base_dir) if self.base_dir else "")
            half = self.numpy_helper.from_array(array.astype(np.float16), name)
            init.CopyFrom(half)
            dtype[name] = FLOAT16

    def _retype_constants(self, dtype) -> None:
        for node in self.graph.node:
            if node.op_type not in (*_TYPED_BY_ATTRIBUTE, "Constant") or dtype.get(node.output[0]) != FLOAT16:
                continue
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = FLOAT16
                elif attr.name == "value" and attr.t.data_type == FLOAT:
                    array = self.numpy_helper.to_array(attr.t)
                    attr.t.CopyFrom(self.numpy_helper.from_array(array.astype(np.float16), attr.t.name))

    def _cast(self, name: str, to: int, rebuilt: list) -> str:
        key = (name, to)
        if key not in self.casts:
            out = f"{name}/as_{'fp16' if to == FLOAT16 else 'fp32'}"
            rebuilt.append(self.helper.make_node("Cast", [name], [out], to=to, name=f"{out}/cast"))
            self.casts[key] = out
        return self.casts[key]

    def _fp32_outputs(self, dtype) -> None:
        """Graph outputs stay fp32: an fp16 producer writes a renamed tensor, cast back at the edge."""
        for output in self.graph.output:
            if dtype.get(output.name) != FLOAT16:
                continue
            inner = f"{output.name}/fp16"
            for node in self.graph.node:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if v == output.name else v for v in node.input]
            self.graph.node.append(self.helper.make_node("Cast", [inner], [output.name], to=FLOAT,
                                                         name=f"{output.name}/to_fp32"))


def drop_identities(graph) -> None:
    """Rewire consumers of Identity nodes to their inputs (the exporter emits them for shared weights,
    and a weight behind an Identity could not be converted in place)."""
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.output[0] not in outputs}

    def source(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        node.input[:] = [source(v) for v in node.input]
    del graph.node[:]
    graph.node.extend(keep)


def convert_to_fp16(model, policy: PrecisionPolicy = PrecisionPolicy(), ranges: dict[str, float] | None = None,
                    base_dir: str | Path | None = None) -> dict:
    """Rewrite ``model`` (an fp32 ``ModelProto``, weights loaded or under ``base_dir``) in place.

    Returns the summary recorded in the file's metadata: the policy, how many nodes each rule kept
    in fp32 and how many run in fp16.
    """
    base = Path(base_dir) if base_dir else None
    drop_identities(model.graph)
    calibrated = bool(ranges)
    ranges = {**(ranges or {}), **_initializer_ranges(model, base)}
    reasons = fp32_nodes(model, policy, ranges)
    rewriter = _Rewriter(model, set(reasons), base)
    precisions = [rewriter.node_precision(i, n) for i, n in enumerate(model.graph.node)]
    rewriter.run()
    kept = defaultdict(int)
    for rule in reasons.values():
        kept[rule] += 1
    return {"policy": policy.to_dict(), "fp32_nodes": dict(sorted(kept.items())),
            "fp16_nodes": sum(p == FLOAT16 for p in precisions), "calibrated": calibrated}


def calibration_feeds(size: tuple[int, int], photos: Iterable[str] = ("cat", "coffee", "astronaut")) -> dict:
    """The bundled photos as one batch of engine input (stretched to ``size``)."""
    from ..assets import load_photo
    from ..features.preprocess import prepare_images
    from ..formats.artifact import IMAGE_INPUT

    pixels = prepare_images([load_photo(p) for p in photos], size, "stretch").pixels
    return {IMAGE_INPUT: pixels.numpy()}
