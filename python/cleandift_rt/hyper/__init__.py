"""Diffusion Hyperfeatures (SPEC section 8): a learned aggregation of feature maps over layers and timesteps.

Owns the aggregation network (``network``), the self-contained aggregator file and its use on a
feature grid (``aggregator``: ``Aggregator.from_file``, the CleanDIFT heads of the
``cleandift-heads`` source), the CLIP-style loss (``loss``), the base model's DDIM inversion and the
original's feature schedule (``inversion``), the feature sources cleandift / cleandift-heads /
inversion / one-step (``sources``; their arrays kept in ``features.store`` in fp16), training
with checkpoints and exact resume (``train``) and the mixing-weights heat map (``picture``). It may
import ``kernels``, ``features``, ``models``, ``viz`` and the top-level shared modules; ``runtime``
(``Engine(..., aggregator=FILE)``) and ``export`` (the ``hyper`` ONNX output) build on it, so it
takes an Engine as a plain object and gets SPair pairs and the PCK validator from its command.
"""

from .aggregator import HYPER, SOURCES, Aggregator, is_aggregator_file
from .network import AggregationConfig, AggregationNetwork
from .sources import EngineTaps, HyperFeatures, InversionTaps, head_timesteps, new_aggregator

__all__ = ["Aggregator", "AggregationNetwork", "AggregationConfig", "HYPER", "SOURCES", "is_aggregator_file",
           "EngineTaps", "InversionTaps", "HyperFeatures", "head_timesteps", "new_aggregator"]
