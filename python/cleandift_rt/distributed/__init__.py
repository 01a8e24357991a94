"""Distributed extraction on Ray Data: the same features, manifest and shards as the local
extractor, from many workers, GPUs and machines.

Owns the Ray pipeline (``pipeline.extract``: decode and resize in CPU tasks, one ``Engine`` per
actor, shards written by CPU tasks, the manifest written by the driver alone) and its stages as
plain functions of Ray Data batches (``stages``). Ray is an optional dependency, imported only
when a pipeline runs. It may import ``extraction`` (run start, manifest, shards), ``runtime``
(inside the actors), ``formats`` and the top-level shared modules.
"""

from .pipeline import INSTALL, engine_facts, extract, run_items

__all__ = ["INSTALL", "engine_facts", "extract", "run_items"]
