"""Probe benchmark: the probes' training losses and kNN search vs their straightforward PyTorch forms,
same inputs, same run.

* depth: ``DepthProbe.loss`` (cross-entropy on the grid from per-cell bin counts, SI-log through
  separable upsampling matrices) vs the definition at full resolution (bin probabilities upsampled
  nearest, ``F.interpolate`` bilinear depth, masked SI-log), forward + backward;
* segmentation: ``SegmentationProbe.loss`` vs ``F.cross_entropy(F.interpolate(logits, nearest),
  ignore_index=255)``, forward + backward;
* kNN: ``knn_classify`` (``cleandift_rt.match``, k = 10) vs torch (normalize, matmul, topk) on the
  pooled vectors, same neighbours required.

Prints times, ratios, peak extra memory, the largest difference of the losses / the neighbours'
agreement, and records CPU model and flags; JSON in bench/results/.

    python bench/probes.py --quick     # C = 320, 24 x 24 grid, 240 x 320 targets, batch 2, kNN 4000 x 500
    python bench/probes.py             # C = 1280, 48 x 48 (SD 2.1 us6 at 768 px), 480 x 640, batch 4, 20000 x 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, print_machine, write_json  # noqa: E402

from cleandift_rt.probes import DepthProbe, SegmentationProbe, knn_classify  # noqa: E402


def depth_reference(probe: DepthProbe, feats: torch.Tensor, gts) -> torch.Tensor:
    p = probe.probabilities(feats)
    depth = probe(feats)
    ce, count, g = 0.0, 0, []
    for b, gt in enumerate(gts):
        keep = torch.from_numpy((gt > probe.min_depth) & (gt <= probe.max_depth))
        bins = torch.from_numpy(probe._bins(gt))
        up_p = F.interpolate(p[b:b + 1], size=gt.shape, mode="nearest")[0]
        ce = ce - torch.log(up_p.gather(0, bins[None])[0])[keep].sum()
        count += int(keep.sum())
        up = F.interpolate(depth[b:b + 1, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
        g.append(torch.log(up[keep] + 1e-3) - torch.log(torch.from_numpy(gt)[keep] + 1e-3))
    g = torch.cat(g)
    return ce / count + torch.sqrt(g.var(unbiased=False) + 0.15 * g.mean() ** 2)


def backward(fn):
    def run():
        loss = fn()
        loss.backward()
        return loss.item()

    return run


def run(channels: int, grid: int, size: tuple[int, int], batch: int, bank: int, queries: int, repeats: int) -> dict:
    r = np.random.default_rng(0)
    torch.manual_seed(0)
    feats = torch.randn(batch, channels, grid, grid)
    gts = [r.uniform(0.5, 9.5, size=size).astype(np.float32) for _ in range(batch)]
    probe = DepthProbe(channels)
    prepared = [probe.prepare(gt, (grid, grid)) for gt in gts]
    depth = compare({"ours": backward(lambda: probe._loss(feats, prepared)),
                     "torch": backward(lambda: depth_reference(probe, feats, gts))}, repeats)

    labels = [r.integers(0, 21, size=size).astype(np.uint8) for _ in range(batch)]
    for lab in labels:
        lab[: size[0] // 10] = 255
    seg = SegmentationProbe(channels, 21)
    seg_prepared = [seg.prepare(lab, (grid, grid)) for lab in labels]
    target = torch.from_numpy(np.stack(labels).astype(np.int64))
    segm = compare({"ours": backward(lambda: seg._loss(feats, seg_prepared)),
                    "torch": backward(lambda: F.cross_entropy(F.interpolate(seg(feats), size=size, mode="nearest"),
                                                              target, ignore_index=255))}, repeats)

    train = r.normal(size=(bank, channels)).astype(np.float32)
    query = r.normal(size=(queries, channels)).astype(np.float32)
    labels_k = r.integers(0, 1000, size=bank)

    def torch_knn():
        a = F.normalize(torch.from_numpy(train), dim=1)
        q = F.normalize(torch.from_numpy(query), dim=1)
        return torch.topk(q @ a.T, 10, dim=1).indices.numpy()

    knn = compare({"ours": lambda: knn_classify(train, labels_k, query, k=10).neighbours, "torch": torch_knn}, repeats)
    agree = float(np.mean(knn["ours"][2] == knn["torch"][2]))

    row = {"channels": channels, "grid": grid, "target_size": list(size), "batch": batch, "bank": bank,
           "queries": queries}
    for name, res in (("depth", depth), ("seg", segm), ("knn", knn)):
        row.update({f"{name}_ours_s": res["ours"][0], f"{name}_torch_s": res["torch"][0],
                    f"{name}_ratio": res["torch"][0] / res["ours"][0], f"{name}_ours_mem_mb": res["ours"][1],
                    f"{name}_torch_mem_mb": res["torch"][1]})
    row["depth_loss_difference"] = abs(depth["ours"][2] - depth["torch"][2])
    row["seg_loss_difference"] = abs(segm["ours"][2] - segm["torch"][2])
    row["knn_neighbour_agreement"] = agree
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    info = machine()
    print_machine(info)
    if args.quick:
        row = run(320, 24, (240, 320), 2, 4000, 500, args.repeats)
    else:
        row = run(1280, 48, (480, 640), 4, 20000, 2000, args.repeats)
    for name in ("depth", "seg", "knn"):
        print(f"{name:>5}: ours {row[f'{name}_ours_s'] * 1e3:8.1f} ms ({row[f'{name}_ours_mem_mb']:.0f} MB), torch "
              f"{row[f'{name}_torch_s'] * 1e3:8.1f} ms ({row[f'{name}_torch_mem_mb']:.0f} MB): "
              f"{row[f'{name}_ratio']:.2f}x")
    print(f"loss differences: depth {row['depth_loss_difference']:.2e}, segmentation {row['seg_loss_difference']:.2e}; "
          f"kNN neighbours agree {100 * row['knn_neighbour_agreement']:.2f}%")
    path = write_json("probes", {"machine": info, "quick": args.quick, "result": row})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
