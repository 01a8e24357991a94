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
from ..evaluation.pck import KINDS, alpha_key
from ..evaluation.report import csv_rows, method_block, results_document
from ..evaluation.runner import EvalRun

COLUMN = 21


def methods_document(runs: list[EvalRun], baseline: EvalRun | None, protocol: dict, alphas, inclusive: bool) -> dict:
    doc = results_document(runs[0], baseline, protocol, alphas, inclusive)
    doc["methods"] = [method_block(r, alphas, inclusive) for r in runs + ([baseline] if baseline else [])]
    return doc


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def format_methods_table(doc: dict) -> str:
    """PCK per kind and alpha (per point / per image) with one column per method, then per category."""
    blocks = doc["methods"]
    names = [b["method"]["method"] for b in blocks]
    alphas = list(doc["pck"]["bbox"])
    proto = doc["protocol"]
    lines = [f"PCK (%) on {doc['benchmark']}: correct if distance {proto['comparison']} alpha * max(bbox w, h) "
             f"[bbox] or alpha * max(image W, H) [img]",
             "  per point = all keypoints pooled (DIFT / CleanDIFT tables); per image = mean of pair accuracies"]
    head = "kind  alpha " + "".join(f"| {n[:COLUMN - 2]:<{COLUMN - 2}}" for n in names)
    sub = " " * 12 + "".join(f"| {'point   image':<{COLUMN - 2}}" for _ in names)
    lines += [head, sub, "-" * len(sub)]
    for kind in KINDS:
        for a in alphas:
            row = f"{kind:<5} {a:<6}"
            for b in blocks:
                cell = b["pck"][kind][a]
                row += f"| {_fmt(cell['point'])}  {_fmt(cell['image'])}     "
            lines.append(row.rstrip())
    a_mid = alpha_key(0.1) if alpha_key(0.1) in alphas else alphas[0]
    cats = sorted(set().union(*(b["per_category"] for b in blocks)))
    if len(cats) > 1:
        lines += ["", f"per category, PCK@{a_mid} bbox (point / image), pairs:"]
        for cat in cats:
            row = f"  {cat[:14]:<14}"
            for b in blocks:
                c = b["per_category"].get(cat)
                if c is None:
                    row += "|     -         -        "
                    continue
                cell = c["pck"]["bbox"][a_mid]
                row += f"| {_fmt(cell['point'])}  {_fmt(cell['image'])}  {c['pairs']:>6} "
            lines.append(row)
        row = f"  {'category mean':<14}"
        for b in blocks:
            cell = b["category_mean"]["bbox"][a_mid]
            row += f"| {_fmt(cell['point'])}  {_fmt(cell['image'])}         "
        lines.append(row.rstrip())
    lines.append("")
    for name, b in zip(names, blocks):
        c = b["counts"]
        lines.append(f"{name}: {c['pairs']} pairs, {c['keypoints']} keypoints; {c['images_extracted']} images "
                     f"extracted, {c['images_cached']} from cache, {c['resumed_pairs']} pairs resumed; {b['seconds']:.1f} s")
        flips = b["method"].get("flip_decisions")
        if flips is not None:
            lines.append(f"  adaptive flip: {flips.get('flipped', 0)} pair(s) flipped, {flips.get('kept', 0)} kept, "
                         f"{flips.get('not applicable', 0)} without keypoint ids / left-right table")
        sk = c["skipped"]
        for reason, n in sk["pairs"].items():
            lines.append(f"  skipped {n} pair(s): {reason} (e.g. {', '.join(sk['examples'].get(reason, [])[:2])})")
        for reason, n in sk["keypoints"].items():
            lines.append(f"  dropped {n} keypoint(s): {reason}")
    return "\n".join(lines)


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
