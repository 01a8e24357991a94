"""``extract``: the Ray Data pipeline and its driver.

read the items -> decode and resize in CPU tasks -> ``map_batches`` through ``EngineWorker``
actors (one Engine each, ``num_gpus_per_worker`` GPUs each) -> write shards in CPU tasks. Ray
streams it (bounded memory whatever the input size) and retries tasks and actors that die. The
driver alone writes the manifest, from the writers' summary rows, with the same start, resume
and adoption of unrecorded shards as the local extractor (``extraction.resume``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..extraction.inputs import Item, run_config
from ..extraction.resume import Summary, open_run
from ..extraction.shards import default_shard_images
from .stages import EngineWorker, decode_batch, write_batch

DECODE_BATCH = 16  # images per decode task: enough to amortise a task, few enough to spread
WORKER_MEMORY = 384 << 20  # a worker with PyTorch imported (~240 MB, Ray measures) decoding a 24 MP photo (72 MB)
INSTALL = "pip install 'cleandift-rt[distributed]' (or pip install 'ray[data]')"


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(f"cleandift_rt.distributed needs Ray Data ({exc}): {INSTALL}") from None
    return ray


def engine_facts(engine_path, taps, options: dict):
    """(ArtifactInfo, taps, size, resize) without running anything: exported engines from their
    metadata; student files and diffusers folders by opening them once on the driver (CPU)."""
    from ..formats.artifact import read_info

    path = Path(engine_path)
    if not path.exists():
        raise FileNotFoundError(f"engine {path} does not exist")
    if path.suffix in (".onnx", ".plan"):
        info = read_info(path)
        resize = options.get("resize") or info.resize
        return info, info.check_taps(taps), info.check_size(options.get("size")), resize
    from ..runtime.engine import Engine

    engine = Engine(path, taps=taps, **{**options, "device": "cpu"})
    return engine.backend.info, engine.taps, engine.size, engine.resize


def _workers(ray, num_gpus_per_worker, concurrency):
    """(GPUs per actor, actor count or (min, max)): one actor per GPU of the cluster when it has
    GPUs, else one per node."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1 if gpus else 0
    if num_gpus_per_worker < 0:
        raise ValueError(f"num_gpus_per_worker must be >= 0, got {num_gpus_per_worker}")
    if num_gpus_per_worker > 0 and not gpus:
        raise ValueError(f"num_gpus_per_worker={num_gpus_per_worker}, but the Ray cluster has no GPUs: pass 0 (CPU "
                         "workers) or start the workers on GPU machines (ray start --num-gpus N)")
    if concurrency is None:
        concurrency = int(gpus // num_gpus_per_worker) if num_gpus_per_worker else len(
            [n for n in ray.nodes() if n.get("Alive")])
        concurrency = max(1, concurrency)
    sizes = (concurrency, concurrency) if isinstance(concurrency, int) else tuple(int(c) for c in concurrency)
    if len(sizes) != 2 or not 1 <= sizes[0] <= sizes[1]:
        raise ValueError(f"concurrency must be an actor count >= 1 or a (min, max) range, got {concurrency!r}")
    return num_gpus_per_worker, sizes


def decode_memory(size) -> int:
    """Bytes a decode task reserves: its worker decoding one large photo, plus its batch of model input.

    A resource request of its own also keeps Ray Data from fusing decoding into the engine actors
    (operators with different requests are not fused), where it would run in turn with inference."""
    return DECODE_BATCH * 3 * size[0] * size[1] * 4 + WORKER_MEMORY


