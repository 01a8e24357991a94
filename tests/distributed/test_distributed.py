"""Ray Data extraction (issue 18) on a local Ray started by the tests: Ray's output equals the local
extractor's, an engine actor that dies mid-run is replaced and every image lands once, a resumed
run skips what is done, unreadable images are listed, and memory stays bounded for an input larger
than the object store. The stages also run, without Ray, as plain functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cleandift_rt import read_shards
from cleandift_rt.cli.main import main
from cleandift_rt.extraction import collect_images, extract_local, read_manifest
from cleandift_rt.runtime.engine import Engine

OBJECT_STORE = 80 << 20  # Ray's minimum is 75 MiB
HERE = Path(__file__).resolve().parent


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def engine(subset_engine):
    return subset_engine


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("ray_photos")
    (d / "sub").mkdir()
    names = sorted(photos)
    for i in range(10):
        photos[names[i % 3]].resize((80 + 4 * i, 72)).rotate(11 * i).save(d / ("sub" if i % 3 == 0 else ".") / f"p{i}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return d


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray for the module (Ray starts slowly), spilling into a folder the tests watch."""
    ray = pytest.importorskip("ray")
    spill = tmp_path_factory.mktemp("spill")
    arm = tmp_path_factory.mktemp("arm") / "kill-one-actor"
    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "ray_actor_kill.setup",
                          "env_vars": {"PYTHONPATH": str(HERE.parent), "CLEANDIFT_TEST_KILL_ARM": str(arm)}},
             _system_config={"object_spilling_config": json.dumps(
                 {"type": "filesystem", "params": {"directory_path": str(spill)}})})
    yield {"spill": spill, "arm": arm}
    ray.shutdown()


def shards_of(out) -> dict:
    return dict(read_shards(out))


def assert_close(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for path in want:
        for tap in want[path]:
            np.testing.assert_allclose(got[path][tap], want[path][tap], rtol=1e-5, atol=1e-6, err_msg=f"{path} {tap}")


def test_stages_without_ray_equal_the_local_extractor(engine, folder, tmp_path):
    from cleandift_rt.distributed.stages import EngineWorker, decode_batch, write_batch
    from cleandift_rt.extraction import engine_config

    items = collect_images([folder])
    local = tmp_path / "local"
    extract_local(engine, items, local, fmt="shards", progress=False, log=quiet)
    config = engine_config(engine, "shards")
    decoded = decode_batch({"key": np.array([i.key for i in items], object), "path": np.array([i.path for i in items],
                                                                                              object)},
                           size=(64, 64), resize="stretch", done={items[-1].key})
    assert decoded["skipped"].sum() == 1 and list(decoded["status"]).count("failed") == 1
    featured = EngineWorker(str(engine.path), config.taps, {"size": (64, 64)})(decoded)
    out = tmp_path / "stages"
    out.mkdir()
    summary = write_batch(featured, out=str(out), config=config)
    record = json.loads(summary["record"][0])
    assert summary["images"][0] == len(items) - 2 and summary["skipped"][0] == 1
    assert [k for k, _, _ in record["failed"]] == ["broken.jpg"]
    want = {p: f for p, f in shards_of(local).items() if p != items[-1].path}
    assert_close(shards_of(out), want)


@pytest.mark.slow  # a long end-to-end run (still run by .ci/run; -m 'not slow' skips it)
def test_ray_equals_local_resumes_and_lists_unreadable_images(ray_cluster, engine, folder, tmp_path):
    import ray

    from cleandift_rt.distributed import extract
    from cleandift_rt.extraction import Item

    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())  # broken.jpg among them
    local, distributed = tmp_path / "local", tmp_path / "ray"
    extract_local(engine, [Item(p, p) for p in paths], local, fmt="shards", progress=False, log=quiet)
    options = dict(engine_options={"size": (64, 64)}, batch_size=3, shard_images=4, concurrency=1, progress=False,
                   log=quiet)
    first = extract(paths[:5], engine.path, output=distributed, **options)  # a run that did not finish
    assert (first.done, [p for p, _ in first.failed]) == (4, [str(folder / "broken.jpg")])
    dataset = ray.data.from_items([{"path": p} for p in paths])  # streamed: done keys are dropped in the tasks
    second = extract(dataset, engine.path, output=distributed, **options)
    assert (second.images, second.skipped, second.done, len(second.failed)) == (11, 4, 6, 1)
    got = list(read_shards(distributed))
    assert len(got) == 10 and len({p for p, _ in got}) == 10  # every image once
    assert_close(dict(got), shards_of(local))
    assert [p for p, _ in read_manifest(distributed, "shards").failed.values()] == [str(folder / "broken.jpg")]


@pytest.mark.slow  # a long end-to-end run (still run by .ci/run; -m 'not slow' skips it)
def test_an_actor_that_dies_is_replaced_and_every_image_lands_once(ray_cluster, engine, folder, tmp_path, capsys):
    """Through the command line: ``--ray`` with the engine workers sized by hand."""
    local, out = tmp_path / "local", tmp_path / "out"
    extract_local(engine, collect_images([folder]), local, fmt="shards", progress=False, log=quiet)
    ray_cluster["arm"].write_text("")
    assert main(["extract", str(folder), "--engine", str(engine.path), "--size", "64", "64", "--out", str(out),
                 "--format", "shards", "--ray", "--concurrency", "1", "--gpus-per-worker", "0", "--batch-size", "2",
                 "--shard-images", "2", "--no-progress"]) == 0
    assert not ray_cluster["arm"].exists()  # the engine actor died at its second batch
    text = capsys.readouterr().out
    assert "wrote 10 image(s) into shards" in text and "skipped 1 unreadable image(s)" in text
    got = list(read_shards(out))
    assert len(got) == len({p for p, _ in got}) == 10  # each image exactly once
    assert_close(dict(got), shards_of(local))


@pytest.mark.slow  # a long end-to-end run (still run by .ci/run; -m 'not slow' skips it)
def test_memory_stays_bounded_for_an_input_larger_than_the_object_store(ray_cluster, engine, photos, tmp_path):
    from cleandift_rt.distributed import extract

    src = tmp_path / "many"
    src.mkdir()
    cat = photos["cat"].resize((96, 96))
    n = 200  # 200 x 192 x 192 x 3 float32 = 84 MiB of model input, more than the 80 MiB object store
    for i in range(n):
        cat.rotate(i).save(src / f"{i:03d}.jpg", quality=80)
    assert n * 3 * 192 * 192 * 4 > OBJECT_STORE
    paths = sorted(str(p) for p in src.iterdir())
    summary = extract(paths, engine.path, taps=["us6"], batch_size=8, concurrency=1, output=tmp_path / "out",
                      engine_options={"size": (192, 192)}, shard_images=64, progress=False, log=quiet)
    assert summary.done == n and len(list(read_shards(tmp_path / "out"))) == n
    spilled = [p for p in Path(ray_cluster["spill"]).rglob("*") if p.is_file()]
    assert not spilled, f"Ray spilled {len(spilled)} object file(s): the pipeline did not stream"
