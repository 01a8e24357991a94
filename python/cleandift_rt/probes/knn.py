"""k-nearest-neighbour classification of globally pooled features (CleanDIFT section 4.5).

Each image is one vector (the tap's global average). A query's ``k`` nearest training vectors by
cosine similarity come from ``cleandift_rt.match(..., k=k)`` (tiled, no N x M matrix); each votes
once for its class (a temperature-free majority vote, as the paper). Classes are ranked by votes;
a tie goes to the class whose best-placed neighbour is nearer (ranks come from ``match``, which
orders equal similarities by the lower training index), so the ranking is total and deterministic.
Top-1 is the first class, top-5 the first five (fewer when fewer classes got a vote).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels.matching import match


@dataclass
class KnnResult:
    neighbours: np.ndarray  # [M, k] training indices, nearest first
    ranked: np.ndarray  # [M, top] class indices by votes (-1 where fewer classes got a vote)
    votes: np.ndarray  # [M, top] the votes of those classes
    top1: float | None = None  # accuracies in [0, 1] when the queries' labels were given
    top5: float | None = None


def vote(neighbour_labels: np.ndarray, top: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Classes ranked by votes of ``neighbour_labels [M, k]`` (nearest first), ties to the nearer best neighbour."""
    lab = np.asarray(neighbour_labels, dtype=np.int64)
    k = lab.shape[1]
    same = lab[:, :, None] == lab[:, None, :]  # [M, k, k]
    votes = same.sum(2)
    first = same.argmax(2) == np.arange(k)  # position j is its class's nearest neighbour
    score = np.where(first, votes * (k + 1) - np.arange(k), -1)  # more votes first, then the nearer one
    order = np.argsort(-score, axis=1, kind="stable")[:, :top]
    picked = np.take_along_axis(score, order, 1) >= 0
    ranked = np.where(picked, np.take_along_axis(lab, order, 1), -1)
    counts = np.where(picked, np.take_along_axis(votes, order, 1), 0)
    if ranked.shape[1] < top:  # k < top: pad
        pad = top - ranked.shape[1]
        ranked = np.pad(ranked, ((0, 0), (0, pad)), constant_values=-1)
        counts = np.pad(counts, ((0, 0), (0, pad)))
    return ranked, counts


def knn_classify(train_features, train_labels, query_features, query_labels=None, *, k: int = 10, top: int = 5,
                 chunk: int = 4096, progress: bool = False) -> KnnResult:
    """Classify ``query_features [M, C]`` by the ``k`` nearest of ``train_features [N, C]`` (cosine).

    Features may be float32 or float16 numpy arrays (memory maps welcome); labels are class
    indices. With ``query_labels`` the result carries top-1 / top-5 accuracy as fractions.
    """
    from tqdm.auto import tqdm

    train = np.asarray(train_features)
    query = np.asarray(query_features)
    labels = np.asarray(train_labels, dtype=np.int64)
    if train.ndim != 2 or query.ndim != 2 or train.shape[1] != query.shape[1]:
        raise ValueError(f"knn_classify takes [N, C] training and [M, C] query features with one C, got "
                         f"{train.shape} and {query.shape}")
    if len(labels) != len(train):
        raise ValueError(f"{len(train)} training vectors but {len(labels)} labels")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > len(train):
        raise ValueError(f"k = {k} needs at least {k} training images, got {len(train)}")
    if train.dtype != query.dtype or train.dtype not in (np.float32, np.float16):
        train, query = train.astype(np.float32), query.astype(np.float32)
    neighbours = np.zeros((len(query), k), dtype=np.int64)
    for start in tqdm(range(0, len(query), chunk), desc="kNN", unit="chunk", disable=not progress):
        idx, _ = match(query[None, start:start + chunk], train[None], k=int(k))
        neighbours[start:start + chunk] = np.asarray(idx).reshape(-1, k)
    ranked, votes = vote(labels[neighbours], top)
    result = KnnResult(neighbours, ranked, votes)
    if query_labels is not None:
        y = np.asarray(query_labels, dtype=np.int64)
        if len(y) != len(query):
            raise ValueError(f"{len(query)} queries but {len(y)} query labels")
        result.top1 = float(np.mean(ranked[:, 0] == y)) if len(y) else float("nan")
        result.top5 = float(np.mean((ranked[:, :5] == y[:, None]).any(1))) if len(y) else float("nan")
    return result
