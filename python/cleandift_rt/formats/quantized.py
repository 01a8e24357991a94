"""What a quantized feature graph says about itself: ``extra["precision"]`` and the int8 record.

An int8 file (``export.int8``) carries in ``extra["int8"]`` what its quantization achieved and how,
so that ``cleandift-rt info`` shows it and nobody has to trust the export's log:

- ``target_cosine``: the worst per-tap cosine to the fp32 graph it had to reach (1 - ``--max-drop``);
- ``min_agreement``, ``agreement_tap`` (only with ``--min-agreement``): the match agreement with fp32
  it also had to reach, and on which tap (``"worst"``: the worst tap of a file without us6);
- ``cosine``: ``{tap: smallest cosine over the held-out images}`` of the file as written, and
  ``match_agreement``: ``{tap: share of pixels whose nearest neighbour in the next image is the
  fp32 graph's}`` (``runtime.compare``), measured on ``validation`` (images, source) with
  ``validated_with`` (the runtime and the precision of the layers kept in floating point);
- ``calibration``: ``{"images", "sha256", "source"}``, the calibration set's size and content hash;
- ``layers``: ``{"quantized", "kept", "kept_names"}``, the convolutions and matrix products that run
  in int8 and those kept in floating point (by accuracy control, or as image-independent paths);
- ``method``, ``nncf``: the quantizer and its version.

Like all metadata it is untrusted: ``check_precision_record`` types and bounds it when the file is
read (``metadata_check``).
"""

from __future__ import annotations

from ..checks import check_float, check_int
from ..taps import TAPS

FILE_PRECISIONS = ("fp32", "fp16", "fp16+fp32", "int8")  # extra["precision"] of files and plans (absent: fp32)
MAX_LAYERS = 100_000
MAX_NAME = 1000


def file_precision(extra: dict) -> str:
    """The precision a file was exported in (``extra["precision"]``; fp32 when absent)."""
    return extra.get("precision", "fp32")


def check_precision_record(extra: dict, source: str) -> None:
    """Raise a ValueError naming the first malformed field of ``extra``'s precision and int8 record."""
    precision = file_precision(extra)
    if precision not in FILE_PRECISIONS:
        raise ValueError(f"{source}: metadata precision {precision!r:.40} is not one of {', '.join(FILE_PRECISIONS)}")
    record = extra.get("int8")
    if precision != "int8":
        if record is not None:
            raise ValueError(f"{source}: metadata holds an int8 record but says precision {precision!r}")
        return
    what = f"{source}: int8 record"
    if not isinstance(record, dict):
        raise ValueError(f"{what} is missing (an int8 file says what its quantization reached): re-export it")
    check_float(record.get("target_cosine"), f"{what} target_cosine", -1.0, 1.0)
    if record.get("min_agreement") is not None:
        check_float(record["min_agreement"], f"{what} min_agreement", 0.0, 1.0)
        if record.get("agreement_tap") not in (*TAPS, "worst"):
            raise ValueError(f"{what} agreement_tap must name a tap or 'worst'")
    for key in ("cosine", "match_agreement"):
        values = record.get(key)
        if not isinstance(values, dict) or not values or any(t not in TAPS for t in values):
            raise ValueError(f"{what} {key} must map tap names to numbers")
        for tap, value in values.items():
            check_float(value, f"{what} {key}[{tap}]", -1.0, 1.0)
    for key, fields in (("calibration", ("images",)), ("validation", ("images",)),
                        ("layers", ("quantized", "kept"))):
        part = record.get(key)
        if not isinstance(part, dict):
            raise ValueError(f"{what} {key} must be an object")
        for field in fields:
            check_int(part.get(field), f"{what} {key}.{field}", 0, MAX_LAYERS)
    names = record["layers"].get("kept_names", [])
    if not isinstance(names, list) or len(names) > MAX_LAYERS or any(
            not isinstance(n, str) or len(n) > MAX_NAME for n in names):
        raise ValueError(f"{what} layers.kept_names must be a list of layer names")


def describe_int8(record: dict) -> list[str]:
    """The int8 record as lines of text (``cleandift-rt info``)."""
    cosine, agreement = record["cosine"], record["match_agreement"]
    worst = min(cosine, key=cosine.get)
    calibration, validation, layers = record["calibration"], record["validation"], record["layers"]
    ran = record.get("validated_with", {})
    total = layers["quantized"] + layers["kept"]
    return [f"  int8: {layers['quantized']} of {total} convolutions / matrix products in int8, {layers['kept']} kept "
            f"in floating point",
            f"  int8 accuracy: worst per-tap cosine to fp32 {cosine[worst]:.5f} ({worst}; target "
            f"{record['target_cosine']:g}) on {validation['images']} validation images "
            f"({validation.get('source', '?')})"
            + (f", run on {ran.get('runtime', '?')} with {ran.get('float_layers', '?')} float layers" if ran else ""),
            "  int8 match agreement with fp32: " + ", ".join(f"{t} {v:.4f}" for t, v in agreement.items())
            + (f" (target: {record['agreement_tap']} >= {record['min_agreement']:g})"
               if record.get("min_agreement") is not None else ""),
            f"  int8 calibration: {calibration['images']} images ({calibration.get('source', '?')}), sha256 "
            f"{str(calibration.get('sha256', '?'))[:16]}"]


__all__ = ["FILE_PRECISIONS", "check_precision_record", "describe_int8", "file_precision"]
