"""One probe experiment from data to ``results.json``: cache features, train or load probes, evaluate,
sweep, and write the CSV, the sweep plot and the example pictures.

The first source given is the main method (its metrics go at the top level of the results); the
others (the noisy baseline and the head-projected features at each t) become the ``sweep`` rows.
Every source sees the same samples: an image that any source cannot use is skipped for all and
counted once. Probes are written to ``OUT/probes/<method>.safetensors``; a rerun with the same data
and settings loads them instead of training, and reads every feature from the cache.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes
from ..runs.skips import SkipLog
from .cache import ProbeStore
from .data import Dataset, Sample, SampleError
from .depth import DepthProbe, DepthProtocol
from .knn import knn_classify
from .plot import depth_colours, line_plot, overlay, panel
from .segmentation import SegmentationProbe
from .training import ProbeTrainConfig, load_probe

PRIMARY = {"depth": ("rmse", "RMSE (m), lower is better"), "segmentation": ("miou", "mIoU, higher is better"),
           "knn": ("top1", "top-1 accuracy, higher is better")}
METRICS = {"depth": ("rmse", "abs_rel", "delta1"), "segmentation": ("miou", "pixel_accuracy"), "knn": ("top1", "top5")}


def slug(source) -> str:
    return source.name if source.t is None else f"{source.name}-t{source.t}"


def _once(read):
    """``read()`` called at most once (several sources share one decoded image)."""
    box = []

    def get():
        if not box:
            box.append(read())
        return box[0]

    return get


def gather(samples: Sequence[Sample], sources, store: ProbeStore, view: str, target_kind: str | None,
           skips: SkipLog, progress: bool, desc: str) -> list[Sample]:
    """Cache the target and every source's features of each sample; the samples all of them could use."""
    from tqdm.auto import tqdm

    usable = []
    for sample in tqdm(samples, desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        image = _once(sample.read_image)
        try:
            if target_kind is not None:
                store.target(sample, target_kind)
            for source in sources:
                store.features(source, view, sample, image)
        except SampleError as exc:
            skips.add(exc.reason, exc.where)
            continue
        usable.append(sample)
    return usable


def skipped_json(skips: SkipLog) -> dict:
    """The results' ``data.skipped``: samples left out in all, by reason, a few examples of each."""
    return {"total": skips.total, "by_reason": dict(skips.counts),
            "examples": {reason: list(shown) for reason, shown in skips.examples.items()}}


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _clean(value):
    """JSON without NaN / Infinity (null instead), so every JSON reader accepts the results."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_results(doc: dict, out: Path, rows: list[dict], task: str) -> dict:
    """``results.json``, ``sweep.csv`` (one row per method and t) and, with a sweep, ``sweep.png``."""
    metric, axis = PRIMARY[task]
    outputs = dict(doc.get("outputs", {}))
    columns = ["method", "t", *METRICS[task], "images"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    payload = buf.getvalue().encode()
    atomic_write_bytes(out / "sweep.csv", lambda tmp: Path(tmp).write_bytes(payload))
    outputs["csv"] = str(out / "sweep.csv")
    swept = [r for r in rows if r["t"] is not None]
    if swept:
        series = {}
        for r in swept:
            series.setdefault(r["method"], []).append((r["t"], r[metric]))
        lines = [(name, [t for t, _ in sorted(v)], [m for _, m in sorted(v)]) for name, v in series.items()]
        flat = [(r["method"], r[metric]) for r in rows if r["t"] is None]
        picture = line_plot(lines, flat, title=f"{task} probe: {metric} vs timestep", xlabel="timestep t",
                            ylabel=axis)
        atomic_write_bytes(out / "sweep.png", lambda tmp: picture.save(tmp, format="PNG"))
        outputs["plot"] = str(out / "sweep.png")
    doc["outputs"] = outputs
    payload_json = json.dumps(_clean(doc), indent=2).encode()
    atomic_write_bytes(out / "results.json", lambda tmp: Path(tmp).write_bytes(payload_json))
    return doc


def _probe_for(task: str, source, train_feats, train_targets, make_probe, config: ProbeTrainConfig, out: Path,
               fingerprint: str, progress: bool):
    """(probe, training report or None when an earlier run's probe was reused, probe path)."""
    path = out / "probes" / f"{slug(source)}.safetensors"
    if path.is_file():
        try:
            probe, info = load_probe(path)
            if info.get("fingerprint") == fingerprint:
                return probe, None, path
        except ValueError:
            pass  # unreadable: train again
    probe = make_probe(int(np.asarray(train_feats[0]).shape[0]))
    state = path.with_suffix(".state.safetensors")
    report = probe.fit(train_feats, train_targets, config, checkpoint=state, fingerprint=fingerprint, progress=progress)
    probe.save(path, {"fingerprint": fingerprint, "task": task, "method": source.name, "t": source.t,
                      "tap": source.tap, "features": source.key, "training": {k: v for k, v in report.items()
                                                                                if k != "history"}})
    state.unlink(missing_ok=True)
    return probe, report, path


def run_dense(task: str, dataset: Dataset, sources, store: ProbeStore, out: str | Path, *, config: ProbeTrainConfig,
              protocol: DepthProtocol | None = None, num_classes: int = 21, probe_file: str | Path | None = None,
              pictures: int = 4, progress: bool = True, extra: dict | None = None) -> dict:
    """Depth (``task="depth"``) or segmentation (``"segmentation"``) probes for every source; the
    results document (also written to ``out/results.json``). ``protocol`` (depth): None = NYUv2's for
    the labeled set, else no crop and the training data's maximum depth."""
    if task not in ("depth", "segmentation"):
        raise ValueError(f"task must be 'depth' or 'segmentation', got {task!r}")
    out = Path(out)
    kind = "depth" if task == "depth" else "label"
    skips = SkipLog("image").merge(dataset.skips)
    loaded = None
    if probe_file is not None:
        loaded, loaded_info = load_probe(probe_file)
        expected = DepthProbe if task == "depth" else SegmentationProbe
        if not isinstance(loaded, expected):
            raise ValueError(f"--probe {probe_file} is a {loaded.kind} probe; this command needs a {expected.kind} one")
        train = []
    else:
        train = gather(dataset.train, sources, store, "map", kind, skips, progress, f"{task} train features")
        if not train:
            raise ValueError(f"no usable training images in {dataset.root}" +
                             ("; " + "; ".join(skips.lines()) if skips.total else ""))
    test = gather(dataset.test, sources, store, "map", kind, skips, progress, f"{task} test features")
    if not test:
        raise ValueError(f"no usable test images in {dataset.root}" + ("; " + "; ".join(skips.lines()) if skips.total else ""))
    train_targets = [store.target(s, kind) for s in train]
    test_targets = [store.target(s, kind) for s in test]
    if task == "depth":
        if protocol is None:  # NYUv2's protocol for the labeled set, the data's own range for folders
            nyu = dataset.kind == "nyu"
            protocol = DepthProtocol(1e-3, 10.0 if nyu else None, eigen_crop=nyu, strict_max=nyu)
        if protocol.max_depth is None:
            source_max = loaded.max_depth if loaded is not None else max(float(np.max(t)) for t in train_targets)
            protocol = DepthProtocol(protocol.min_depth, source_max, protocol.eigen_crop, protocol.strict_max)

        def make_probe(channels):
            return DepthProbe(channels, min_depth=protocol.min_depth, max_depth=protocol.max_depth)

        def evaluate(probe, feats):
            return probe.evaluate(feats, test_targets, protocol)
    else:
        def make_probe(channels):
            return SegmentationProbe(channels, num_classes)

        def evaluate(probe, feats):
            return probe.evaluate(feats, test_targets)

    rows, training, probes = [], {}, {}
    for source in sources:
        test_feats = [store.features(source, "map", s) for s in test]
        if loaded is not None:
            probe, path = loaded, Path(probe_file)
        else:
            train_feats = [store.features(source, "map", s) for s in train]
            fp = _fingerprint(task, source.key, [(s.image_key, s.target_key) for s in train], asdict(config),
                              make_probe(1).meta(), store.dtype)
            probe, report, path = _probe_for(task, source, train_feats, train_targets, make_probe, config, out, fp,
                                             progress)
            if report is not None:
                training[slug(source)] = report
        metrics = evaluate(probe, test_feats)
        rows.append({"method": source.name, "t": source.t, **metrics, "probe": str(path)})
        probes[slug(source)] = str(path)

    main = rows[0]
    doc = {"task": task, "method": main["method"], "tap": sources[0].tap,
           **{k: v for k, v in main.items() if k not in ("method", "t", "probe")},
           "sweep": [r for r in rows[1:] if r["t"] is not None],
           "data": {**dataset.describe(), "train_used": len(train), "test_used": len(test), "skipped": skipped_json(skips)},
           "probes": probes, "training": training,
           "cache": {"dir": str(store.root), "dtype": store.dtype, "computed": dict(store.computed),
                     "reused": dict(store.reused)},
           **(extra or {})}
    if task == "depth":
        doc["protocol"] = {**asdict(protocol), "bins": probe.n_bins, "bin_range": [probe.min_depth, probe.max_depth]}
    else:
        doc["classes"] = list(dataset.classes)
    if probe_file is not None:
        doc["probe_file"] = str(probe_file)
        doc["probe_trained_on"] = loaded_info
    if pictures:
        name = "depth_examples.png" if task == "depth" else "segmentation_examples.png"
        first = probe if probe_file is not None else load_probe(probes[slug(sources[0])])[0]
        picture = _examples(task, first, sources[0], store, test[:pictures], test_targets[:pictures], protocol)
        atomic_write_bytes(out / name, lambda tmp: picture.save(tmp, format="PNG"))
        doc["outputs"] = {"pictures": [str(out / name)]}
    return write_results(doc, out, rows, task)


def _examples(task: str, probe, source, store: ProbeStore, samples, targets, protocol):
    """Image / ground truth / prediction rows for the first test images."""
    from PIL import Image

    rows = []
    for sample, target in zip(samples, targets):
        target = np.asarray(target)
        image = Image.fromarray(np.asarray(sample.read_image())).resize(target.shape[::-1], Image.BILINEAR)
        feats = torch.from_numpy(np.array(store.features(source, "map", sample), dtype=np.float32))[None]
        pred = probe.predict(feats, target.shape)[0].numpy()
        if task == "depth":
            top = max(float(target.max()), float(pred.max()))
            rows.append([image, depth_colours(target, top, protocol.valid(target)), depth_colours(pred, top)])
        else:
            rows.append([image, overlay(image, target), overlay(image, pred)])
    return panel(rows, ["image", "ground truth", f"prediction ({slug(source)})"])


def run_knn(dataset: Dataset, sources, store: ProbeStore, out: str | Path, *, k: int = 10, progress: bool = True,
            extra: dict | None = None) -> dict:
    """kNN top-1 / top-5 on globally pooled features for every source."""
    out = Path(out)
    skips = SkipLog("image").merge(dataset.skips)
    train = gather(dataset.train, sources, store, "gap", None, skips, progress, "kNN train features")
    test = gather(dataset.test, sources, store, "gap", None, skips, progress, "kNN query features")
    if len(train) < k or not test:
        raise ValueError(f"kNN with k = {k} needs at least {k} usable training images and one query; got {len(train)} "
                         f"and {len(test)}" + ("; " + "; ".join(skips.lines()) if skips.total else ""))
    train_labels = np.array([s.label for s in train])
    test_labels = np.array([s.label for s in test])
    rows = []
    for source in sources:
        bank = np.stack([store.features(source, "gap", s) for s in train])
        queries = np.stack([store.features(source, "gap", s) for s in test])
        result = knn_classify(bank, train_labels, queries, test_labels, k=k, progress=progress)
        rows.append({"method": source.name, "t": source.t, "top1": result.top1, "top5": result.top5,
                     "images": len(test)})
    main = rows[0]
    doc = {"task": "knn", "method": main["method"], "tap": sources[0].tap, "top1": main["top1"], "top5": main["top5"],
           "k": k, "images": len(test), "sweep": [r for r in rows[1:] if r["t"] is not None],
           "protocol": {"pooling": "global average over the tap's grid", "similarity": "cosine (cleandift_rt.match)",
                        "vote": "one vote per neighbour; ties to the class whose best neighbour is nearer"},
           "data": {**dataset.describe(), "train_used": len(train), "test_used": len(test), "skipped": skipped_json(skips)},
           "classes": list(dataset.classes),
           "cache": {"dir": str(store.root), "dtype": store.dtype, "computed": dict(store.computed),
                     "reused": dict(store.reused)},
           **(extra or {})}
    return write_results(doc, out, rows, "knn")
