"""Projection-head benchmark: cleandift_rt.project (fused native head) vs the PyTorch head
``heads(tap, features, t)`` in eager fp32, same inputs, same run; and the bf16 rows: ours bf16
(fp32 features with precision="bf16", and bf16 features) vs ours fp32 vs the PyTorch head under
CPU bf16 autocast vs torch's bf16 GEMMs alone (the head's six matmuls with nothing around them:
the rate to approach). ours_bf16 runs the automatic bf16 kernel (AMX where the CPU has it, else
AVX512_BF16); the CPU's other bf16 kernels are timed beside it, and a CPU without AMX says why the
AMX contender cannot run.

Reports time, GFLOP/s (3 layers x 6 D^2 per pixel), the fraction of this machine's fp32 sgemm
throughput (torch.mm 2048^3, timed round-robin with every head), ratios, peak extra memory, the
first call (weight packing included), the errors against the fp32 head, the CPU model and flags
and which kernels ran; JSON in bench/results/.

    python bench/heads.py --quick        # D = 320, 24 x 24 pixels, batch 1
    python bench/heads.py                # D = 1280, 48 x 48 pixels, batch 1 (the issue's target)
    python bench/heads.py --conditioning film   # FiLM heads (paper appendix E) instead of the release's AdaRMS
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BF16_KERNELS, amx_contender_note, compare, machine, other_bf16_kernels,  # noqa: E402
                     print_machine, sgemm_fn, sgemm_gflops, with_kernel, write_json)

from cleandift_rt import project  # noqa: E402
from cleandift_rt.conditioning import HEAD_CONDITIONINGS  # noqa: E402
from cleandift_rt.models.heads import HEAD_LAYERS, ProjectionHeads  # noqa: E402

# bf16 against torch bf16 autocast, per bf16 kernel, at D = 1280, 48 x 48, batch 1 (issues 13 and 28).
TARGETS = {"avx512_bf16": 1.1, "amx": 1.8}


def gemms_alone(heads: ProjectionHeads, pixels: int):
    """The head's GEMMs in bf16 with nothing around them: per layer [P, D] x [D, 2D] and [P, D] x
    [D, D] into preallocated outputs (oneDNN's AMX / AVX512_BF16 GEMM)."""
    layers = heads.adapters["us6"].layers
    dim = layers[0].up_proj.weight.shape[1]
    weights = [(layer.up_proj.weight.detach().bfloat16().T, layer.down_proj.weight.detach().bfloat16().T)
               for layer in layers]
    x = torch.randn(pixels, dim).bfloat16()
    up_out, down_out = torch.empty(pixels, 2 * dim, dtype=torch.bfloat16), torch.empty(pixels, dim, dtype=torch.bfloat16)

    def gemms():
        for up, down in weights:
            torch.mm(x, up, out=up_out)
            torch.mm(x, down, out=down_out)
        return down_out
    return gemms


def run(dim: int, size: int, batch: int, repeats: int, info: dict, conditioning: str = "adarms") -> dict:
    torch.manual_seed(0)
    heads = ProjectionHeads({"us6": dim}, conditioning=conditioning).eval()
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(batch, dim, size, size)
    flop = batch * size * size * HEAD_LAYERS * 6.0 * dim * dim

    xb = x.bfloat16()
    t0 = time.perf_counter()
    project(x, 261, heads, "us6")              # packs the weights and caches cond(261)
    first = time.perf_counter() - t0
    project(x, 261, heads, "us6", precision="bf16")  # the bf16 packing, outside the timings too

    def autocast_head():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return heads("us6", x, 261)

    fns = {"ours": lambda: project(x, 261, heads, "us6"), "torch": lambda: heads("us6", x, 261),
           "ours_bf16": lambda: project(x, 261, heads, "us6", precision="bf16"),
           "ours_bf16_features": lambda: project(xb, 261, heads, "us6"),
           "torch_bf16": autocast_head, "torch_bf16_gemm": gemms_alone(heads, batch * size * size),
           "sgemm": sgemm_fn()}
    others = other_bf16_kernels(info)
    for kernel in others:
        fns[f"ours_{kernel}"] = with_kernel(kernel, lambda: project(x, 261, heads, "us6", precision="bf16"))
    print(amx_contender_note(info) + (f"; also timed: {', '.join(others)}" if others else ""))
    with torch.no_grad():
        res = compare(fns, repeats)
    gemm = sgemm_gflops(res.pop("sgemm")[0])
    gemm_alone = res.pop("torch_bf16_gemm")[0]
    ref = res["torch"][2]
    row = {"D": dim, "pixels": size * size, "B": batch, "conditioning": conditioning, "gflop": flop / 1e9,
           "sgemm_gflops": gemm, "bf16_kernel": info["cpu_kernel_bf16"], "ours_first_call_s": first,
           "torch_bf16_gemm_s": gemm_alone, "torch_bf16_gemm_gflops": flop / gemm_alone / 1e9}
    for name, (seconds, mem, out) in res.items():
        row.update({f"{name}_s": seconds, f"{name}_gflops": flop / seconds / 1e9, f"{name}_mem_mb": mem,
                    f"{name}_max_rel_error": ((out.float() - ref).abs().max() / ref.abs().max()).item()})
    row.update(ours_frac_sgemm=row["ours_gflops"] / gemm, speedup_vs_torch=row["torch_s"] / row["ours_s"],
               max_rel_error=row["ours_max_rel_error"], bf16_speedup_over_fp32=row["ours_s"] / row["ours_bf16_s"],
               bf16_speedup_vs_torch_bf16=row["torch_bf16_s"] / row["ours_bf16_s"],
               bf16_features_speedup_vs_torch_bf16=row["torch_bf16_s"] / row["ours_bf16_features_s"],
               bf16_frac_torch_bf16_gemm=row["ours_bf16_gflops"] / row["torch_bf16_gemm_gflops"])
    target = TARGETS.get(row["bf16_kernel"])
    print(f"sgemm 2048^3 (torch.mm, same round-robin): {gemm:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    print(f"{conditioning} D={dim} {size}x{size} B={batch}: ours {row['ours_s'] * 1e3:.1f} ms ({row['ours_gflops']:.1f} GFLOP/s, "
          f"{row['ours_frac_sgemm']:.2f} of sgemm, {row['ours_mem_mb']:.0f} MB; first call {first * 1e3:.0f} ms) | "
          f"torch eager fp32 {row['torch_s'] * 1e3:.1f} ms ({row['torch_gflops']:.1f} GFLOP/s, {row['torch_mem_mb']:.0f} MB)"
          f" | x{row['speedup_vs_torch']:.2f} | max rel error {row['max_rel_error']:.1e}")
    print(f"  bf16: ours {row['ours_bf16_s'] * 1e3:.1f} ms ({row['ours_bf16_gflops']:.1f} GFLOP/s, x{row['bf16_speedup_over_fp32']:.2f}"
          f" of our fp32, error {row['ours_bf16_max_rel_error']:.1e}), bf16 features {row['ours_bf16_features_s'] * 1e3:.1f} ms | "
          f"torch bf16 autocast {row['torch_bf16_s'] * 1e3:.1f} ms (error {row['torch_bf16_max_rel_error']:.1e}) | "
          f"x{row['bf16_speedup_vs_torch_bf16']:.2f}" + ("" if (dim, size, batch) != (1280, 48, 1) or not target else
          f" (target {target}x: {'met' if row['bf16_speedup_vs_torch_bf16'] >= target else 'MISSED'})"))
    print(f"  bf16 kernel {row['bf16_kernel']}: {row['bf16_frac_torch_bf16_gemm']:.2f} of torch's bf16 GEMMs alone "
          f"({gemm_alone * 1e3:.1f} ms, {row['torch_bf16_gemm_gflops']:.1f} GFLOP/s)"
          + "".join(f" | ours {name} {row[f'ours_{name}_s'] * 1e3:.1f} ms ({row[f'ours_{name}_gflops']:.1f} GFLOP/s)"
                    for name, _ in BF16_KERNELS if f"ours_{name}_s" in row))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="D = 320, 24 x 24, batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conditioning", choices=HEAD_CONDITIONINGS, default="adarms", help="head kind")
    args = parser.parse_args(argv)
    dim, size = (320, 24) if args.quick else (1280, 48)
    info = machine()
    print_machine(info)
    result = {"rows": [run(dim, size, 1, args.repeats, info, args.conditioning)], "machine": info,
              "quick": args.quick, "amx": amx_contender_note(info)}
    print(f"written {write_json('heads', result)}")


if __name__ == "__main__":
    main()
