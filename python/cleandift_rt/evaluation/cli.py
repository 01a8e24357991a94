"""``cleandift-rt eval-spair`` and ``cleandift-rt eval-pairs``: PCK of an engine (and the DIFT baseline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli.common import UserError, add_engine_args, engine_identity, open_engine, positive_int


def _prepare_methods(args):
    """(main feature source, baseline source or None, engine) from the parsed arguments."""
    from ..evaluation.runner import DiftFeatures, EngineFeatures, file_identity, short_hash

    from ..models import load_base

    engine = open_engine(args)
    prompt = args.prompt or None
    # One base model serves as the text encoder for the prompts and as the DIFT baseline's U-Net;
    # the PyTorch backend already holds it (an SD 2.1 base is 5 GB: never load it twice).
    base_model = None
    if args.base and (args.baseline or prompt):
        base_model = getattr(getattr(engine.backend, "ref", None), "base", None) or load_base(args.base)
    if args.baseline and base_model is None:
        raise UserError("--baseline dift runs the base model's U-Net: pass --base DIR (the SD folder the student "
                        "was trained from)")
    if prompt and base_model is None:
        print(f"note: no --base given, so no text encoder for the prompt {prompt!r}: using the prompt baked into "
              f"the engine ({engine.info.get('prompt', '')!r}). Pass --base DIR for SPEC section 6's prompt.")
        prompt = None
    main = EngineFeatures(engine, args.tap, key=engine_identity(args, engine), prompt=prompt, text_model=base_model)
    baseline = None
    if args.baseline:
        from ..features.extractor import DiftExtractor

        dift = DiftExtractor(base_model, t=args.t, ensemble=args.ensemble, seed=args.seed, size=engine.size,
                             device=args.device or "cpu")
        baseline = DiftFeatures(dift, args.tap, key=short_hash(file_identity(args.base)), prompt=prompt)
    return main, baseline


def _run_eval(args, pairs, skips, benchmark: str, dataset_key: str) -> int:
    from ..evaluation.pck import CONVENTIONS
    from ..evaluation.report import format_table, results_document, write_results
    from ..evaluation.runner import evaluate, short_hash
    from ..evaluation.pairs import SkipLog

    if not pairs:
        raise UserError(f"no usable pairs in {benchmark}" + ("; " + "; ".join(skips.lines()) if skips.lines() else ""))
    out = Path(args.out)
    if out.suffix != ".json":
        raise UserError(f"--out {out}: results are written as JSON (e.g. results.json); the CSV goes beside it")
    cache = Path(args.cache) if args.cache else out.parent / f"{out.stem}.cache"
    main, baseline = _prepare_methods(args)
    inclusive = CONVENTIONS[args.threshold]
    runs = []
    for source in [main] + ([baseline] if baseline else []):
        journal = cache / f"journal-{source.key}-{args.transfer}-{dataset_key}.jsonl"
        if args.restart and journal.exists():
            journal.unlink()
        run_skips = SkipLog()
        run_skips.merge(skips)
        runs.append(evaluate(pairs, source, cache_dir=cache / "features", journal=journal, skips=run_skips,
                             progress=not args.no_progress, method=args.transfer))
    protocol = {"benchmark": benchmark, "tap": args.tap, "prompt": args.prompt, "threshold": args.threshold,
                "alphas": args.alphas, "engine": str(args.engine), "base": args.base,
                "upsampling": "bilinear to the original image size (align_corners=False)",
                "matching": "cosine argmax over all target pixels", "transfer": args.transfer, "cache": str(cache),
                "dataset_key": short_hash(dataset_key)}
    doc = results_document(runs[0], runs[1] if len(runs) > 1 else None, protocol, args.alphas, inclusive)
    csv_path = Path(args.csv) if args.csv else out.with_suffix(".csv")
    write_results(doc, out, csv_path)
    print(format_table(doc))
    for run in runs:
        if run.images_extracted:
            print(f"{run.source['method']}: {run.extract_seconds / run.images_extracted:.2f} s per image extracted")
    print(f"results: {out} and {csv_path}; features cached in {cache} (rerun to resume)")
    return 0


def cmd_eval_spair(args) -> int:
    from ..evaluation.spair import load_spair

    pairs, skips = load_spair(args.root, args.split, categories=args.categories, limit=args.limit)
    return _run_eval(args, pairs, skips, f"SPair-71k {args.split}",
                     f"spair-{Path(args.root).resolve()}-{args.split}")


def cmd_eval_pairs(args) -> int:
    from ..evaluation.pairs import load_pairs
    from ..evaluation.runner import file_identity

    pairs, skips = load_pairs(args.pairs, args.images)
    if args.limit:
        pairs = pairs[: args.limit]
    return _run_eval(args, pairs, skips, Path(args.pairs).name, f"pairs-{file_identity(args.pairs)}")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from ..evaluation.pck import ALPHAS, CONVENTIONS
    from ..evaluation.runner import DEFAULT_PROMPT

    add_engine_args(p)
    p.add_argument("--out", required=True, metavar="results.json", help="results JSON (a CSV is written beside it)")
    p.add_argument("--csv", metavar="FILE", help="CSV path (default: --out with .csv)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help=f"prompt template, {{category}} filled in (default {DEFAULT_PROMPT!r}, needs --base); "
                   "'' = the prompt baked into the engine")
    p.add_argument("--baseline", choices=["dift"], help="also run the noisy DIFT baseline (base U-Net, needs --base)")
    p.add_argument("--t", type=int, default=261, help="DIFT timestep (default 261)")
    p.add_argument("--ensemble", type=positive_int, default=8, help="DIFT noise samples averaged (default 8)")
    p.add_argument("--seed", type=int, default=0, help="DIFT noise seed (default 0)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="PCK thresholds (default 0.05 0.1 0.15)")
    p.add_argument("--threshold", choices=list(CONVENTIONS), default="dift",
                   help="'dift': correct if distance <= alpha*size (default); 'tlfr': strictly <")
    p.add_argument("--transfer", choices=["matcher", "analytic"], default="matcher",
                   help="'matcher': upsampled target searched by cleandift_rt.match (default); 'analytic': the same "
                   "cosines in closed form, no upsampled map (float64, much faster on a CPU)")
    p.add_argument("--limit", type=positive_int, help="at most N pairs (per category for SPair): a quick look")
    p.add_argument("--cache", metavar="DIR", help="feature cache and resume journal (default: OUT_STEM.cache beside --out)")
    p.add_argument("--restart", action="store_true", help="ignore the journal of an earlier run (features stay cached)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub) -> None:
    """Add the 'eval-spair', 'eval-pairs' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("eval-spair", formatter_class=fmt, help="PCK on SPair-71k (CleanDIFT and the DIFT baseline)",
                       description="PCK@0.05/0.1/0.15 (bbox and img; per point and per image; per category) on "
                       "SPair-71k as in DIFT: images resized to the model size, features upsampled bilinearly to "
                       "the original size, cosine argmax over all target pixels. Features are cached per image; "
                       "an interrupted run resumes.\n\nexample:\n"
                       "  cleandift-rt eval-spair --root SPair-71k --engine sd21.onnx --base sd21/ --out results.json "
                       "--baseline dift --t 261 --ensemble 8")
    p.add_argument("--root", required=True, metavar="DIR", help="SPair-71k folder (PairAnnotation/, JPEGImages/)")
    p.add_argument("--split", default="test", choices=["test", "val", "trn"])
    p.add_argument("--categories", nargs="+", metavar="CAT", help="only these categories")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval_spair)

    p = sub.add_parser("eval-pairs", formatter_class=fmt, help="PCK on PF-Pascal / PF-Willow CSVs or your pairs.json",
                       description="The same evaluation on PF-Pascal (test_pairs_pf_pascal.csv), PF-Willow "
                       "(test_pairs_pf.csv) or a pairs.json of your own (format: docs/evaluation.md).\n\nexample:\n"
                       "  cleandift-rt eval-pairs PF-dataset-PASCAL/test_pairs_pf_pascal.csv --engine sd21.onnx --out pf.json")
    p.add_argument("pairs", metavar="PAIRS", help="a .csv (PF-Pascal / PF-Willow) or a pairs.json")
    p.add_argument("--images", metavar="DIR", help="folder the image paths are relative to (default: next to PAIRS)")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval_pairs)
