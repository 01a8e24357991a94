"""``cleandift-rt eval-spair`` and ``cleandift-rt eval-pairs``: PCK of an engine (and the DIFT baseline),
by today's nearest neighbour or the zero-shot fusion recipes (docs/fusion.md), side by side.

Each method to run is built by one function from the parsed arguments (``_method_sources``); a new
kind of method is one more builder there, the run loop and the report stay as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (UserError, add_engine_args, add_output_args, add_run_args, best_device, engine_identity,
                     open_engine, positive_int)

FUSED_MATCHING = ("tale / tlfr: the keypoint's descriptor-grid cell, cosine argmax over the target grid "
                  "(tlfr: 11 x 11 window soft-argmax, adaptive flip), cell centres mapped back to the image")


def _text_model(args, engine, prompts):
    """The base model whose text encoder embeds the prompts (and whose U-Net runs DIFT), or None.

    The PyTorch backend already holds it (an SD 2.1 base is 5 GB: never load it twice).
    """
    from ..models import load_base

    if not args.base or not (args.baseline or any(prompts)):
        return None
    return getattr(getattr(engine.backend, "ref", None), "base", None) or load_base(args.base)


def _nn_source(args, engine, text_model, prompt):
    from ..evaluation.runner import EngineFeatures

    return EngineFeatures(engine, args.tap, key=engine_identity(args, engine), prompt=prompt or None,
                          text_model=text_model)


def _fused_source(args, engine, text_model, prompt, name, dino):
    from ..checkpoint import file_identity
    from ..fusion.evaluate import FusedSource
    from ..fusion.pipeline import Fusion, prompt_embedder
    from .fusion_options import recipe_from_args

    recipe = recipe_from_args(name, args)
    fusion = Fusion(recipe, engine, dino, prompt_embedder(prompt, text_model))
    return FusedSource(fusion, sd_key=engine_identity(args, engine),
                       dino_key=file_identity(args.dino) if dino is not None else None,
                       prompt=prompt if (prompt and text_model is not None) else "<baked into the model>")


def _gate_sources(args):
    """A trained GATE model (``train-gate --out``) as the method, and the DIFT baseline on its base model."""
    from ..checkpoint import file_identity, short_hash
    from ..evaluation.runner import DiftFeatures
    from .fusion_options import resolve_prompt
    from ..gate.source import GateFeatures

    if args.engine or list(args.recipe) != ["nn"]:
        raise UserError("--gate DIR runs on its own (its recipes name their base model): drop --engine / --recipe")
    source = GateFeatures.from_dir(args.gate, base=args.base, device=best_device(args.device))
    baseline = None
    if args.baseline:
        from ..features.extractor import DiftExtractor

        base = source.extractor.base
        dift = DiftExtractor(base, t=args.t, ensemble=args.ensemble, seed=args.seed, size=source.extractor.size,
                             device=best_device(args.device))
        baseline = DiftFeatures(dift, args.tap, key=short_hash(file_identity(base.source)),
                                prompt=resolve_prompt(args, False) or None)
    return [source], baseline


def _method_sources(args):
    """(sources in the order of --recipe, DIFT baseline source or None) from the parsed arguments."""
    from ..checkpoint import file_identity, short_hash
    from ..evaluation.runner import DiftFeatures
    from .fusion_options import NEAREST_NEIGHBOUR, check_recipe_args, open_dino, resolve_prompt, wants_fusion

    if args.gate:
        return _gate_sources(args)
    if args.aggregator:
        if list(args.recipe) != ["nn"] or args.baseline:
            raise UserError("--aggregator evaluates the aggregator's 'hyper' descriptors: drop --recipe / --baseline")
        from .hyper import hyper_source

        return [hyper_source(args)], None
    if not args.engine:
        raise UserError("pass --engine FILE (or --gate DIR, a model trained by cleandift-rt train-gate)")
    check_recipe_args(args, args.recipe)
    engine = open_engine(args)
    prompts = {name: resolve_prompt(args, name != NEAREST_NEIGHBOUR) for name in args.recipe}
    text_model = _text_model(args, engine, prompts.values())
    if args.baseline and text_model is None:
        raise UserError("--baseline dift runs the base model's U-Net: pass --base DIR (the SD folder the student "
                        "was trained from)")
    if text_model is None and any(prompts.values()):
        print(f"note: no --base given, so no text encoder for the prompt(s) {sorted(set(filter(None, prompts.values())))}: "
              f"using the prompt baked into the engine ({engine.info.get('prompt', '')!r}). Pass --base DIR for the "
              "protocol's prompt.")
        prompts = {name: "" for name in prompts}
    dino = open_dino(args) if wants_fusion(args.recipe) else None
    if wants_fusion(args.recipe):
        _note_engine_size(args, engine)
    sources = [_nn_source(args, engine, text_model, prompts[name]) if name == NEAREST_NEIGHBOUR
               else _fused_source(args, engine, text_model, prompts[name], name, dino)
               for name in dict.fromkeys(args.recipe)]
    baseline = None
    if args.baseline:
        from ..features.extractor import DiftExtractor

        dift = DiftExtractor(text_model, t=args.t, ensemble=args.ensemble, seed=args.seed, size=engine.size,
                             device=best_device(args.device))
        prompt = prompts[NEAREST_NEIGHBOUR] if NEAREST_NEIGHBOUR in prompts else resolve_prompt(args, False)
        baseline = DiftFeatures(dift, args.tap, key=short_hash(file_identity(args.base)), prompt=prompt or None)
    return sources, baseline


def _note_engine_size(args, engine) -> None:
    side = args.sd_crop or args.sd_size
    if tuple(engine.size) != (side, side):
        print(f"note: the engine runs at {engine.size[0]}x{engine.size[1]}; the SD {'crops' if args.sd_crop else 'canvas'} "
              f"({side} px) are resized to it and its maps back to the {side} px grid. For the recipe's own resolution "
              f"pass --size {side} {side} (PyTorch backend or a dynamic-size export).")


def _run_eval(args, pairs, skips, benchmark: str, dataset_key: str) -> int:
    from ..evaluation.pck import CONVENTIONS
    from ..evaluation.report import format_table, results_document, write_results
    from ..checkpoint import short_hash
    from ..evaluation.runner import evaluate
    from ..runs.skips import SkipLog
    from ..fusion.evaluate import FusedSource, evaluate_fused
    from .fusion_options import wants_fusion
    from ..fusion.report import format_methods_table, methods_document, write_methods_results

    if not pairs:
        raise UserError(f"no usable pairs in {benchmark}" + ("; " + "; ".join(skips.lines()) if skips.lines() else ""))
    out = Path(args.out)
    if out.suffix != ".json":
        raise UserError(f"--out {out}: results are written as JSON (e.g. results.json); the CSV goes beside it")
    cache = Path(args.cache) if args.cache else out.parent / f"{out.stem}.cache"
    sources, baseline = _method_sources(args)
    inclusive = CONVENTIONS[args.threshold]
    runs = []
    for source in sources + ([baseline] if baseline else []):
        fused = isinstance(source, FusedSource)
        name = (f"journal-{source.key}-{short_hash(dataset_key)}.jsonl" if fused
                else f"journal-{source.key}-{args.transfer}-{dataset_key}.jsonl")
        journal = cache / name
        if args.restart and journal.exists():
            journal.unlink()
        run_skips = SkipLog("pair")
        run_skips.merge(skips)
        if fused:
            runs.append(evaluate_fused(pairs, source, cache_dir=cache / "fusion", journal=journal, skips=run_skips,
                                       progress=not args.no_progress))
        else:
            runs.append(evaluate(pairs, source, cache_dir=cache / "features", journal=journal, skips=run_skips,
                                 progress=not args.no_progress, method=args.transfer))
    protocol = {"benchmark": benchmark, "tap": args.tap, "prompt": args.prompt, "threshold": args.threshold,
                "alphas": args.alphas, "engine": str(args.engine or ""), "gate": args.gate, "aggregator": args.aggregator,
                "base": args.base,
                "upsampling": "bilinear to the original image size (align_corners=False)",
                "matching": "cosine argmax over all target pixels", "transfer": args.transfer, "cache": str(cache),
                "dataset_key": short_hash(dataset_key), "recipes": list(dict.fromkeys(args.recipe))}
    if wants_fusion(args.recipe):
        protocol.update(matching=f"nn: {protocol['matching']}; {FUSED_MATCHING}", dino=args.dino)
    csv_path = Path(args.csv) if args.csv else out.with_suffix(".csv")
    main_runs = runs[:len(sources)]
    base_run = runs[len(sources)] if baseline else None
    if len(main_runs) == 1 and not wants_fusion(args.recipe):  # today's document, unchanged
        doc = results_document(main_runs[0], base_run, protocol, args.alphas, inclusive)
        write_results(doc, out, csv_path)
        print(format_table(doc))
    else:
        doc = methods_document(main_runs, base_run, protocol, args.alphas, inclusive)
        write_methods_results(doc, out, csv_path)
        print(format_methods_table(doc))
    for run in runs:
        if run.images_extracted:
            print(f"{run.source['method']}: {run.extract_seconds / run.images_extracted:.2f} s per image extracted")
        if run.results:
            print(f"{run.source['method']}: {run.seconds / len(run.results):.2f} s per pair (extraction included)")
    print(f"results: {out} and {csv_path}; features cached in {cache} (rerun to resume)")
    return 0


def cmd_eval_spair(args) -> int:
    from ..evaluation.spair import load_spair

    pairs, skips = load_spair(args.root, args.split, categories=args.categories, limit=args.limit)
    return _run_eval(args, pairs, skips, f"SPair-71k {args.split}",
                     f"spair-{Path(args.root).resolve()}-{args.split}")


def cmd_eval_pairs(args) -> int:
    from ..evaluation.pairs import load_pairs
    from ..checkpoint import file_identity

    pairs, skips = load_pairs(args.pairs, args.images)
    if args.limit:
        pairs = pairs[: args.limit]
    return _run_eval(args, pairs, skips, Path(args.pairs).name, f"pairs-{file_identity(args.pairs)}")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from ..evaluation.pck import ALPHAS, CONVENTIONS
    from ..evaluation.runner import DEFAULT_PROMPT
    from .fusion_options import add_recipe_args
    from ..fusion.recipes import FUSION_PROMPT

    add_engine_args(p, engine_required=False)
    p.add_argument("--aggregator", metavar="FILE", help="evaluate a Diffusion Hyperfeatures aggregator.safetensors "
                   "(its 'hyper' descriptors; --engine for cleandift sources, --base for inversion ones; "
                   "docs/hyperfeatures.md)")
    p.add_argument("--gate", metavar="DIR", help="evaluate a trained GATE model (cleandift-rt train-gate --out DIR) "
                   "instead of --engine; --base overrides the base model it recorded (docs/gate.md)")
    g = add_output_args(p, "results.json", "results JSON (a CSV is written beside it)")
    g.add_argument("--csv", metavar="FILE", help="CSV path (default: --out with .csv)")
    p.add_argument("--prompt", default=None,
                   help=f"prompt template, {{category}} filled in (default {DEFAULT_PROMPT!r} for nn, {FUSION_PROMPT!r} "
                   "for tale / tlfr; needs --base); '' = the prompt baked into the engine")
    p.add_argument("--baseline", choices=["dift"], help="also run the noisy DIFT baseline (base U-Net, needs --base)")
    p.add_argument("--t", type=int, default=261, help="DIFT timestep (default 261)")
    p.add_argument("--ensemble", type=positive_int, default=8, help="DIFT noise samples averaged (default 8)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="PCK thresholds (default 0.05 0.1 0.15)")
    p.add_argument("--threshold", choices=list(CONVENTIONS), default="dift",
                   help="'dift': correct if distance <= alpha*size (default); 'tlfr': strictly <")
    p.add_argument("--transfer", choices=["matcher", "analytic"], default="matcher",
                   help="nn only: 'matcher': upsampled target searched by cleandift_rt.match (default); 'analytic': "
                   "the same cosines in closed form, no upsampled map (float64, much faster on a CPU)")
    p.add_argument("--limit", type=positive_int, help="at most N pairs (per category for SPair): a quick look")
    g = add_run_args(p, seed="DIFT noise seed (default 0)",
                     cache="feature cache and resume journal (default: OUT_STEM.cache beside --out)")
    g.add_argument("--restart", action="store_true", help="ignore the journal of an earlier run (features stay cached)")
    add_recipe_args(p, several=True)


def register(sub) -> None:
    """Add the 'eval-spair', 'eval-pairs' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("eval-spair", formatter_class=fmt, help="PCK on SPair-71k (CleanDIFT, fusion recipes, DIFT)",
                       description="PCK@0.05/0.1/0.15 (bbox and img; per point and per image; per category) on "
                       "SPair-71k as in DIFT: images resized to the model size, features upsampled bilinearly to "
                       "the original size, cosine argmax over all target pixels. --recipe tale / tlfr fuse the taps "
                       "us8, us5, us2 with DINOv2 (docs/fusion.md); several recipes and the DIFT "
                       "baseline run side by side. Features are cached per image; an interrupted run resumes.\n\n"
                       "examples:\n"
                       "  cleandift-rt eval-spair --root SPair-71k --engine sd21.onnx --base sd21/ --out results.json "
                       "--baseline dift --t 261 --ensemble 8\n"
                       "  cleandift-rt eval-spair --root SPair-71k --engine student_unet.safetensors --base sd21/ "
                       "--size 512 512 --recipe nn tale tlfr --dino dinov2-base/ --threshold tlfr --out sota.json\n"
                       "  ... --recipe tlfr --no-flip   (ablations: --no-flip, --no-refine, --no-dino)")
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