def _quiet(ray, progress: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's counts blocks per operator
    ctx.print_on_execution_start = progress


def extract(paths_or_dataset, engine_path, *, taps=None, batch_size=None, num_gpus_per_worker=None,
            concurrency=None, output, engine_options=None, shard_images=None, num_cpus_per_worker=1,
            address=None, progress=True, log=print) -> Summary:
    """Extract features of many images with Ray Data into a shards folder ``output``; resumable.

    ``paths_or_dataset``: image paths (each its own key), or a ``ray.data.Dataset`` with a
    ``path`` column (and optionally ``key``), e.g. ``ray.data.read_parquet(listing)``; every worker
    must be able to read the paths and write ``output`` (a shared filesystem on a cluster).
    ``engine_options``: ``Engine`` keyword arguments (``size``, ``precision``, ``device``, ...);
    ``concurrency``: engine actors (an int, or (min, max) to autoscale; default one per GPU, or
    one per node on CPUs); ``num_gpus_per_worker``: GPUs per actor (default 1 where the cluster
    has GPUs, else 0). Connects to Ray at ``address`` (None: a running local Ray or a new one)
    unless Ray is already initialised. Returns a ``Summary`` (images done, skipped, failed, seconds).
    """
    if isinstance(paths_or_dataset, (str, Path)):
        raise TypeError("paths_or_dataset is a list of image paths (or a ray.data.Dataset), not one path: wrap it "
                        "in a list, or collect a folder with cleandift_rt.extraction.collect_images")
    ray = _ray()
    if isinstance(paths_or_dataset, ray.data.Dataset):
        items = paths_or_dataset
    else:
        items = [Item(str(p), str(p)) for p in paths_or_dataset]
    return run_items(items, engine_path, taps=taps, batch_size=batch_size, num_gpus_per_worker=num_gpus_per_worker,
                     concurrency=concurrency, output=output, engine_options=engine_options, shard_images=shard_images,
                     num_cpus_per_worker=num_cpus_per_worker, address=address, progress=progress, log=log)


def run_items(items, engine_path, *, taps=None, batch_size=None, num_gpus_per_worker=None, concurrency=None, output,
              engine_options=None, shard_images=None, num_cpus_per_worker=1, address=None, progress=True,
              log=print) -> Summary:
    """``extract`` for a list of ``Item`` (keys chosen by the caller, as the CLI does) or a Dataset."""
    from tqdm.auto import tqdm

    ray = _ray()
    options = dict(engine_options or {})
    if "taps" in options:
        raise ValueError("engine_options must not hold 'taps': pass them as extract's own argument")
    if "aggregator" in options:
        raise ValueError("Ray extraction writes the U-Net taps; for Diffusion Hyperfeatures descriptors ('hyper') run "
                         "the local extractor (extraction.extract_local with Engine(..., aggregator=FILE))")
    batch_size = 4 if batch_size is None else int(batch_size)
    if batch_size < 1 or (shard_images is not None and int(shard_images) < 1):
        raise ValueError(f"batch_size and shard_images must be >= 1, got {batch_size} and {shard_images}")
    info, taps, size, resize = engine_facts(engine_path, taps, options)
    config = run_config("shards", {t: info.tap_shape(t, *size) for t in taps}, size, resize, options.get("precision"),
                        engine_path, base=options.get("base"), prompt=info.prompt)
    shard_images = int(shard_images or default_shard_images(config))
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    gpus, (low, high) = _workers(ray, num_gpus_per_worker, concurrency)
    if not gpus:
        options.setdefault("device", "cpu")  # never a GPU the actor did not reserve
    streamed = not isinstance(items, list)
    with open_run(output, [] if streamed else items, config, log) as run:
        summary = run.summary
        if streamed:
            dataset, done = items, frozenset(run.manifest.done)
        else:
            dataset, done = ray.data.from_items([{"key": i.key, "path": i.path} for i in run.todo]), None
        log(f"{'a Ray dataset' if streamed else f'{summary.images} image(s)'}: {summary.skipped} already extracted"
            + ("" if streamed else f", {len(run.todo)} to do") + f"; taps {', '.join(config.taps)}; engine input "
            f"{size[0]}x{size[1]} ({resize}); {low if low == high else f'{low}-{high}'} engine worker(s) with "
            f"{gpus} GPU(s) each, batch {batch_size}")
        _quiet(ray, progress)
        t0 = time.perf_counter()
        if streamed or run.todo:
            pipeline = (dataset
                        .map_batches(decode_batch, batch_size=DECODE_BATCH, num_cpus=1, memory=decode_memory(size),
                                     fn_kwargs={"size": tuple(size), "resize": resize, "done": done})
                        .map_batches(EngineWorker, batch_size=batch_size,
                                     compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
                                     num_gpus=gpus, num_cpus=num_cpus_per_worker,
                                     fn_constructor_kwargs={"engine_path": str(engine_path), "taps": config.taps,
                                                            "options": options})
                        .map_batches(write_batch, batch_size=shard_images, num_cpus=0.5,
                                     fn_kwargs={"out": str(run.out), "config": config}))
            with tqdm(total=None if streamed else len(run.todo), desc="extract", unit="img",
                      disable=not progress) as bar:
                for row in pipeline.iter_rows():
                    record = json.loads(row["record"])
                    if record:
                        run.manifest.append(record)
                    failed = [(path, why) for _, path, why in record.get("failed", [])]
                    summary.failed.extend(failed)
                    summary.done += int(row["images"])
                    summary.skipped += int(row["skipped"])
                    bar.update(int(row["images"]) + len(failed))
        summary.seconds = time.perf_counter() - t0
        if streamed:
            summary.images = summary.done + summary.skipped + len(summary.failed)
    return summary
