"""Probes: the paper's downstream checks (CleanDIFT sections 4.3-4.5) over any feature source.

Owns monocular depth (:class:`DepthProbe`, NYUv2 labeled set or a folder tree), semantic
segmentation (:class:`SegmentationProbe`, PASCAL VOC 2012) and kNN classification
(:func:`knn_classify`, ImageFolder), their loaders, their view of the per-image feature store
(``ProbeStore`` over ``features.store``) shared by every engine, the noisy baseline and the
head-projected features at each t, probe training (AdamW, schedule, early stopping, atomic
checkpoints), the timestep sweeps with their results, CSV and Pillow plots. It may import ``kernels`` (``match``, ``project``), ``features``, ``models``,
``viz``, ``runs`` (the run loop, the skip log) and the shared top-level modules; its commands are in ``cli/probes.py``.
"""

from ..runs.skips import SkipLog
from .cache import DiftSource, EngineSource, FeatureStore, Lazy, ProbeStore, ProjectedSource
from .data import (Dataset, Sample, SampleError, load_depth_data, load_depth_folder, load_image_folders,
                   load_nyu, load_voc)
from .depth import DepthProbe, DepthProtocol, depth_metrics
from .knn import KnnResult, knn_classify, vote
from .plot import line_plot
from .run import run_dense, run_knn
from .segmentation import SegmentationProbe, confusion_matrix, iou_scores
from .training import LinearProbe, ProbeTrainConfig, load_probe

# the old public names: the probes' training settings, and the skip log every run shares now
TrainConfig = ProbeTrainConfig
Skips = SkipLog

__all__ = ["Dataset", "DepthProbe", "DepthProtocol", "DiftSource", "EngineSource", "FeatureStore", "KnnResult", "Lazy",
           "LinearProbe", "ProbeStore", "ProbeTrainConfig", "ProjectedSource", "Sample", "SampleError",
           "SegmentationProbe", "Skips", "TrainConfig", "confusion_matrix", "depth_metrics", "iou_scores",
           "knn_classify", "line_plot", "load_depth_data", "load_depth_folder", "load_image_folders", "load_nyu",
           "load_probe", "load_voc", "run_dense", "run_knn", "vote"]
