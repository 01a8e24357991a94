"""8 threads on one Engine, on match and on project: every result equals the serial one, bit for bit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cleandift_rt import Engine, ProjectionHeads, match, project

THREADS = 8
CALLS = 100  # per operation in all (CI-sized; bench/soak.py runs the long version)


def _all_equal(got, want) -> bool:
    return all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want))


def test_one_engine_shared_by_eight_threads(tiny_onnx, photos):
    engine = Engine(tiny_onnx["full"], taps=["us6", "us10"])
    images = [np.asarray(p) for p in photos.values()]
    jobs = [[images[i % len(images)]] for i in range(CALLS // 4)]  # 25 extractions: the engine is the slow part
    serial = [engine.extract(job) for job in jobs]
    with ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(engine.extract, jobs))
    for s, t in zip(serial, threaded):
        assert s.keys() == t.keys() and all(np.array_equal(s[k], t[k]) for k in s)


def test_match_and_project_from_eight_threads():
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(2, 70 + i, 24, generator=gen), torch.randn(2, 90, 24, generator=gen)) for i in range(CALLS)]
    serial = [match(s, d, mutual=i % 2 == 0) for i, (s, d) in enumerate(pairs)]
    with ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(lambda a: match(a[1][0], a[1][1], mutual=a[0] % 2 == 0), enumerate(pairs)))
    assert all(_all_equal(t, s) for t, s in zip(threaded, serial))

    torch.manual_seed(1)
    heads = ProjectionHeads({"us6": 32, "us9": 16}).eval()
    feats = {"us6": torch.randn(1, 32, 6, 6), "us9": torch.randn(1, 16, 9, 9)}
    jobs = [("us6" if i % 2 else "us9", i * 9 % 1000) for i in range(CALLS)]  # taps and timesteps interleaved
    serial = [project(feats[tap], t, heads, tap) for tap, t in jobs]
    with ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(lambda job: project(feats[job[0]], job[1], heads, job[0]), jobs))
    assert all(torch.equal(a, b) for a, b in zip(threaded, serial))
