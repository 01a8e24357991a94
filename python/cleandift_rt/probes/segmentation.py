"""Semantic segmentation with a linear probe on the tap's grid (CleanDIFT section 4.4).

Per grid cell, a linear layer gives one logit per class; the logits are upsampled to the label's
size with nearest-neighbour interpolation, as in the paper. Training minimises the pixel-level
cross-entropy of those upsampled logits over the labelled pixels (void 255 ignored), computed on the
grid: each labelled pixel is counted in the cell nearest upsampling takes it from, which gives the
same number as ``F.cross_entropy(interpolate(logits, nearest), ignore_index=255)`` at a fraction of
the cost. Evaluation accumulates one confusion matrix over all test pixels that are not void; the
IoU of a class is ``TP / (TP + FP + FN)`` and the mIoU is the mean over the classes present in the
ground truth or the predictions (classes with an empty union are NaN and left out: the standard
nan-mean of mmsegmentation and the VOC devkit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import VOID
from .depth import sparse_counts
from .training import LinearProbe


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = VOID) -> np.ndarray:
    """``[num_classes, num_classes]`` int64, rows = ground truth, columns = prediction; ``ignore`` left out."""
    keep = np.asarray(gt) != ignore
    g, p = np.asarray(gt)[keep].astype(np.int64), np.asarray(pred)[keep].astype(np.int64)
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_scores(confusion: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU (NaN where the class is in neither ground truth nor predictions) and their nan-mean."""
    conf = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return iou, float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


class SegmentationProbe(LinearProbe):
    """Linear per-pixel classifier over ``num_classes`` classes (module docstring)."""

    kind = "segmentation"

    def __init__(self, channels: int, num_classes: int = 21, ignore_index: int = VOID):
        if num_classes < 2:
            raise ValueError(f"segmentation needs num_classes >= 2, got {num_classes}")
        super().__init__(channels, num_classes)
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)

    def meta(self) -> dict:
        return {**super().meta(), "num_classes": self.num_classes, "ignore_index": self.ignore_index}

    @classmethod
    def from_meta(cls, meta: dict) -> SegmentationProbe:
        return cls(int(meta["channels"]), int(meta["num_classes"]), int(meta.get("ignore_index", VOID)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits on the tap's grid, ``[B, num_classes, h, w]``."""
        return self.scores(features)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Class per pixel at ``size`` (H, W): logits upsampled nearest, then argmax, ``[B, H, W]`` int64."""
        return F.interpolate(self(features), size=tuple(size), mode="nearest").argmax(dim=1)

    def prepare(self, target: np.ndarray, grid: tuple[int, int]):
        lab = np.asarray(target)
        index, count = sparse_counts(lab, lab != self.ignore_index, grid, self.num_classes)
        return index, index % (grid[0] * grid[1]), count

    def _loss(self, features: torch.Tensor, prepared) -> torch.Tensor:
        """Mean cross-entropy over the labelled pixels (void = ``ignore_index`` left out)."""
        logits = self(features)  # [B, K, h, w]
        norm = torch.logsumexp(logits, dim=1)  # [B, h, w]
        total, count = logits.new_zeros(()), 0.0
        for b, (index, cell, n) in enumerate(prepared):
            log_p = logits[b].reshape(-1)[index] - norm[b].reshape(-1)[cell]
            total = total - (n * log_p).sum()
            count += float(n.sum())
        return total / count if count else logits.sum() * 0.0

    @torch.no_grad()
    def evaluate(self, features: Sequence, labels: Sequence[np.ndarray]) -> dict:
        """mIoU, per-class IoU (None = class absent from both) and pixel accuracy over all test pixels."""
        conf = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        for f, lab in zip(features, labels):
            lab = np.asarray(lab)
            pred = self.predict(torch.from_numpy(np.array(f, dtype=np.float32))[None], lab.shape)[0].numpy()
            conf += confusion_matrix(pred, lab, self.num_classes, self.ignore_index)
        iou, miou = iou_scores(conf)
        total = conf.sum()
        return {"miou": miou, "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
                "pixel_accuracy": float(np.trace(conf) / total) if total else float("nan"), "images": len(labels)}
