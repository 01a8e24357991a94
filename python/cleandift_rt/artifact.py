"""Kept for ``cleandift_rt.artifact`` users: the engine-file formats now live in ``cleandift_rt.formats``."""

from .formats.artifact import (EMBEDS_INPUT, FORMAT, IMAGE_INPUT, META_PREFIX, SCHEMA, ArtifactInfo, check_compatible,
                               describe, parse_batch, read_info, read_onnx_info, size_fields, tap_records)
from .formats.plan import PLAN_MAGIC, plan_header_bytes, read_plan_header

__all__ = ["EMBEDS_INPUT", "FORMAT", "IMAGE_INPUT", "META_PREFIX", "PLAN_MAGIC", "SCHEMA", "ArtifactInfo",
           "check_compatible", "describe", "parse_batch", "plan_header_bytes", "read_info", "read_onnx_info",
           "read_plan_header", "size_fields", "tap_records"]
