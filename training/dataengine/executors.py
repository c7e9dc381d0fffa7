"""Where shards are rendered: in this process, in a process pool on this machine, or in a Ray pool.

Every executor runs the same worker code (`pipeline.init_worker` builds one Engine per worker process,
`pipeline.run_shard` renders a shard into a temporary folder and renames it when complete), so the files
are the same whichever executor renders them; only where the processes live differs. A shard that fails
is recorded and the others go on (an overnight run is not lost to one bad shard); an interrupt stops every
worker and removes the temporary folders of this run's shards, so no half shard is left.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataEngineError
from .pipeline import Engine, EngineConfig, init_worker, run_shard, shard_tmp_glob, write_shard

EXECUTORS = ("process", "ray")

Shard = tuple[int, list[int]]  # (shard number, scene indices)


@dataclass
class ShardFailure:
    """A shard whose rendering raised: `error` is one line (type and message), `details` the traceback."""

    shard: int
    indices: list[int]
    error: str
    details: str


def render_shards(
    todo: list[Shard],
    *,
    out: Path,
    cfg: EngineConfig,
    executor: str,
    workers: int | None,
    asset_cache: Path | None,
    ray_address: str | None = None,
    engine: Engine | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[ShardFailure]:
    """Render the shards of `todo` into `out`; return the ones that failed (empty when all are DONE).

    workers: 0 renders in this process (with `engine` if given); None takes every core of this machine
    (process) or of the Ray cluster (ray). `progress(n)` is called as scenes finish.
    """
    if not todo:
        return []
    if executor not in EXECUTORS:
        raise DataEngineError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if workers == 0 or engine is not None:
        if executor != "process":
            raise DataEngineError("--workers 0 renders in this process; --executor ray needs workers")
        return _render_here(todo, out, cfg, asset_cache, engine, progress)
    opener = _process_pool if executor == "process" else _ray_pool
    failures: list[ShardFailure] = []
    try:
        with opener(cfg, asset_cache, workers, len(todo), ray_address) as (pool, progress_queue):
            pending = {pool.apply_async(run_shard, (str(out), k, idx)): (k, idx) for k, idx in todo}
            while pending:
                _drain(progress_queue, progress, timeout=0.5)
                for result in [r for r in pending if r.ready()]:
                    k, idx = pending.pop(result)
                    try:
                        result.get()
                    except Exception as exc:
                        failures.append(_failure(k, idx, exc))
            _drain(progress_queue, progress, timeout=None)
        # A worker that died mid-shard (and was restarted) left its temporary folder behind
        remove_partial_shards(out, [k for k, _ in todo])
    except BaseException:
        # Ctrl-C: leaving the pool has stopped every worker; what they were writing goes too
        remove_partial_shards(out, [k for k, _ in todo])
        raise
    return failures


def remove_partial_shards(out: Path, shards: list[int]) -> None:
    """Remove the temporary folders of these shards only: array jobs on other machines write other shards
    of the same folder at the same time."""
    for k in shards:
        for tmp in out.glob(shard_tmp_glob(k)):
            shutil.rmtree(tmp, ignore_errors=True)


def _render_here(todo, out, cfg, asset_cache, engine, progress) -> list[ShardFailure]:
    if engine is None:
        engine = Engine(cfg, asset_cache=asset_cache)
    elif engine.config != cfg:
        raise DataEngineError("the engine passed in was built with another configuration")
    failures = []
    for k, idx in todo:
        try:
            write_shard(engine, out, k, idx, progress=progress)
        except Exception as exc:  # write_shard has removed its temporary folder
            failures.append(_failure(k, idx, exc))
    return failures


def _failure(k: int, idx: list[int], exc: BaseException) -> ShardFailure:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ShardFailure(
        k, idx, f"{type(exc).__name__}: {first}".rstrip(": "), "".join(traceback.format_exception(exc))
    )


def _drain(q, progress, *, timeout: float | None) -> None:
    """Pass the scenes counted by the workers to `progress`: wait up to `timeout` for the first, then
    take what is queued (timeout None: only what is queued)."""
    try:
        n = q.get(timeout=timeout) if timeout is not None else q.get_nowait()
    except queue.Empty:  # ray.util.queue.Empty derives from it
        return
    while True:
        if progress is not None:
            progress(n)
        try:
            n = q.get_nowait()
        except queue.Empty:
            return


def _n_workers(workers: int | None, available: int, n_shards: int) -> int:
    return max(1, min(workers or available, n_shards))


@contextlib.contextmanager
def _process_pool(cfg, asset_cache, workers, n_shards, _ray_address) -> Iterator[tuple]:
    ctx = mp.get_context("spawn")  # a fresh GL context per worker; never fork one
    q = ctx.Queue()
    pool = ctx.Pool(
        _n_workers(workers, os.cpu_count() or 1, n_shards),
        initializer=init_worker,
        initargs=(cfg, asset_cache, q),
    )
    try:
        yield pool, q
    finally:
        pool.terminate()
        pool.join()


def import_ray():
    """Import Ray with its usage statistics switched off (read at import: Ray must never phone home)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
    except ImportError as exc:
        raise DataEngineError(
            "--executor ray needs Ray: pip install -c constraints.txt 'converseg-edge[ray]' "
            f"(or use --executor process) ({exc})"
        ) from exc
    return ray


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")
# Port 9 (discard) on loopback: nothing listens, so a request sent there is refused on this machine.
CLOSED_PROXY = "http://127.0.0.1:9"


