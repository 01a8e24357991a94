"""The correspondence explorer: a local web page where a person loads images, clicks a point on one
and sees on every other image the cosine-similarity heat map and the best match, for a tap, the
projection heads at a timestep, the Hyperfeatures descriptor or a DINOv2 fusion recipe, beside the
feature PCA of each image; and follows clicked points through a video (docs/explore.md).

Owns the session state (``session``: images with their features, computed once per image and kept
while the page is open; recipes with the maps they derive; the click's answer), the recipes
(``recipes``), the pictures it draws (``pictures``), the tracking tab (``tracking``) and the
standard-library HTTP server with its one page (``server``, ``page.html``). It may import ``kernels``,
``features``, ``viz`` and the top-level shared modules; the Engine, the projection heads, the
``fusion.Fusion`` objects and the ``Tracker`` are passed in, never imported.
"""

from .server import ExplorerServer
from .session import ExploreError, Session
from .tracking import TrackingSession

__all__ = ["ExplorerServer", "ExploreError", "Session", "TrackingSession"]
