"""Pictures a person reads at a glance (matches, feature PCA), drawn with Pillow only.

It imports nothing from the package, so every stage may draw with it.
"""

from .pictures import colormap, draw_matches, feature_pca, pca_maps

__all__ = ["colormap", "draw_matches", "feature_pca", "pca_maps"]
