"""Evaluation: keypoint transfer on SPair-71k, PF-Pascal / PF-Willow and ``pairs.json``, PCK in every convention.

Owns the dataset loaders (annotations checked, bad files counted and skipped), the transfer
protocol of docs/method.md, evaluation protocol (upsample, cosine argmax through ``kernels.match``), cached and
resumable runs over any feature source (an Engine, the DIFT baseline), and the JSON / CSV / table
reports. It may import ``runtime``, ``kernels``, ``features``, ``models``, ``runs`` (the skip log)
and the top-level shared modules; its commands are in ``cli/evaluate.py``.
"""

from ..runs.skips import SkipLog
from .pairs import Pair, load_pairs, load_pairs_json, load_pf_csv
from .pck import ALPHAS, AVERAGES, KINDS, PairResult, alpha_key, correct, summarize
from .report import format_table, results_document, write_results
from .runner import DEFAULT_PROMPT, DiftFeatures, EngineFeatures, EvalRun, FeatureCache, evaluate
from .spair import load_spair
from .transfer import transfer_points

__all__ = ["Pair", "SkipLog", "load_pairs", "load_pairs_json", "load_pf_csv", "load_spair", "ALPHAS", "AVERAGES",
           "KINDS", "PairResult", "alpha_key", "correct", "summarize", "format_table", "results_document",
           "write_results", "DEFAULT_PROMPT", "DiftFeatures", "EngineFeatures", "EvalRun", "FeatureCache", "evaluate",
           "transfer_points"]
