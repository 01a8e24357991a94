"""Window soft-argmax refinement of nearest-neighbour matches (kernel soft-argmax of the correspondence
literature): around each argmax, a ``window`` x ``window`` neighbourhood of the target grid, softmax
over similarity / temperature, expected (x, y) position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_WINDOW = 5
DEFAULT_TEMPERATURE = 0.02


def soft_argmax(src_rows, dst, index, window, temperature, chunk_bytes=64 * 2**20):
    """Window soft-argmax around each argmax: expected (x, y) under softmax(similarity / T).
    Rows go in chunks so the gathered windows stay under `chunk_bytes`."""
    b, c, h, w = dst.shape
    radius = window // 2
    offs = torch.arange(-radius, radius + 1, device=index.device)
    dst_n = F.normalize(dst.flatten(2).transpose(1, 2).float(), dim=-1)   # [B, M, C]
    rows = max(1, chunk_bytes // (4 * b * window * window * c))
    out = []
    for i in range(0, index.shape[1], rows):
        idx = index[:, i:i + rows]
        x0, y0 = idx % w, idx // w                                       # [B, n]
        xs = (x0[..., None, None] + offs[None, None, None, :]).expand(-1, -1, window, -1)
        ys = (y0[..., None, None] + offs[None, None, :, None]).expand(-1, -1, -1, window)
        inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        flat = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).flatten(2)  # [B, n, window^2]
        cand = torch.gather(dst_n, 1, flat.flatten(1)[..., None].expand(-1, -1, c))
        cand = cand.view(b, -1, window * window, c)
        src_n = F.normalize(src_rows[:, i:i + rows].float(), dim=-1)
        sims = torch.einsum("bnc,bnwc->bnw", src_n, cand).masked_fill(~inside.flatten(2), float("-inf"))
        weights = torch.softmax(sims / temperature, dim=-1)
        out.append(torch.stack([(weights * xs.flatten(2).float()).sum(-1),
                                (weights * ys.flatten(2).float()).sum(-1)], dim=-1))
    return torch.cat(out, 1)
