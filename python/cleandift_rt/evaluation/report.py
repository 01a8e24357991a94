"""Results of an evaluation as JSON, CSV and a printed table (methods side by side).

``results.json``::

    {"benchmark": ..., "protocol": {...},
     "pck": {"bbox"|"img": {"0.05"|"0.1"|"0.15": {"point": %, "image": %}}},   # the main method
     "per_category": {cat: {"pck": {...same shape...}, "pairs": n, "keypoints": n}},
     "category_mean": {...same shape as pck...},
     "counts": {"pairs", "keypoints", "images_extracted", "images_cached", "resumed_pairs",
                "skipped": {"pairs": {reason: n}, "keypoints": {reason: n}, "examples": {...}}},
     "method": {...}, "seconds": s,
     "baseline": {...the same keys for the baseline...}}   # when one was run
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..checkpoint import atomic_write_bytes
from ..runs.skips import SkipLog
from .pck import AVERAGES, KINDS, alpha_key, summarize
from .runner import EvalRun


COLUMN = 21  # characters per method column of the table


def skipped_json(skips: SkipLog) -> dict:
    """The report's ``counts.skipped``: pairs and keypoints left out by reason, a few examples of each."""
    return {"pairs": dict(skips.pairs), "keypoints": dict(skips.keypoints),
            "examples": {reason: list(shown) for reason, shown in skips.examples.items()}}


def method_block(run: EvalRun, alphas, inclusive: bool) -> dict:
    block = summarize(run.results, alphas, inclusive)
    block["counts"].update(images_extracted=run.images_extracted, images_cached=run.images_cached,
                           resumed_pairs=run.resumed_pairs, skipped=skipped_json(run.skips))
    block["method"] = run.source
    block["seconds"] = round(run.seconds, 3)
    block["extract_seconds"] = round(run.extract_seconds, 3)
    return block


def results_document(main: EvalRun, baseline: EvalRun | None, protocol: dict, alphas, inclusive: bool) -> dict:
    doc = {"benchmark": protocol.get("benchmark", "pairs"), "protocol": dict(protocol, comparison="<=" if inclusive else "<",
                                                                         unit="percent")}
    doc.update(method_block(main, alphas, inclusive))
    if baseline is not None:
        doc["baseline"] = method_block(baseline, alphas, inclusive)
    return doc


def _methods(doc: dict) -> list[tuple[str, dict]]:
    out = [(doc["method"]["method"], doc)]
    if "baseline" in doc:
        out.append((doc["baseline"]["method"]["method"], doc["baseline"]))
    return out


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def format_table(doc: dict) -> str:
    """The main method and its baseline side by side (:func:`format_methods`)."""
    return format_methods(doc, [block for _, block in _methods(doc)])


def format_methods(doc: dict, blocks: list[dict]) -> str:
    """PCK per kind and alpha (per point / per image) with one column per method block, then PCK@0.1
    bbox per category, then each method's counts, flip decisions (fusion) and skips."""
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


def csv_rows(doc: dict) -> list[dict]:
    rows = []
    for name, m in _methods(doc):
        scopes = [("all", m["pck"], m["counts"]["pairs"], m["counts"]["keypoints"]),
                  ("category_mean", m["category_mean"], m["counts"]["pairs"], m["counts"]["keypoints"])]
        scopes += [(cat, c["pck"], c["pairs"], c["keypoints"]) for cat, c in m["per_category"].items()]
        for scope, table, n_pairs, n_kps in scopes:
            for kind in KINDS:
                for a, cell in table[kind].items():
                    for avg in AVERAGES:
                        rows.append({"method": name, "category": scope, "kind": kind, "alpha": a, "average": avg,
                                     "pck": "" if cell[avg] is None else f"{cell[avg]:.4f}", "pairs": n_pairs,
                                     "keypoints": n_kps})
    return rows


def write_results(doc: dict, json_path: str | Path, csv_path: str | Path | None = None) -> None:
    json_path = Path(json_path)
    payload = json.dumps(doc, indent=2).encode()
    atomic_write_bytes(json_path, lambda tmp: Path(tmp).write_bytes(payload))
    if csv_path is not None:
        buf = io.StringIO()
        rows = csv_rows(doc)
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)
        data = buf.getvalue().encode()
        atomic_write_bytes(csv_path, lambda tmp: Path(tmp).write_bytes(data))
