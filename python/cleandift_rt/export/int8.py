"""int8 feature graphs for CPUs with VNNI / AMX-INT8: accuracy-controlled post-training quantization.

``write_int8_onnx`` turns an exported fp32 graph into a QDQ ``.onnx`` (QuantizeLinear /
DequantizeLinear pairs around the convolutions and matrix products that run in int8) with NNCF's
accuracy-controlled post-training quantization (``accuracy_controlled_quantization``: the steps of
``nncf.quantize_with_accuracy_control``, made to work on graphs above 2 GB), driven by **our** metric:

- calibration (``calibration.CalibrationSet``) on the user's images, or the bundled photos with a
  warning; held-out images are set aside for validation;
- the metric is the worst per-tap cosine to the fp32 graph on the held-out images, each candidate
  run the way the Engine will run the file: OpenVINO on the CPU, the layers left in floating point
  in bf16 where the CPU has it natively (fp32 elsewhere). NNCF reverts the groups of quantizers
  that cost the most until the metric reaches ``1 - max_drop``. With ``min_agreement`` the dense
  matching counts too: the share of pixels whose nearest neighbour in the next held-out image is
  the fp32 graph's (us6, or the worst tap of a file without us6) must reach it, folded into the
  same metric as ``1 - max_drop + agreement - min_agreement``;
- image-independent paths (the time embedding of the baked timestep, the keys and values of the
  prompt) are never quantized: they cost accuracy and run once per compile or on 77 tokens;
- the file as written is measured again (per-tap cosine, match agreement, ``runtime.compare``) and
  its record goes into ``extra["int8"]`` (``formats.quantized``) with the calibration set's size and
  hash and the quantized / kept layer counts. A result below the target is kept as
  ``OUT.unverified.onnx`` and refused (``Int8TargetMissed``).

The fp32 graph stays beside the int8 file (``OUT.fp32.onnx``, named in ``extra["fp32_reference"]``).
Why QDQ ONNX and not OpenVINO IR: docs/cpu.md (int8).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import staging_folder
from ..formats.artifact import IMAGE_INPUT, ArtifactInfo, read_onnx_info
from ..formats.quantized import file_precision
from ..runtime.compare import FeatureComparison, image_cosines, nearest
from ..runtime.quantized import float_layers
from .calibration import CalibrationSet, image_files
from .mixed_precision import data_dependent

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")  # what int8 speeds up; everything else follows its inputs
DEFAULT_MAX_DROP = 0.01  # worst per-tap cosine to fp32 >= 0.99
RANKING_IMAGES = 4  # held-out images NNCF ranks the quantizer groups on (the hardest ones)


class Int8TargetMissed(RuntimeError):
    """Accuracy control could not bring the int8 graph to the target; the result is kept as unverified."""


@dataclass(frozen=True)
class Int8Options:
    """What ``--precision int8`` takes besides the export's own flags."""

    calibration: str | None = None  # a folder of images; None: the bundled photos (with a warning)
    calibration_size: int = 64  # images the quantization statistics come from
    validation_size: int = 8  # further images held out for the accuracy metric
    max_drop: float = DEFAULT_MAX_DROP  # the worst per-tap cosine to fp32 must reach 1 - max_drop
    max_iterations: int | None = None  # groups of quantizers accuracy control may revert (None: all)
    min_agreement: float | None = None  # us6 match agreement with fp32 it must also reach (None: not controlled)
    threads: int | None = None  # OpenVINO threads while validating (None: all usable cores)

    def __post_init__(self):
        from ..checks import check_float, check_size

        check_float(self.max_drop, "--max-drop", 0.0, 2.0, lo_open=True)
        if self.min_agreement is not None:
            check_float(self.min_agreement, "--min-agreement", 0.0, 1.0)
        check_size(self.calibration_size, "--calibration-size")
        check_size(self.validation_size, "--validation-size")
        if self.max_iterations is not None:
            check_size(self.max_iterations, "--max-iterations")
        if self.calibration is not None:
            image_files(self.calibration)  # a folder holding enough images, before any model loads


