"""The Ray engine: a Ray Data pipeline over the shards.

    from_items(shards) -> map_batches(ShardActor, batch_size=1,
                                      compute=ActorPoolStrategy(size=workers), num_gpus=...) -> receipts

Each actor of the pool builds one `ShardRunner` (the model loaded once; one actor per GPU on a
cluster, CPU actors locally) and runs whole shards: it reads the shard's rows itself, from the
files (a shared filesystem on a cluster), and commits its Parquet files (worker.py). The driver
iterates the receipts as shards finish and records each in the manifest. Fault tolerance is
Ray Data's own: an actor pool restarts an actor whose process dies and retries its task
(`max_restarts=-1`, `max_task_retries=-1`, Ray Data's defaults for actor pools); the retried
shard rewrites the same files, so no row is lost or doubled.

Without an address it starts a local Ray with this machine's cores; `--address ray://HOST:PORT`
(Ray Client) or `HOST:PORT` joins a cluster, checked for reachability first.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Sequence

import numpy as np

from ...query.errors import TdbqlError
from .shards import Shard
from .worker import RunConfig, ShardRunner


class ShardActor:
    """A Ray Data callable class; `config` is set on a per-run subclass (run_ray), so the actor
    has no constructor arguments to keep in the object store."""

    config: dict = {}

    def __init__(self) -> None:
        self.runner = ShardRunner(RunConfig(**self.config))

    def __call__(self, batch: dict) -> dict:
        receipts = [json.dumps(self.runner.run_shard(Shard(**json.loads(s)))) for s in batch["shard"]]
        return {"receipt": np.array(receipts, dtype=object)}


def run_ray(config: RunConfig, shards: Sequence[Shard], on_receipt: Callable[[dict], None], *,
            address: str | None, workers: int | None, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Run `shards` on a pool of actors; returns the pool's size."""
    ray = _import_ray()
    started = connect(ray, address)
    try:
        size = workers or default_workers(ray, cpus_per_worker, gpus_per_worker)
        size = max(1, min(size, len(shards)))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver draws its own (prompts/s, ETA)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        actor = type("TdbqlShardActor", (ShardActor,), {"config": config.to_dict()})
        items = [{"shard": json.dumps(s.to_dict())} for s in shards]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        receipts = dataset.map_batches(actor, batch_size=1, batch_format="numpy",
                                       compute=ray.data.ActorPoolStrategy(size=size),
                                       num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None)
        try:
            for row in receipts.iter_rows():
                on_receipt(json.loads(row["receipt"]))
        except Exception as exc:  # a worker's error arrives wrapped by Ray
            cause = user_error(exc)
            if cause is None:
                raise
            raise cause from None
        return size
    finally:
        if started:
            ray.shutdown()


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise TdbqlError("--engine ray needs Ray: pip install 'tdbql[ray]' (ray[data] 2.x)") from exc
    return ray


def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray; True when this call started it (the
    caller shuts it down). A Ray this process already runs is used as it is."""
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001  (Ray raises ConnectionError, RuntimeError, ...)
            raise TdbqlError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
        return True
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    return True


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A clear error, quickly, for an address nothing answers at (Ray's own retries take long)."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise TdbqlError(f"--address {address!r}: expected ray://HOST:PORT, HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TdbqlError(f"cannot reach a Ray cluster at {address}: {reason}") from exc


def default_workers(ray, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """One actor per GPU (or per `gpus_per_worker` GPUs), else per `cpus_per_worker` cores."""
    resources = ray.cluster_resources()
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // max(cpus_per_worker, 1e-9)))


def user_error(exc: BaseException) -> TdbqlError | None:
    """The TdbqlError a worker raised, from inside Ray's wrappers (RayTaskError, UserCodeException)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TdbqlError) and type(e) is TdbqlError:
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, TdbqlError):
            err = TdbqlError(cause.message, line=cause.line, column=cause.column, source=cause.source,
                             suggestion=cause.suggestion)
            err.source_name = getattr(cause, "source_name", None)
            return err
        todo += [cause, e.__cause__, e.__context__]
    return None
