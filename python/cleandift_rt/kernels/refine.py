"""Window soft-argmax refinement of nearest-neighbour matches (kernel soft-argmax of the correspondence
literature): around each argmax, a ``window`` x ``window`` neighbourhood of the target grid, softmax
over similarity / temperature, expected (x, y) position.

Two conventions for the cells outside the window, one implementation:

* ``outside="exclude"`` (``match(..., refine=True)``): outside cells are masked to -inf, so the
  softmax and the expectation run over the window's cells only;
* ``outside="zero"`` ("Telling Left from Right", docs/method.md, zero-shot fusion: 11 x 11, temperature 0.02): the
  similarity map is multiplied by the window mask, so every outside cell keeps similarity 0 and
  still takes part in a softmax over the whole target grid, pulling the expectation towards the
  grid's centre when the window's similarities are low. Computed in closed form: the outside cells
  share one logit, so only their count and coordinate sums are needed, never the full grid.

In both, the window is the square around the argmax cut at the grid's border (cells beyond the
border do not exist; none is counted twice), so a window wider than the grid is computed as the
grid (the same result, memory bounded by the grid). ``check_refine`` is the one check of the two
options, run by every caller: an odd integer window in [1, ``MAX_WINDOW``] and a finite
temperature > 0 (a NaN or infinite one gave NaN positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_float, check_int

DEFAULT_WINDOW = 5
DEFAULT_TEMPERATURE = 0.02
MAX_WINDOW = 255
OUTSIDE = ("exclude", "zero")
DENSE_CELLS_PER_WINDOW_CELL = 150


def check_refine(window, temperature) -> tuple[int, float]:
    """``(window, temperature)`` checked: an odd integer in [1, MAX_WINDOW] and a finite number > 0."""
    window = check_int(window, "the refinement window", 1, MAX_WINDOW)
    if window % 2 == 0:
        raise ValueError(f"the refinement window must be odd (a square centred on the match), got {window}")
    return window, check_float(temperature, "the refinement temperature", 0.0, lo_open=True)


def soft_argmax(src_rows, dst, index, window, temperature, chunk_bytes=64 * 2**20, outside: str = "exclude"):
    """Window soft-argmax around each argmax: expected (x, y) in target feature cells.

    ``src_rows [B, N, C]`` source vectors, ``dst [B, C, h, w]`` target map, ``index [B, N]`` flat
    argmax cells (y * w + x). Similarities are cosines. Rows go in chunks so the gathered windows
    stay under ``chunk_bytes``. ``outside``: see the module docstring.
    """
    if outside not in OUTSIDE:
        raise ValueError(f"outside must be one of {OUTSIDE}, got {outside!r}")
    window, temperature = check_refine(window, temperature)
    b, c, h, w = dst.shape
    radius = min(window // 2, max(h, w) - 1)  # wider than the grid: the grid (cells beyond it do not exist)
    window = 2 * radius + 1
    offs = torch.arange(-radius, radius + 1, device=index.device)
    cells = h * w
    dst_flat = dst.flatten(2).float()                                    # [B, C, M]
    inv_norm = 1.0 / dst_flat.square().sum(1).sqrt().clamp(min=1e-12)    # [B, M]: F.normalize's floor
    # Few sources: one GEMM against the whole grid, then read the windows out of it; many: gather
    # the window vectors (a GEMM flop costs ~1/150 of a gathered element on these CPUs).
    dense = cells <= DENSE_CELLS_PER_WINDOW_CELL * window * window
    per_row = 4 * b * (cells if dense else window * window * c)
    rows = max(1, chunk_bytes // per_row)
    total_x, total_y = h * w * (w - 1) / 2, w * h * (h - 1) / 2  # coordinate sums over the whole grid
    out = []
    for i in range(0, index.shape[1], rows):
        idx = index[:, i:i + rows]
        x0, y0 = idx % w, idx // w                                       # [B, n]
        xs = (x0[..., None, None] + offs[None, None, None, :]).expand(-1, -1, window, -1)
        ys = (y0[..., None, None] + offs[None, None, :, None]).expand(-1, -1, -1, window)
        inside = ((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)).flatten(2)
        flat = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).flatten(2)  # [B, n, window^2]
        src_n = F.normalize(src_rows[:, i:i + rows].float(), dim=-1)
        if dense:
            dots = torch.gather(torch.bmm(src_n, dst_flat), 2, flat)     # [B, n, window^2]
        else:
            cand = torch.gather(dst_flat, 2, flat.flatten(1)[:, None, :].expand(-1, c, -1))  # [B, C, n * window^2]
            dots = torch.einsum("bnc,bcnw->bnw", src_n, cand.view(b, c, -1, window * window))
        sims = dots * torch.gather(inv_norm, 1, flat.flatten(1)).view_as(dots)
        logits = sims.masked_fill(~inside, float("-inf")) / temperature
        gx, gy = xs.flatten(2).float(), ys.flatten(2).float()
        if outside == "exclude":
            weights = torch.softmax(logits, dim=-1)
            out.append(torch.stack([(weights * gx).sum(-1), (weights * gy).sum(-1)], dim=-1))
            continue
        n_out = cells - inside.sum(-1)                                   # [B, n] cells with similarity 0
        top = logits.amax(-1)
        top = torch.where(n_out > 0, top.clamp(min=0.0), top)            # the shared max of the softmax
        e_in = torch.exp(logits - top[..., None])                        # 0 where masked
        e_out = torch.exp(-top)
        z = e_in.sum(-1) + e_out * n_out
        rest_x = total_x - (gx * inside).sum(-1)                         # coordinate sums of the outside cells
        rest_y = total_y - (gy * inside).sum(-1)
        out.append(torch.stack([((e_in * gx).sum(-1) + e_out * rest_x) / z,
                                ((e_in * gy).sum(-1) + e_out * rest_y) / z], dim=-1))
    return torch.cat(out, 1)
