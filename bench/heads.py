"""Projection-head benchmark: cleandift_rt.project (fused native head) vs the PyTorch head
``heads(tap, features, t)`` in eager fp32, same inputs, same run.

Reports time, GFLOP/s (3 layers x 6 D^2 per pixel), the fraction of this machine's fp32 sgemm
throughput (torch.mm 2048^3, timed round-robin with both heads), the ratio, peak extra memory, the
first call (weight packing included) and the parity error; JSON in bench/results/.

    python bench/heads.py --quick        # D = 320, 24 x 24 pixels, batch 1
    python bench/heads.py                # D = 1280, 48 x 48 pixels, batch 1 (the issue's target)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, sgemm_fn, sgemm_gflops, write_json  # noqa: E402

from cleandift_rt import project  # noqa: E402
from cleandift_rt.models.heads import HEAD_LAYERS, ProjectionHeads  # noqa: E402


def run(dim: int, size: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    heads = ProjectionHeads({"us6": dim}).eval()
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(batch, dim, size, size)
    flop = batch * size * size * HEAD_LAYERS * 6.0 * dim * dim

    t0 = time.perf_counter()
    project(x, 261, heads, "us6")              # packs the weights and caches cond(261)
    first = time.perf_counter() - t0
    with torch.no_grad():
        res = compare({"ours": lambda: project(x, 261, heads, "us6"), "torch": lambda: heads("us6", x, 261),
                       "sgemm": sgemm_fn()}, repeats)
    gemm = sgemm_gflops(res.pop("sgemm")[0])
    (ours_s, ours_mem, out), (torch_s, torch_mem, ref) = res["ours"], res["torch"]
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    row = {"D": dim, "pixels": size * size, "B": batch, "gflop": flop / 1e9, "sgemm_gflops": gemm,
           "ours_s": ours_s, "ours_first_call_s": first, "ours_gflops": flop / ours_s / 1e9,
           "ours_frac_sgemm": flop / ours_s / 1e9 / gemm, "ours_mem_mb": ours_mem,
           "torch_s": torch_s, "torch_gflops": flop / torch_s / 1e9, "torch_mem_mb": torch_mem,
           "speedup_vs_torch": torch_s / ours_s, "max_rel_error": err}
    print(f"sgemm 2048^3 (torch.mm, same round-robin): {gemm:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    print(f"D={dim} {size}x{size} B={batch}: ours {ours_s * 1e3:.1f} ms ({row['ours_gflops']:.1f} GFLOP/s, "
          f"{row['ours_frac_sgemm']:.2f} of sgemm, {ours_mem:.0f} MB; first call {first * 1e3:.0f} ms) | "
          f"torch eager fp32 {torch_s * 1e3:.1f} ms ({row['torch_gflops']:.1f} GFLOP/s, {torch_mem:.0f} MB) | "
          f"x{row['speedup_vs_torch']:.2f} | max rel error {err:.1e}")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="D = 320, 24 x 24, batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dim, size = (320, 24) if args.quick else (1280, 48)
    result = {"rows": [run(dim, size, 1, args.repeats)], "machine": machine(), "quick": args.quick}
    print(f"written {write_json('heads', result)}")


if __name__ == "__main__":
    main()