def import_nncf():
    """NNCF (the quantizer) and a check that ONNX Runtime, which it calibrates with, is there."""
    try:
        import nncf
        import onnxruntime  # noqa: F401  (NNCF's ONNX backend collects statistics with it)
    except ImportError as exc:
        raise ImportError(f"--precision int8 needs NNCF and ONNX Runtime ({exc}): pip install 'cleandift-rt[int8]' "
                          "(and 'cleandift-rt[cpu]' or '[gpu]' for ONNX Runtime)") from None
    return nncf


def image_independent_compute(model) -> list[str]:
    """Convolutions and matrix products whose values do not depend on the image: never quantized."""
    dependent = data_dependent(model, inputs=(IMAGE_INPUT,))
    return [node.name for i, node in enumerate(model.graph.node) if node.op_type in COMPUTE_OPS and i not in dependent]


def quantized_layers(model) -> tuple[list[str], list[str]]:
    """(names of the compute layers with a quantized input, names of those without) in a QDQ graph."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    quantized, kept = [], []
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS:
            (quantized if any(name in dequantized for name in node.input) else kept).append(node.name)
    return quantized, kept


def compressed(model):
    """A copy of a QDQ graph with its quantized weights stored as int8 (what NNCF writes at the end), every
    weight in memory (those of a graph ``offloaded`` read back)."""
    import onnx
    from nncf.onnx.graph.model_metadata import MetadataKey, get_metadata, remove_metadata
    from nncf.onnx.graph.passes import compress_quantize_weights_transformation
    from onnx.external_data_helper import load_external_data_for_model

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    folder = get_metadata(copy, MetadataKey.EXTERNAL_DATA_DIR)
    if folder is not None:
        load_external_data_for_model(copy, folder)
        remove_metadata(copy, MetadataKey.EXTERNAL_DATA_DIR)
    compress_quantize_weights_transformation(copy)
    return copy


def offloaded(model, folder: Path):
    """``model`` with its weights moved to a file in ``folder``: a graph NNCF can analyse whatever its size.

    NNCF's graph analysis serialises the ModelProto (ONNX shape inference), which protobuf refuses above
    2 GB; an SD-size graph holds 3.5 GB of fp32 weights. NNCF reads weights of such a graph from the
    folder its metadata names, as it does for the fp32 graph's ``.data`` file.
    """
    import onnx
    from nncf.onnx.graph.model_metadata import MetadataKey, set_metadata

    path = folder / "quantized.onnx"  # one per export, in its own staging folder
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    small = onnx.load(str(path), load_external_data=False)
    set_metadata(small, MetadataKey.EXTERNAL_DATA_DIR, str(folder.resolve()))
    return small


def accuracy_controlled_quantization(nncf, model, calibration, validation, validator, max_drop: float,
                                     parameters: dict, external: Path | None, folder: Path):
    """NNCF's accuracy-controlled quantization of the ONNX graph ``model``, for graphs of any size.

    The steps of ``nncf.quantize_with_accuracy_control``: ``nncf.quantize`` without weight compression,
    the metric of the fp32 and the quantized graph (``Evaluator``), then ``QuantizationAccuracyRestorer``
    reverting the groups of quantizers that cost the most. Taken one by one because NNCF's own function
    hands the restorer the quantized graph with its weights loaded, which its graph analysis cannot
    serialise above 2 GB (NNCF 3.4): here that graph is ``offloaded`` first, and the fp32 graph keeps
    naming its weights' folder. Returns the graph with every weight in memory, quantized weights in int8.
    """
    from nncf.onnx.graph.model_metadata import MetadataKey, set_metadata
    from nncf.onnx.quantization.backend_parameters import BackendParameters
    from nncf.quantization.algorithms.accuracy_control.algorithm import QuantizationAccuracyRestorer
    from nncf.quantization.algorithms.accuracy_control.evaluator import Evaluator

    advanced = dataclasses.replace(parameters["advanced_quantization_parameters"])
    advanced.backend_params = dict(advanced.backend_params, **{BackendParameters.COMPRESS_WEIGHTS: False})
    restorer = parameters["advanced_accuracy_restorer_parameters"]
    quantized = nncf.quantize(model, calibration, preset=parameters["preset"], target_device=parameters["target_device"],
                              subset_size=parameters["subset_size"], model_type=parameters["model_type"],
                              ignored_scope=parameters["ignored_scope"], advanced_parameters=advanced)
    if external is not None:
        quantized = offloaded(quantized, folder)
        set_metadata(model, MetadataKey.EXTERNAL_DATA_DIR, str(external.resolve()))  # nncf.quantize removed it
    evaluator = Evaluator(validator)
    evaluator.enable_iteration_count()
    initial = evaluator.collect_metric_results(model, validation, model_name="initial")
    validation_size = evaluator.num_passed_iterations
    evaluator.disable_iteration_count()
    first = evaluator.collect_metric_results(quantized, validation, model_name="quantized")
    quantized = QuantizationAccuracyRestorer(restorer.ranking_subset_size, restorer.max_num_iterations, max_drop,
                                             parameters["drop_type"], restorer.num_ranking_workers,
                                             restorer.restore_mode).apply(model, initial, quantized, first, validation,
                                                                          validation_size, evaluator)
    return compressed(quantized)


class Validator:
    """Our metric for NNCF: each candidate graph run on OpenVINO as the Engine runs it, against fp32."""

    def __init__(self, fp32_path: Path, info: ArtifactInfo, pixels: np.ndarray, folder: Path, threads, external: bool,
                 target: float, min_agreement: float | None = None):
        from ..runtime.engine import Engine

        self.fp32_path, self.info, self.pixels, self.folder, self.threads = fp32_path, info, pixels, folder, threads
        self.external, self.target, self.min_agreement = external, target, min_agreement
        self.precision = float_layers()
        self.reference = Engine(fp32_path, backend="openvino", precision="fp32", threads=threads).extract(pixels)
        taps = info.output_names
        self.agreement_tap = "us6" if "us6" in taps else None  # None: the worst tap
        self._reference_nearest = {t: [nearest(self.reference[t][i], self.reference[t][self.partner(i)])
                                       for i in range(len(pixels))]
                                   for t in ((self.agreement_tap,) if self.agreement_tap else taps)
                                   } if min_agreement is not None else {}
        self.initial = None  # the fp32 ModelProto handed to NNCF: evaluated from its file, once
        self._initial: dict[int, tuple[float, float | None]] | None = None
        self._names = itertools.count()
        self.evaluations = 0

    def engine(self, model):
        """An Engine on ``model`` (an ``onnx.ModelProto``) the way an int8 file runs."""
        import onnx

        from ..runtime.engine import Engine

        if model is self.initial:  # handed over without its weights when they live in a .data file
            path = self.fp32_path
        else:  # a candidate, as it would be written: int8 weights (OpenVINO's results differ from fp32 weights
            # behind a QuantizeLinear), read as a floating-point graph whose float layers run as the int8 file's
            # will; unchecked; in one weights file when the fp32 graph needed one (above 2 GB)
            from .onnx_files import set_metadata

            candidate = compressed(model)
            set_metadata(candidate, self.info)
            path = self.folder / f"candidate-{next(self._names)}.onnx"
            onnx.save_model(candidate, str(path), save_as_external_data=self.external, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        engine = Engine(path, backend="openvino", precision=self.precision, threads=self.threads)
        return engine, path

    def partner(self, i: int) -> int:
        """The held-out image whose pixels image ``i``'s are matched into (the next; the last pairs with the first)."""
        return (i + 1) % len(self.pixels)

    def features(self, model, indices) -> dict:
        """``{tap: {index: map}}`` of the candidate for the held-out images ``indices``."""
        indices = sorted(set(indices))
        engine, path = self.engine(model)
        try:
            feats = engine.extract(self.pixels[indices])
            return {t: dict(zip(indices, feats[t])) for t in feats}
        finally:
            del engine
            if path != self.fp32_path:
                path.unlink()
                path.with_name(path.name + ".data").unlink(missing_ok=True)

    def __call__(self, model, items) -> tuple[float, list[float]]:
        """(the metric over ``items``, each item's value for NNCF's ranking): the worst per-tap cosine, or with
        ``min_agreement`` the smaller of it and ``target + agreement - min_agreement`` (module docstring)."""
        indices = [int(i) for i in items]
        if model is self.initial and self._initial is not None:  # NNCF validates the fp32 graph too: once is enough
            scores = self._initial
        else:
            scores = self.scores(model, indices)
            if model is self.initial and len(indices) == len(self.pixels):
                self._initial = scores
        cosines = [scores[i][0] for i in indices]
        if self.min_agreement is None:
            return min(cosines), cosines
        shares = [scores[i][1] for i in indices]
        values = [min(c, self.target + s - self.min_agreement) for c, s in zip(cosines, shares)]
        return min(min(cosines), self.target + float(np.mean(shares)) - self.min_agreement), values

    def scores(self, model, indices: list[int]) -> dict[int, tuple[float, float | None]]:
        """``{index: (worst per-tap cosine, match agreement or None)}`` of one candidate."""
        need = indices + ([self.partner(i) for i in indices] if self.min_agreement is not None else [])
        feats = self.features(model, need)
        self.evaluations += 1
        cosines = np.min([image_cosines(self.reference[t][indices], np.stack([feats[t][i] for i in indices]))
                          for t in self.info.output_names], axis=0)
        cosines = np.nan_to_num(cosines, nan=-1.0)  # a non-finite map: the worst result
        return {i: (float(c), self.agreement(feats, i) if self.min_agreement is not None else None)
                for i, c in zip(indices, cosines)}

    def agreement(self, feats: dict, i: int) -> float:
        """Share of image ``i``'s pixels whose nearest neighbour in its partner is fp32's (the worst tap's
        share when the file has no us6)."""
        shares = []
        for tap, wanted in self._reference_nearest.items():
            found = nearest(feats[tap][i], feats[tap][self.partner(i)])
            shares.append(float(np.mean(found == wanted[i])) if np.isfinite(feats[tap][i]).all() else 0.0)
        return min(shares)

    def measure(self, model) -> dict:
        """Per tap: the smallest cosine over the held-out images and the match agreement with fp32."""
        feats = self.features(model, range(len(self.pixels)))
        comparison = FeatureComparison(self.info.output_names)
        for i in range(len(self.pixels)):
            comparison.add({t: self.reference[t][i] for t in comparison.taps},
                           {t: feats[t][i] for t in comparison.taps})
        result = comparison.result()
        return {"cosine": {t: round(r["cosine_min"], 6) for t, r in result.items()},
                "match_agreement": {t: round(r["match_agreement"], 6) for t, r in result.items()}}

    def shortfall(self, measured: dict) -> str | None:
        """What the measured file misses of its targets (None: it meets them)."""
        cosine, agreement = measured["cosine"], measured["match_agreement"]
        worst = min(cosine, key=cosine.get)
        if cosine[worst] < self.target:
            return f"a worst per-tap cosine of {cosine[worst]:.5f} ({worst}), below the target {self.target:g}"
        if self.min_agreement is not None:
            tap = self.agreement_tap or min(agreement, key=agreement.get)
            if agreement[tap] < self.min_agreement:
                return (f"a {tap} match agreement with fp32 of {agreement[tap]:.4f}, below --min-agreement "
                        f"{self.min_agreement:g}")
        return None


