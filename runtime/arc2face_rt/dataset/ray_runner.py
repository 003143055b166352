"""Shards as Ray actor tasks (`arc2face-rt dataset --ray [ADDRESS]`; `pip install 'arc2face-rt[scale]'`).

One `ShardWorker` actor per GPU (`num_gpus=1`) when the cluster has GPUs, else one per CPU slot
(`num_cpus=1`), each holding one loaded pipeline; a `ray.util.ActorPool` hands them shard numbers.
A worker that dies is restarted and its shard retried (`max_restarts`, `max_task_retries`): a shard
is idempotent (built out of sight, committed by rename, manifest last), so a retry gives the same
bytes. Every actor writes into the same output folder: on several machines it must be a shared file
system (NFS, a cluster file system, a FUSE-mounted bucket with rename support).
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from ..errors import BackendUnavailableError, InvalidInputError
from ..exits import install_signal_handlers
from .worker import ShardWorker, WorkerConfig

RETRIES = 3


def require_ray():
    """The `ray` module, or a one-line error saying how to install it (checked before any work)."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError("--ray needs Ray: pip install 'arc2face-rt[scale]'") from None
    return ray


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT to join must answer a TCP connection (checked before --out is touched; Ray itself
    retries for minutes and prints a line per try). "local" and "auto" are Ray's to resolve."""
    if address in ("local", "auto") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InvalidInputError(f"--ray {address}: not HOST:PORT (or 'auto', or no value for a local Ray)")
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise InvalidInputError(f"--ray {address}: no Ray head answers there ({e.strerror or e}); start one (`ray "
                                "start --head`) or check the address") from None


def run_on_ray(config: WorkerConfig, identities: np.ndarray, todo: list[int], address: str, workers: int | None,
               log: Callable[[str], None]) -> Iterator[dict]:
    """Yield each shard's manifest as its actor commits it. `address`: "local" starts a Ray instance
    here (with `workers` CPUs when given), "auto" or HOST:PORT joins a running cluster."""
    ray = require_ray()
    from ray.util import ActorPool

    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, logging_level="warning")
        else:
            ray.init(address=address, logging_level="warning")
        install_signal_handlers()            # ray.init replaced SIGTERM's: keep the one-line stop
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        slots = gpus or int(res.get("CPU", 1))
        n = max(1, min(workers or slots, slots, len(todo)))
        log(f"ray: {n} worker(s), one per {'GPU' if gpus else 'CPU slot'}, cluster "
            f"{int(res.get('CPU', 0))} CPU(s), {gpus} GPU(s), {len(ray.nodes())} node(s)")
        actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=RETRIES,
                           max_task_retries=RETRIES)(ShardWorker)
        ids = ray.put(identities)
        pool = ActorPool([actor.remote(config, ids) for _ in range(n)])
        yield from pool.map_unordered(lambda a, s: a.run.remote(s), todo)
    finally:
        if started:
            ray.shutdown()
