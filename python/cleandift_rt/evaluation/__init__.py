"""Keypoint-transfer evaluation: SPair-71k, PF-Pascal / PF-Willow, ``pairs.json``; PCK in every convention."""

from .pairs import Pair, SkipLog, load_pairs, load_pairs_json, load_pf_csv
from .pck import ALPHAS, AVERAGES, KINDS, PairResult, alpha_key, correct, summarize
from .report import format_table, results_document, write_results
from .runner import DEFAULT_PROMPT, DiftFeatures, EngineFeatures, EvalRun, FeatureCache, evaluate
from .spair import load_spair
from .transfer import transfer_points

__all__ = ["Pair", "SkipLog", "load_pairs", "load_pairs_json", "load_pf_csv", "load_spair", "ALPHAS", "AVERAGES",
           "KINDS", "PairResult", "alpha_key", "correct", "summarize", "format_table", "results_document",
           "write_results", "DEFAULT_PROMPT", "DiftFeatures", "EngineFeatures", "EvalRun", "FeatureCache", "evaluate",
           "transfer_points"]
