"""``cleandift-rt probe-depth | probe-seg | knn-classify``: the paper's downstream probes and their t sweeps."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError, add_engine_args, add_output_args, add_run_args, best_device, open_engine, positive_int

DEFAULT_TIMESTEPS = list(range(0, 1000, 100))


def _check_args(args) -> None:
    if args.baseline and not args.base:
        raise UserError("--baseline dift runs the base model's U-Net at each t: pass --base DIR (the SD model the "
                        "student was trained from)")
    if args.timesteps is not None and not (args.baseline or args.heads):
        raise UserError("--timesteps sweeps the noisy baseline or the projected features: add --baseline dift "
                        "and/or --heads FULL_FILE")
    if args.timesteps is not None and any(not 0 <= t <= 999 for t in args.timesteps):
        raise UserError(f"--timesteps must lie in 0..999, got {args.timesteps}")
    for flag in ("heads", "probe"):
        value = getattr(args, flag, None)
        if value and not Path(value).is_file():
            raise UserError(f"--{flag} {value} does not exist")
    if getattr(args, "pictures", 0) < 0:
        raise UserError(f"--pictures must be 0 or more, got {args.pictures}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; results go into a folder (results.json, sweep.csv, pictures)")


def _sources(args):
    """The main Engine source, then the baseline and projected sources of the sweep; nothing is opened
    until a feature is missing from the cache."""
    from ..checkpoint import file_identity, short_hash
    from ..probes.cache import DiftSource, EngineSource, Lazy, ProjectedSource

    size = tuple(args.size) if args.size else None
    precision = getattr(args, "precision", None)  # bf16 / fp16 features are other features
    engine_key = short_hash("engine", file_identity(args.engine), size,
                            file_identity(args.base) if args.base else None,
                            *([precision] if precision not in (None, "fp32") else []))
    engine = Lazy(lambda: open_engine(args))
    main = EngineSource(engine, args.tap, key=short_hash(engine_key, args.tap))
    sources = [main]
    timesteps = list(dict.fromkeys(args.timesteps if args.timesteps is not None else DEFAULT_TIMESTEPS))
    if args.heads:
        from ..models.heads import ProjectionHeads

        heads = Lazy(lambda: ProjectionHeads.from_release(args.heads))
        heads_key = file_identity(args.heads)
        sources += [ProjectedSource(main, heads, short_hash("projected", main.key, heads_key, t), t) for t in timesteps]
    if args.baseline:
        from ..features.extractor import DiftExtractor

        def base_model():
            from ..models import load_base

            ref = getattr(engine.get().backend, "ref", None)  # the PyTorch backend already holds it
            return getattr(ref, "base", None) or load_base(args.base)

        base = Lazy(base_model)
        base_key = file_identity(args.base)
        for t in timesteps:
            dift = Lazy(lambda t=t: DiftExtractor(base.get(), t=t, ensemble=args.ensemble, seed=args.dift_seed,
                                                  size=engine.get().size, device=best_device(args.device)))
            key = short_hash("dift", base_key, t, args.ensemble, args.dift_seed, size or engine_key, args.tap)
            sources.append(DiftSource(dift, args.tap, key, t))
    return sources


def _store(args):
    from ..probes.cache import FeatureStore

    return FeatureStore(Path(args.cache) if args.cache else Path(args.out) / "cache", args.cache_dtype)


def _limit(dataset, limit):
    if limit:
        dataset.train, dataset.test = dataset.train[:limit], dataset.test[:limit]
    return dataset


def _config(args):
    from ..probes.training import ProbeTrainConfig

    return ProbeTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                            val_fraction=args.val_fraction, patience=args.patience, seed=args.seed)


def _report(doc: dict, metrics: tuple[str, ...], out: str) -> None:
    def fmt(row):
        return "  ".join(f"{m} {row[m]:.4f}" if isinstance(row.get(m), float) else f"{m} -" for m in metrics)

    print(f"{doc['task']} ({doc['method']}, tap {doc['tap']}): {fmt(doc)}")
    for row in doc.get("sweep", []):
        print(f"  {row['method']:<20} t={row['t']:<4} {fmt(row)}")
    data = doc["data"]
    print(f"images: {data['train_used']} train, {data['test_used']} test; skipped {data['skipped']['total']}"
          + "".join(f"\n  {reason}: {n}" for reason, n in data["skipped"]["by_reason"].items()))
    cache = doc["cache"]
    print(f"features computed this run: {sum(cache['computed'].values())}, read from the cache: "
          f"{sum(cache['reused'].values())} ({cache['dir']})")
    outs = doc.get("outputs", {})
    written = [str(Path(out) / "results.json")] + [outs[k] for k in ("csv", "plot") if k in outs]
    print("wrote " + ", ".join(written + outs.get("pictures", [])))


def cmd_probe_depth(args) -> int:
    from ..probes.data import load_depth_data
    from ..probes.depth import DepthProtocol
    from ..probes.run import run_dense

    _check_args(args)
    dataset = _limit(load_depth_data(args.data), args.limit)
    nyu = dataset.kind == "nyu"
    max_depth = args.max_depth if args.max_depth is not None else (10.0 if nyu else None)
    if max_depth is not None and not max_depth > args.min_depth:
        raise UserError(f"--max-depth {max_depth} must exceed --min-depth {args.min_depth}")
    protocol = DepthProtocol(args.min_depth, max_depth, eigen_crop=nyu, strict_max=nyu)
    doc = run_dense("depth", dataset, _sources(args), _store(args), args.out, config=_config(args), protocol=protocol,
                    probe_file=args.probe, pictures=args.pictures, progress=not args.no_progress,
                    extra={"engine": str(args.engine)})
    _report(doc, ("rmse", "abs_rel", "delta1"), args.out)
    return 0


def cmd_probe_seg(args) -> int:
    from ..probes.data import load_voc
    from ..probes.run import run_dense

    _check_args(args)
    dataset = _limit(load_voc(args.data, args.train_split, args.val_split, args.num_classes), args.limit)
    doc = run_dense("segmentation", dataset, _sources(args), _store(args), args.out, config=_config(args),
                    num_classes=args.num_classes, probe_file=args.probe, pictures=args.pictures,
                    progress=not args.no_progress, extra={"engine": str(args.engine)})
    _report(doc, ("miou", "pixel_accuracy"), args.out)
    return 0


def cmd_knn(args) -> int:
    from ..probes.data import load_image_folders
    from ..probes.run import run_knn

    _check_args(args)
    dataset = _limit(load_image_folders(args.train, args.val), args.limit)
    doc = run_knn(dataset, _sources(args), _store(args), args.out, k=args.k, progress=not args.no_progress,
                  extra={"engine": str(args.engine)})
    _report(doc, ("top1", "top5"), args.out)
    return 0


def _common(p: argparse.ArgumentParser, tap: str, trains: bool = True) -> None:
    add_engine_args(p, tap=tap, tap_why="the paper's choice")
    add_output_args(p, "DIR", "results folder: results.json, sweep.csv, pictures")
    g = p.add_argument_group("timestep sweep (the paper's figures)")
    g.add_argument("--baseline", choices=["dift"], help="also probe the noisy baseline at each --timesteps (needs --base)")
    g.add_argument("--heads", metavar="FULL_FILE", help="also probe CleanDIFT's head-projected features at each "
                   "--timesteps (a _full release file)")
    g.add_argument("--timesteps", type=int, nargs="+", metavar="T",
                   help="timesteps of the sweep (default 0 100 ... 900)")
    g.add_argument("--ensemble", type=positive_int, default=8, help="noise samples averaged by the baseline (default 8)")
    g.add_argument("--dift-seed", type=int, default=0, help="baseline noise seed (default 0)")
    g = add_run_args(p, seed="seed of initialisation, split and order (default 0)" if trains else None,
                     cache="feature cache (default OUT/cache); share it between runs")
    g.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                   help="how features are stored (default float16: half the disk; float32 when values exceed it)")
    g.add_argument("--limit", type=positive_int, help="at most N images per split: a quick look")
    if trains:
        g = p.add_argument_group("probe training (AdamW, warm-up + cosine, early stopping; docs/probes.md)")
        g.add_argument("--probe", metavar="FILE", help="evaluate this saved probe instead of training (e.g. one "
                       "trained on noisy features, applied to CleanDIFT's)")
        g.add_argument("--epochs", type=positive_int, default=20, help="at most this many epochs (default 20)")
        g.add_argument("--batch-size", type=positive_int, default=8, help="images per step (default 8)")
        g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
        g.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 0.01)")
        g.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of the training images held out for early stopping (default 0.1)")
        g.add_argument("--patience", type=positive_int, default=4, help="epochs without improvement before stopping")
        g.add_argument("--pictures", type=int, default=4, help="test images drawn in the example picture (default 4)")


def register(sub) -> None:
    """Add the 'probe-depth', 'probe-seg' and 'knn-classify' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("probe-depth", formatter_class=fmt, help="depth linear probe (NYUv2 or a folder tree)",
                       description="Monocular depth from a linear probe over 256 depth bins on the tap's grid "
                       "(CleanDIFT section 4.3). --data: a folder with nyu_depth_v2_labeled.mat + splits.mat (standard "
                       "795/654 split, Eigen crop, 10 m cap) or ROOT/{train,test}/rgb/NAME.png|jpg with "
                       "ROOT/{train,test}/depth/NAME.png (16-bit mm) or NAME.npy (m). Features are cached per image; "
                       "a rerun reuses them and the trained probes.\n\nexamples:\n"
                       "  cleandift-rt probe-depth --data nyuv2/ --engine sd21.onnx --out depth/\n"
                       "  cleandift-rt probe-depth --data nyuv2/ --engine sd21.onnx --base sd21/ --out depth/ "
                       "--baseline dift --heads student_full.safetensors --timesteps 99 299 499 699 899\n"
                       "  cleandift-rt probe-depth --data nyuv2/ --engine sd21.onnx --out transfer/ "
                       "--probe depth/probes/dift-t299.safetensors")
    p.add_argument("--data", required=True, metavar="ROOT", help="NYUv2 folder (or the .mat file) or a folder tree")
    p.add_argument("--max-depth", type=float, help="depth cap in metres (NYUv2: 10; folders: the training data's maximum)")
    p.add_argument("--min-depth", type=float, default=1e-3, help="smallest valid depth in metres (default 0.001)")
    _common(p, "us6")
    p.set_defaults(func=cmd_probe_depth)

    p = sub.add_parser("probe-seg", formatter_class=fmt, help="semantic segmentation linear probe (PASCAL VOC 2012)",
                       description="Semantic segmentation from a linear per-pixel probe on the tap's grid, logits "
                       "upsampled nearest to the label size, void 255 ignored, mIoU over the classes present "
                       "(CleanDIFT section 4.4). --data: VOC2012 (JPEGImages/, SegmentationClass/, "
                       "ImageSets/Segmentation/train.txt, val.txt).\n\nexamples:\n"
                       "  cleandift-rt probe-seg --data VOCdevkit/VOC2012 --engine sd21.onnx --out seg/\n"
                       "  cleandift-rt probe-seg --data VOCdevkit/VOC2012 --engine sd21.onnx --base sd21/ --out seg/ "
                       "--baseline dift --timesteps 0 100 200 300 500")
    p.add_argument("--data", required=True, metavar="VOC_ROOT", help="the VOC2012 folder (or a VOCdevkit holding it)")
    p.add_argument("--num-classes", type=positive_int, default=21, help="classes incl. background (default 21)")
    p.add_argument("--train-split", default="train", help="ImageSets/Segmentation list to train on (default train)")
    p.add_argument("--val-split", default="val", help="list to evaluate on (default val)")
    _common(p, "us6")
    p.set_defaults(func=cmd_probe_seg)

    p = sub.add_parser("knn-classify", formatter_class=fmt, help="kNN classification of pooled features (ImageFolder)",
                       description="k-nearest-neighbour classification (cosine, majority vote, k = 10) of globally "
                       "average-pooled features (CleanDIFT section 4.5); neighbours from cleandift_rt.match. "
                       "--train / --val: ImageFolder trees (CLASS/IMAGE).\n\nexamples:\n"
                       "  cleandift-rt knn-classify --train imagenet/train --val imagenet/val --engine sd15.onnx "
                       "--out knn/\n"
                       "  cleandift-rt knn-classify --train imagenet/train --val imagenet/val --engine sd15.onnx "
                       "--base sd15/ --out knn/ --baseline dift --timesteps 0 100 200 400")
    p.add_argument("--train", required=True, metavar="DIR", help="training images, DIR/CLASS/IMAGE")
    p.add_argument("--val", required=True, metavar="DIR", help="query images, DIR/CLASS/IMAGE")
    p.add_argument("--k", type=positive_int, default=10, help="neighbours per query (default 10)")
    _common(p, "mid", trains=False)
    p.set_defaults(func=cmd_knn)