def quantization_parameters(nncf, options: Int8Options, ignored: list[str], validation_images: int,
                            external: Path | None) -> dict:
    """The parameters of NNCF's accuracy-controlled quantization (besides model, data, metric and drop)."""
    from nncf.onnx.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters, AdvancedQuantizationParameters

    advanced = AdvancedQuantizationParameters()
    if external is not None:  # graphs above 2 GB are handed over without their weights, read from here
        advanced.backend_params[BackendParameters.EXTERNAL_DATA_DIR] = str(external.resolve())
    restorer = AdvancedAccuracyRestorerParameters(ranking_subset_size=min(RANKING_IMAGES, validation_images),
                                                  num_ranking_workers=1)
    if options.max_iterations is not None:
        restorer.max_num_iterations = options.max_iterations
    # MIXED (asymmetric activations) and the transformer patterns (SmoothQuant on the matrix products, no
    # quantizers on the residual adds) measured best on the tiny model: docs/cpu.md
    return dict(preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER,
                target_device=nncf.TargetDevice.CPU, drop_type=nncf.DropType.ABSOLUTE,
                ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                advanced_quantization_parameters=advanced, advanced_accuracy_restorer_parameters=restorer)


def write_int8_onnx(fp32_path: str | Path, out: str | Path, options: Int8Options = Int8Options(),
                    external_data: bool | None = None, log=print) -> ArtifactInfo:
    """Quantize an exported fp32 graph to an int8 QDQ graph at ``out`` (module docstring); returns its metadata."""
    import onnx

    from .onnx_files import save_onnx, set_metadata

    nncf = import_nncf()
    fp32_path, out = Path(fp32_path), Path(out)
    info = read_onnx_info(fp32_path)
    if file_precision(info.extra) != "fp32":
        raise ValueError(f"{fp32_path} is a {file_precision(info.extra)} graph; quantize the fp32 export")
    if fp32_path.resolve() == out.resolve():
        raise ValueError(f"the int8 graph needs its own file: {out} is the fp32 input")
    t0 = time.perf_counter()
    images = CalibrationSet.from_options(options.calibration, options.calibration_size, options.validation_size,
                                         tuple(info.default_size), info.resize, log=log)
    external = fp32_path.parent if fp32_path.with_name(fp32_path.name + ".data").exists() else None
    model = onnx.load(str(fp32_path), load_external_data=external is None)
    ignored = image_independent_compute(model)
    target = 1.0 - options.max_drop
    with staging_folder(out.parent, "int8") as folder:
        validator = Validator(fp32_path, info, images.validation, folder, options.threads, external is not None,
                              target, options.min_agreement)
        validator.initial = model
        initial, _ = validator(model, range(len(images.validation)))
        log(f"fp32 graph with {validator.precision} float layers on OpenVINO: metric {initial:.5f} (target {target:g}) "
            f"on {len(images.validation)} held-out images ({images.validation_source})")
        if initial < target:
            raise ValueError(f"the layers int8 leaves in {validator.precision} alone miss the target (metric "
                             f"{initial:.5f} < {target:g}): allow a larger --max-drop"
                             + (" or a smaller --min-agreement" if options.min_agreement is not None else ""))
        parameters = quantization_parameters(nncf, options, ignored, len(images.validation), external)
        quantized = accuracy_controlled_quantization(
            nncf, model, nncf.Dataset([{IMAGE_INPUT: images.calibration[i : i + 1]}
                                       for i in range(len(images.calibration))]),
            nncf.Dataset(list(range(len(images.validation)))), validator, initial - target,
            dict(parameters, subset_size=len(images.calibration)), external, folder)
        measured = validator.measure(quantized)
    int8_layers, kept = quantized_layers(quantized)
    worst = min(measured["cosine"], key=measured["cosine"].get)
    record = {"method": "nncf accuracy control (quantize, QuantizationAccuracyRestorer)", "nncf": nncf.__version__, "target_cosine": target,
              **({"min_agreement": options.min_agreement, "agreement_tap": validator.agreement_tap or "worst"}
                 if options.min_agreement is not None else {}),
              **measured, "validation": {"images": len(images.validation), "source": images.validation_source},
              "validated_with": {"runtime": f"openvino {_openvino_version()}", "float_layers": validator.precision},
              "calibration": images.record(), "seconds": round(time.perf_counter() - t0, 1),
              "layers": {"quantized": len(int8_layers), "kept": len(kept), "kept_names": kept,
                         "image_independent": len(ignored)}}
    info = dataclasses.replace(info, extra=dict(info.extra, precision="int8", int8=record,
                                                fp32_reference=fp32_path.name))
    set_metadata(quantized, info)
    missed = validator.shortfall(measured)
    written = out if missed is None else out.with_name(out.stem + ".unverified.onnx")
    save_onnx(quantized, written, external_data)
    log(f"wrote {written}: {len(int8_layers)} layers int8, {len(kept)} kept in floating point ({len(ignored)} "
        f"image-independent); worst per-tap cosine to fp32 {measured['cosine'][worst]:.5f} ({worst}, target "
        f"{target:g}), us6 match agreement {measured['match_agreement'].get('us6', float('nan')):.4f}; "
        f"{validator.evaluations} evaluations in {time.perf_counter() - t0:.0f} s")
    if missed is not None:
        raise Int8TargetMissed(f"accuracy control reached {missed}; kept as {written}: allow a larger --max-drop "
                               "(or a smaller --min-agreement), more --max-iterations, or calibrate on more images "
                               "of your domain")
    return info


def _openvino_version() -> str:
    import openvino

    return openvino.get_version().split("-")[0]


__all__ = ["Int8Options", "Int8TargetMissed", "write_int8_onnx", "quantized_layers", "image_independent_compute"]
