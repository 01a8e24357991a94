"""Writing an exported ONNX graph: its metadata and a checked, atomic save (weights in one external-data
file above 2 GB). Shared by every export path (fp32, fp16, int8), so it sits below them all."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import staging_folder, usual_mode
from ..formats.artifact import ArtifactInfo

PROTOBUF_LIMIT = 2**31 - 1  # ONNX files above 2 GB must keep their weights in external data


def set_metadata(model, info: ArtifactInfo) -> None:
    """Replace the graph's ``metadata_props`` with ``info`` and describe it in ``doc_string``."""
    del model.metadata_props[:]
    for k, v in info.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    precision = info.extra.get("precision", "fp32")
    derived = "".join(f", then {d['name']} from {', '.join(d['reads']) or 'taps'}" for d in info.derived_outputs)
    model.doc_string = (f"cleandift-rt feature extractor ({precision}): images (float32 NCHW RGB in [-1, 1]) -> "
                        f"taps {', '.join(info.tap_names)}{derived}")


def save_onnx(model, out: Path, external_data: bool | None = None) -> None:
    """Save ``model``; weights in ONE ``<name>.data`` file beside it when asked or above 2 GB.

    Written under a temporary name in the same folder, checked, then renamed: an interrupted or
    failed export never leaves a truncated model at ``out`` (nor deletes a previous good one).
    """
    import onnx

    if external_data is None:
        external_data = model.ByteSize() > PROTOBUF_LIMIT if _fits_protobuf(model) else True
    data = out.with_name(out.name + ".data")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent, "save") as tmp:
        staged, staged_data = Path(tmp) / out.name, Path(tmp) / data.name
        if external_data:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        check_onnx(staged)
        usual_mode(staged)  # the graph and its weights get the mode any file we write gets (0644 under umask 022)
        if staged_data.exists():
            usual_mode(staged_data)
            os.replace(staged_data, data)
        elif data.exists():
            data.unlink()  # a previous export's weights; this model carries its own
        os.replace(staged, out)


def _fits_protobuf(model) -> bool:
    # ByteSize itself fails on > 2 GB messages in some protobuf builds: sum the tensors first.
    total = sum(len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer)
    return total < PROTOBUF_LIMIT


def check_onnx(path: Path) -> None:
    """``onnx.checker`` and strict shape inference, both from the path (works above 2 GB)."""
    import onnx

    onnx.checker.check_model(str(path))
    with staging_folder(path.parent, "shapes") as tmp:
        onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), strict_mode=True)
