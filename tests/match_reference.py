"""Tie-exact brute-force references for the matching kernels (CPU, bf16 and CUDA tests share them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MARGIN = 1e-4  # rows whose best and second-best similarities are closer than this may tie-break differently


def brute_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[B, N, M] cosine similarities in float64 (the reference), tie-exact by construction.

    A float64 matmul may round identical rows differently (the BLAS blocks rows by position, and
    the blocking differs between CPUs), so its ties cannot be trusted. Each distinct (source,
    target) vector pair is therefore computed once and broadcast: identical vectors get
    bit-identical similarities, as they do in the kernel.
    """
    c = src.shape[-1]
    src_u, src_of = torch.unique(src.reshape(-1, c), dim=0, return_inverse=True)
    dst_u, dst_of = torch.unique(dst.reshape(-1, c), dim=0, return_inverse=True)
    table = F.normalize(src_u.double(), dim=-1) @ F.normalize(dst_u.double(), dim=-1).T
    return table[src_of.reshape(src.shape[:2])[:, :, None], dst_of.reshape(dst.shape[:2])[:, None, :]]


def ranked(sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference order along the last axis: similarity descending, ties by lowest index."""
    order = torch.argsort(-sims, dim=-1, stable=True)
    return order, torch.gather(sims, -1, order)


def unambiguous(sorted_vals: torch.Tensor, k: int, exact_ties: bool = False) -> torch.Tensor:
    """Rows whose top-k (and order) rounding cannot change: neighbouring values among the first k + 1
    differ by more than MARGIN. With exact_ties (ties that come from duplicated vectors, which the
    kernel computes bit-identically) a zero gap is a tie that must go to the lowest index."""
    top = sorted_vals[..., :k + 1]
    gaps = top[..., :-1] - top[..., 1:]
    close = gaps < MARGIN
    if exact_ties:
        close &= gaps > 0
    return ~close.any(-1)


def check_rows(sim_ref: torch.Tensor, index: torch.Tensor, sim: torch.Tensor, k: int = 1):
    """index/sim [B, N, k] agree with the reference: same similarities, and the exact indices wherever
    the reference ordering is unambiguous."""
    order, vals = ranked(sim_ref)
    torch.testing.assert_close(sim.double(), torch.gather(sim_ref, -1, index), atol=1e-5, rtol=0)
    torch.testing.assert_close(sim.double(), vals[..., :k], atol=1e-5, rtol=0)
    clear = unambiguous(vals, k)
    assert clear.float().mean() > 0.5, "test data too tie-prone to be informative"
    assert torch.equal(index[clear], order[..., :k][clear])


def brute_mutual(sim_ref: torch.Tensor, exact_ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual NN from two brute-force argmaxes (lowest index on ties) and the rows where it is certain."""
    row_order, row_vals = ranked(sim_ref)
    col_order, col_vals = ranked(sim_ref.transpose(1, 2))
    fwd, bwd = row_order[..., 0], col_order[..., 0]         # [B, N], [B, M]
    n = sim_ref.shape[1]
    expected = torch.where(torch.gather(bwd, 1, fwd) == torch.arange(n), fwd, -1)
    safe = unambiguous(row_vals, 1, exact_ties) & torch.gather(unambiguous(col_vals, 1, exact_ties), 1, fwd)
    return expected, safe


def pooled(gen, b, rows, c, pool):
    """Vectors drawn from `pool` random vectors plus the zero vector: exact ties and zero vectors."""
    choices = torch.cat([torch.randn(pool, c, generator=gen), torch.zeros(1, c)])
    return choices[torch.randint(0, pool + 1, (b, rows), generator=gen)]


# The bf16 kernels: references that round like them, and the error bound against fp32.

BF16_UNIT = 2.0**-8  # unit roundoff of bf16: 8 significant bits, round to nearest even (relative error <= 2^-8)


def rounded_unit(x: torch.Tensor) -> torch.Tensor:
    """Each [.., C] vector as the kernel packs it: scaled by its fp32 inverse norm (norm in float64,
    eps 1e-12), then rounded to bf16; returned as exact float64."""
    inv = (1.0 / x.double().pow(2).sum(-1).sqrt().clamp(min=1e-12)).float()
    return (x.float() * inv[..., None]).bfloat16().double()


def tie_exact_similarity(src: torch.Tensor, dst: torch.Tensor, prepare) -> torch.Tensor:
    """[B, N, M] similarities of prepare(src) and prepare(dst), one float64 dot per distinct pair."""
    c = src.shape[-1]
    src_u, src_of = torch.unique(src.reshape(-1, c), dim=0, return_inverse=True)
    dst_u, dst_of = torch.unique(dst.reshape(-1, c), dim=0, return_inverse=True)
    table = prepare(src_u) @ prepare(dst_u).T
    return table[src_of.reshape(src.shape[:2])[:, :, None], dst_of.reshape(dst.shape[:2])[:, None, :]]


def exact_unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1)


def accumulation_tol(c: int) -> float:
    """fp32 summation of c bf16 products of unit vectors: |error| <= c * 2^-24 * sum |u_i v_i| <= c * 2^-24."""
    return max(1e-6, c * 2.0**-23)


def bf16_bound(c: int) -> float:
    """|bf16 similarity - exact cosine|: each factor carries relative error <= e = 2^-8 + 2^-22 (bf16
    rounding after an fp32 normalisation), so a product <= 2e + e^2 of |u_i v_i|, whose sum is <= 1;
    plus the fp32 accumulation."""
    e = BF16_UNIT + 2.0**-22
    return (2 * e + e * e) * (1 + 1e-6) + accumulation_tol(c)


def settled(sorted_vals: torch.Tensor, k: int, margin: float, exact_ties: bool) -> torch.Tensor:
    """Rows whose top-k and its order cannot change under errors below margin / 2; with exact_ties
    a zero gap (duplicated vectors, bit-identical in the kernel) is a tie that must go to the lowest index."""
    top = sorted_vals[..., :k + 1]
    gaps = top[..., :-1] - top[..., 1:]
    close = gaps <= margin
    if exact_ties:
        close &= gaps > 0
    return ~close.any(-1)


def with_duplicates(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Copy some vectors over others (exact ties) and zero one (similarity 0 with everything)."""
    x = x.clone()
    n = x.shape[1]
    if n >= 3:
        picks = torch.randint(0, n, (2, max(1, n // 4)), generator=gen)
        x[:, picks[1]] = x[:, picks[0]]
        x[:, -1] = 0
    return x


def check_against(src, dst, index, sim, prepare, margin, k=1, exact_ties=True, min_settled=0.5):
    ref = tie_exact_similarity(src, dst, prepare)
    order, vals = ranked(ref)
    index = index.reshape(*index.shape[:2], k)
    sim = sim.reshape(*sim.shape[:2], k).double()
    assert (sim - vals[..., :k]).abs().max() <= margin / 2
    clear = settled(vals, k, margin, exact_ties)
    assert clear.double().mean() >= min_settled, "test data too tie-prone to be informative"
    assert torch.equal(index[clear], order[..., :k][clear])
    return clear
