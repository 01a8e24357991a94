"""Extraction at scale on one machine: features of many images written to files, resumably.

Owns the run's inputs (image keys and paths, ``RunConfig``, decoding into model input), the
manifest journal of what a run committed and what each output was made from (``manifest``), the
per-image writers with their collision-free names (``files``), the shard format and its reader
(``shards``: ``read_shards``), the start of a run shared with the Ray pipeline, which verifies
what a resumed run would skip (``resume``), and the pipelined local extractor that overlaps
decoding, inference and writing (``pipeline.extract_local``). It may import ``runtime`` (an Engine is passed in),
``features``, ``formats`` and the top-level shared modules; its command is ``extract`` in
``cli/extract.py``.
"""

from .inputs import (
           FORMATS,
           IMAGE_SUFFIXES,
           Item,
           RunConfig,
           collect_images,
           decode,
           run_config,
)
from .manifest import Manifest, manifest_path, read_manifest
from .pipeline import default_batch_size, engine_config, extract_local
from .resume import Summary, open_run
from .shards import default_shard_images, read_shards, write_shard

__all__ = [
           "FORMATS",
           "IMAGE_SUFFIXES",
           "Item",
           "Manifest",
           "RunConfig",
           "Summary",
           "collect_images",
           "decode",
           "default_batch_size",
           "default_shard_images",
           "engine_config",
           "extract_local",
           "manifest_path",
           "open_run",
           "read_manifest",
           "read_shards",
           "run_config",
           "write_shard",
]
