"""Results of several methods at once (recipes, ablations, the DIFT baseline): JSON, CSV, a table with
every method side by side.

The document keeps ``evaluation.report``'s shape for its first method (top-level keys) and its
``baseline``, and adds ``methods``: one block per method, in the order run, each with the same
keys as the top level. The CSV has the rows of every block.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..checkpoint import atomic_write_bytes
from ..evaluation.report import csv_rows, format_methods, method_block, results_document
from ..evaluation.runner import EvalRun


def methods_document(runs: list[EvalRun], baseline: EvalRun | None, protocol: dict, alphas, inclusive: bool) -> dict:
    doc = results_document(runs[0], baseline, protocol, alphas, inclusive)
    doc["methods"] = [method_block(r, alphas, inclusive) for r in runs + ([baseline] if baseline else [])]
    return doc


def format_methods_table(doc: dict) -> str:
    """Every method of ``doc["methods"]`` side by side (``evaluation.report.format_methods``)."""
    return format_methods(doc, doc["methods"])


def write_methods_results(doc: dict, json_path: str | Path, csv_path: str | Path | None = None) -> None:
    payload = json.dumps(doc, indent=2).encode()
    atomic_write_bytes(Path(json_path), lambda tmp: Path(tmp).write_bytes(payload))
    if csv_path is not None:
        rows = [row for block in doc["methods"] for row in csv_rows(block)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)
        data = buf.getvalue().encode()
        atomic_write_bytes(Path(csv_path), lambda tmp: Path(tmp).write_bytes(data))
