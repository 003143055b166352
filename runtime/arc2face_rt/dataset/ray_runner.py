"""Shards as Ray actor tasks (`arc2face-rt dataset --ray [ADDRESS]`; `pip install 'arc2face-rt[scale]'`).

One `ShardWorker` actor per GPU (`num_gpus=1`) when the cluster has GPUs, else one per CPU slot
(`num_cpus=1`), each holding one loaded pipeline; a `ray.util.ActorPool` hands them shard numbers.
A worker that dies is restarted and its shard retried (`max_restarts`, `max_task_retries`): a shard
is idempotent (built out of sight, committed by rename, manifest last), so a retry gives the same
bytes, and every shard task carries the run record the actors agreed on, so a restarted actor that
would make other pixels (another machine) refuses instead of writing. Every actor writes into the
same output folder: on several machines it must be a shared file system (NFS, a cluster file
system, a FUSE-mounted bucket with rename support).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from ..errors import BackendUnavailableError, InvalidInputError
from ..exits import install_signal_handlers, user_error_message
from .worker import ShardWorker, WorkerConfig, same_record

RETRIES = 3


class RayShardWorker(ShardWorker):
    """The actor: a ShardWorker whose constructor keeps a user-fixable error (graphs that do not load
    on that node, a setup other than the dataset being resumed) and raises it from every call instead.
    Ray reports a constructor that raised as ActorDiedError, which keeps only Ray's traceback text; an
    error raised by a call reaches the driver as itself, and the CLI prints its one line."""

    def __init__(self, config: WorkerConfig, identities: np.ndarray):
        self.refused: BaseException | None = None
        try:
            super().__init__(config, identities)
        except Exception as e:
            if user_error_message(e) is None:
                raise
            self.refused = e

    def record(self) -> tuple[dict, str]:
        if self.refused is not None:
            raise self.refused
        return super().record()

    def run(self, shard: int, progress=None, expect: dict | None = None) -> dict:
        if self.refused is not None:
            raise self.refused
        return super().run(shard, progress, expect)


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


@contextmanager
def ray_actors(config: WorkerConfig, identities: np.ndarray, address: str, workers: int | None, shards: int,
               log: Callable[[str], None]) -> Iterator[tuple[list, dict]]:
    """Start Ray ("local": here, with `workers` CPUs when given; "auto" or HOST:PORT: join a cluster) and
    its actors (at most `shards`); yield them with the run record they resolved, which dataset.json then
    records: the driver may run on a head without a GPU, so only the actors, which open the graphs, know
    how the pixels are made. Actors that resolve different records refuse (with `config.run`, the
    record of the dataset being resumed, each actor compares itself with that)."""
    ray = require_ray()
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
        n = max(1, min(workers or slots, slots, shards))
        log(f"ray: {n} worker(s), one per {'GPU' if gpus else 'CPU slot'}, cluster "
            f"{int(res.get('CPU', 0))} CPU(s), {gpus} GPU(s), {len(ray.nodes())} node(s)")
        actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=RETRIES,
                           max_task_retries=RETRIES)(RayShardWorker)
        ids = ray.put(identities)
        actors = [actor.remote(config, ids) for _ in range(n)]
        yield actors, same_record(ray.get([a.record.remote() for a in actors]))
    finally:
        if started:
            ray.shutdown()


def run_on_ray(actors: list, todo: list[int], record: dict) -> Iterator[dict]:
    """Yield each shard's manifest as one of `actors` (`ray_actors`, which also resolved `record`) commits it."""
    from ray.util import ActorPool

    yield from ActorPool(actors).map_unordered(lambda a, s: a.run.remote(s, expect=record), todo)
