"""Diffusion Hyperfeatures: a learned aggregation of feature maps over layers and timesteps.

Owns the aggregation network (``network``), the self-contained aggregator file and its use on a
feature grid (``aggregator``: ``Aggregator.from_file``, the CleanDIFT heads of the
``cleandift-heads`` source), the CLIP-style loss (``loss``), the base model's DDIM inversion and the
original's feature schedule (``inversion``), the feature sources cleandift / cleandift-heads /
inversion / one-step (``sources``; their arrays kept in ``features.store`` in fp16), training
with checkpoints and exact resume (``train``) and the mixing-weights heat map (``picture``). An
``Aggregator`` is a derived output (``formats.derived``): the runtime and the export run it without
importing this package, and importing ``aggregator`` registers the ``aggregator=FILE`` option of
``Engine`` and ``export_onnx``. It sits above them and may import every stage below (``runtime``,
``export``, ``evaluation``, ``formats``, ``kernels``, ``features``, ``models``, ``runs``, ``viz``)
and the top-level shared modules.
"""

from .aggregator import HYPER, SOURCES, Aggregator, is_aggregator_file
from .network import AggregationConfig, AggregationNetwork
from .sources import EngineTaps, HyperFeatures, InversionTaps, head_timesteps, new_aggregator

__all__ = ["Aggregator", "AggregationNetwork", "AggregationConfig", "HYPER", "SOURCES", "is_aggregator_file",
           "EngineTaps", "InversionTaps", "HyperFeatures", "head_timesteps", "new_aggregator"]