def start_local_ray(ray, num_cpus: int) -> None:
    """A Ray instance on this machine that talks over loopback only: 127.0.0.1, no dashboard.

    Even without the dashboard and with usage statistics off, Ray's API server process asks cloud
    metadata addresses (169.254.169.254, metadata.google.internal) which cloud it runs on. That process
    is started with every HTTP proxy pointing at a closed loopback port, so those requests fail here
    instead of leaving the machine (checked with strace: no connect() off loopback)."""
    saved = {v: os.environ.get(v) for v in PROXY_VARIABLES}
    os.environ.update({v: CLOSED_PROXY for v in PROXY_VARIABLES[:4]})
    os.environ.pop("NO_PROXY", None)
    os.environ.pop("no_proxy", None)
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
        )
    finally:  # Ray's processes have inherited the setting; this process gets its own back
        for v, value in saved.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value


@contextlib.contextmanager
def _ray_pool(cfg, asset_cache, workers, n_shards, ray_address) -> Iterator[tuple]:
    """ray.util.multiprocessing.Pool: one actor per worker, each with its own Engine (built once by
    init_worker), holding one CPU so that Ray spreads the actors over the cluster's nodes. Without an
    address a local Ray is started (and stopped at the end); with one (`auto`, `ray://HOST:10001`) the run
    joins that cluster, whose nodes must have this repository installed and OUT mounted at the same path.

    An actor whose process dies (killed, or a native crash such as an abort inside Mesa's EGL context
    creation) is restarted once and its shard run again: a shard is written to a temporary folder and
    renamed when complete, so a second run of it is safe."""
    ray = import_ray()
    from ray.util.multiprocessing import Pool
    from ray.util.queue import Queue

    started = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, logging_level=logging.WARNING)
        else:
            start_local_ray(ray, workers or os.cpu_count() or 1)
        started = True
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        q = Queue(actor_options={"num_cpus": 0})  # an actor: workers anywhere in the cluster can reach it
        pool = Pool(
            _n_workers(workers, cpus, n_shards),
            initializer=init_worker,
            initargs=(cfg, asset_cache, q),
            ray_remote_args={"num_cpus": 1, "max_restarts": 1, "max_task_retries": 1},
        )
        try:
            yield pool, q
        finally:
            pool.terminate()
            q.shutdown()
    finally:
        if started:
            ray.shutdown()
