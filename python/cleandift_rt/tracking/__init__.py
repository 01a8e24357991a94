"""Point tracking on dense descriptors, for robotics: follow pixels through camera streams.

Owns the ``Tracker`` (reference points matched into each frame with the native ``match`` kernel
and the soft-argmax refinement, forward-backward visibility, several named cameras in one engine
call, keyframes, a latest-frame ``stream``), TAP-Vid's metrics and file reader, synthetic videos
with exact ground truth made from photos, the evaluation loop, and video I/O and pictures (OpenCV).
It may import ``runtime`` (the frame policies; the Engine itself is passed in), ``kernels``,
``features`` and the top-level shared modules.
"""

from .evaluate import evaluate, track_video
from .metrics import THRESHOLDS, TrackingVideo, mean_metrics, query_first, tapvid_metrics
from .synthetic import MOTIONS, synthetic_video, synthetic_videos
from .tapvid import load_tapvid
from .tracker import FrameFeatures, Tracker, TrackResult, TrackStreamResult

__all__ = ["Tracker", "TrackResult", "TrackStreamResult", "FrameFeatures", "evaluate", "track_video", "THRESHOLDS",
           "TrackingVideo", "mean_metrics", "query_first", "tapvid_metrics", "MOTIONS", "synthetic_video",
           "synthetic_videos", "load_tapvid"]
