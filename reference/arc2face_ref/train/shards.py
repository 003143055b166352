"""Reading the prepared shards for training, in an order that depends only on the seed and the step.

The shards are indexed once (tar member offsets), so any sample can be read directly: that is what
makes resuming exact and the data split independent of the number of processes. Sample number k of
the run (k = micro-step · global micro-batch + position in it; with --grad-accum an optimizer step is
several micro-steps) is sample perm_e[k mod N] with e = k div N
and perm_e a permutation seeded by (seed, e): every epoch is a fresh shuffle, none drops a remainder.
A global batch is cut into per-process slices in rank order; all randomness of a sample (timestep,
noise, VAE sample, ID dropout) comes from a generator seeded by (seed, k), so one process with batch
2b sees exactly what two processes with batch b see together.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from arc2face_rt.errors import InvalidInputError
from arc2face_rt.fileio import loads_json

from .prepare import PLAN_FILE, shard_name, stats_name

_PARTS = ("jpg", "id.npy", "json")

# a damaged shard: `prepare` skips a shard it recorded as finished, so it is redone only once removed
REDO = "delete the shard and its .stats.json, then run `arc2face-train prepare` again to redo it"


@dataclass(frozen=True)
class SampleRef:
    shard: Path
    key: str
    parts: dict            # part name -> (offset, size) in the tar


def data_fingerprint(refs: list[SampleRef]) -> dict:
    """What a resumed run's samples must share with its checkpoint's (their order in the run depends on
    them): their count, and a sha256 over each one's shard name, key and part sizes, so a moved --data
    folder is the same data and a re-prepared or other one is not. The pixels are not read."""
    h = hashlib.sha256()
    for r in refs:
        h.update(json.dumps([r.shard.name, r.key, sorted((k, v[1]) for k, v in r.parts.items())]).encode())
    return {"samples": len(refs), "sha256": h.hexdigest()}


def index_shards(data: str | Path) -> list[SampleRef]:
    """Every complete sample of the shards in `data`, in shard and key order. The folder must be one
    `prepare` finished: every shard of its plan committed (its stats file), and every committed shard
    that records samples present (a missing one was silently trained without)."""
    data = Path(data)
    plan_path = data / PLAN_FILE
    if not plan_path.is_file():
        raise InvalidInputError(f"--data {data}: not a folder written by `arc2face-train prepare` (no {PLAN_FILE})")
    redo = "run the same `arc2face-train prepare` command again"
    try:
        plan = loads_json(plan_path.read_text())
        n_shards = -(-len(plan["files"]) // int(plan["shard_size"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise InvalidInputError(f"{plan_path}: damaged ({' '.join(str(e).split())[:80]}); prepare the data again "
                                "into a new folder") from None
    unfinished = [k for k in range(n_shards) if not (data / stats_name(k)).is_file()]
    if unfinished:
        raise InvalidInputError(f"--data {data}: prepare has committed {n_shards - len(unfinished)} of its {n_shards} "
                                f"shard(s) (no {stats_name(unfinished[0])}); {redo} to finish it")
    refs = []
    for k in range(n_shards):
        shard, stats = data / shard_name(k), data / stats_name(k)
        try:
            written = int(loads_json(stats.read_text())["written"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidInputError(f"{stats}: damaged ({' '.join(str(e).split())[:80]}); move it and "
                                    f"{shard.name} away and {redo} to redo that shard") from None
        if not written:
            continue                       # every photo of this shard was skipped: prepare wrote no tar
        if not shard.is_file():
            raise InvalidInputError(f"{shard}: missing, though {stats.name} records {written} sample(s); move "
                                    f"{stats.name} away and {redo} to redo that shard")
        by_key: dict[str, dict] = {}
        try:
            with tarfile.open(shard) as tf:
                for m in tf.getmembers():
                    key, _, part = m.name.partition(".")
                    by_key.setdefault(key, {})[part] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as e:
            raise InvalidInputError(f"{shard}: unreadable shard ({e}); {REDO}") from None
        complete = [SampleRef(shard, key, parts) for key, parts in sorted(by_key.items())
                    if all(q in parts for q in _PARTS)]
        lacking = next(((k, q) for k, p in sorted(by_key.items()) for q in _PARTS if q not in p), None)
        if lacking or len(complete) != written:     # such a sample was silently trained without
            why = f"sample {lacking[0]} has no {lacking[1]}; " if lacking else ""
            raise InvalidInputError(f"{shard}: {why}it holds {len(complete)} complete sample(s), and {stats.name} "
                                    f"records {written}; move both away and {redo} to redo that shard")
        refs += complete
    if not refs:
        raise InvalidInputError(f"--data {data}: no samples (did prepare skip every photo? see its skipped.txt)")
    return refs


def read_part(ref: SampleRef, part: str) -> bytes:
    offset, size = ref.parts[part]
    with open(ref.shard, "rb") as f:
        f.seek(offset)
        return f.read(size)


def read_id(ref: SampleRef) -> np.ndarray:
    """The sample's ArcFace identity, [512] float32; InvalidInputError for anything else (a damaged or
    foreign shard: not an array, pickled objects, another shape, non-finite values)."""
    bad = f"{ref.shard}: sample {ref.key} has a damaged id.npy"
    try:
        a = np.load(io.BytesIO(read_part(ref, "id.npy")), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidInputError(f"{bad} ({' '.join(str(e).split())[:120]}); {REDO}") from None
    if a.dtype.kind not in "fiu" or a.shape not in ((512,), (1, 512)):
        raise InvalidInputError(f"{bad} (a {a.dtype} array of shape {a.shape}, not 512 numbers); {REDO}")
    a = a.reshape(512).astype(np.float32)
    if not np.isfinite(a).all():
        raise InvalidInputError(f"{bad} (values that are not finite); {REDO}")
    return a


class ShardDataset(torch.utils.data.Dataset):
    """index -> (image [3, R, R] float in [-1, 1], id [512] float32)."""

    def __init__(self, refs: list[SampleRef], resolution: int):
        self.refs, self.resolution = refs, resolution

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        ref = self.refs[i]
        buf = np.frombuffer(read_part(ref, "jpg"), np.uint8)
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if bgr is None:
            raise InvalidInputError(f"{ref.shard}: sample {ref.key} has an undecodable jpg; {REDO}")
        if bgr.shape[:2] != (self.resolution, self.resolution):
            bgr = cv2.resize(bgr, (self.resolution, self.resolution), interpolation=cv2.INTER_AREA)
        img = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 127.5 - 1
        return img, torch.from_numpy(read_id(ref))


def sample_seed(seed: int, k: int) -> int:
    """The seed of run sample number k (SeedSequence: well-mixed, no collisions between nearby k)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class RunSampler(torch.utils.data.Sampler):
    """Per-process batches of dataset indices for micro-steps start_micro, start_micro+1, ...:
    the slice [rank·b, (rank+1)·b) of each global micro-batch (world·b samples)."""

    def __init__(self, n: int, seed: int, batch: int, rank: int, world: int, start_micro: int, end_micro: int):
        self.n, self.seed, self.batch, self.rank, self.world = n, seed, batch, rank, world
        self.start, self.end = start_micro, end_micro
        self._perm: tuple[int, np.ndarray] | None = None

    def sample_numbers(self, micro: int) -> list[int]:
        first = micro * self.world * self.batch + self.rank * self.batch
        return list(range(first, first + self.batch))

    def _index(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.n))
        return int(self._perm[1][pos])

    def __iter__(self):
        for micro in range(self.start, self.end):
            yield [self._index(k) for k in self.sample_numbers(micro)]

    def __len__(self) -> int:
        return self.end - self.start
