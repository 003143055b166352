"""What an image is a pure function of, besides the engines and options: the identity (a unit
ArcFace vector, validated and fingerprinted) and the per-image initial latents and step noise, drawn
from (seed, index) alone so that batching never changes an image."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import checks
from .errors import InvalidInputError
from .npyio import read_npy
from .schedulers import Schedule
from .specs import ID_DIM, IMAGE_SIZE, LATENT_CHANNELS, LATENT_SIZE


def normalize_identity(emb: np.ndarray, source: str = "embedding") -> np.ndarray:
    """Validate an ArcFace embedding ([512] or [1, 512], float, finite, non-zero) -> unit float32 [512]."""
    emb = np.asarray(emb)
    if emb.dtype.kind != "f":
        raise InvalidInputError(f"{source}: dtype {emb.dtype}, expected float32/float64 ArcFace features")
    if emb.shape not in ((ID_DIM,), (1, ID_DIM)):
        raise InvalidInputError(f"{source}: shape {emb.shape}, expected ({ID_DIM},) or (1, {ID_DIM}); "
                                "make one with `arc2face-rt embed --image PHOTO --out id.npy`")
    emb = emb.reshape(ID_DIM).astype(np.float64)
    if not np.all(np.isfinite(emb)):
        raise InvalidInputError(f"{source}: contains NaN or infinity")
    peak = np.abs(emb).max()
    if peak == 0:
        raise InvalidInputError(f"{source}: all zeros; not an identity")
    emb = emb / peak                       # first to the largest entry: the norm of 1e308s would overflow
    return (emb / np.linalg.norm(emb)).astype(np.float32)


MAX_INDEX = 2**63 - 1       # seeds and image indices are numpy SeedSequence entries; this keeps them int64
IDENTITY_MAX_BYTES = 1 << 20    # a [1, 512] float64 .npy is 4.2 kB; anything near 1 MiB is another file


def load_identity(path: str | Path) -> np.ndarray:
    """An identity .npy ([512] or [1, 512] float) -> unit float32 [512]."""
    emb = read_npy(checks.path(path, "identity file"), IDENTITY_MAX_BYTES,
                   fix="write one with `arc2face-rt embed --image PHOTO --out id.npy`")
    return normalize_identity(emb, str(path))


def identity_fingerprint(identity: np.ndarray) -> str:
    """16 hex digits of sha256 over the unit float32 identity: tells runs apart, reveals nothing."""
    return hashlib.sha256(normalize_identity(identity).tobytes()).hexdigest()[:16]


def random_identity(seed: int) -> np.ndarray:
    """A random unit vector: a new, non-existent identity (how synthetic face datasets are made)."""
    if not 0 <= checks.whole(seed, "random_identity seed") <= MAX_INDEX:
        raise InvalidInputError(f"random_identity seed must be in 0..2**63-1 (got {seed})")
    v = np.random.default_rng([seed, 0x1D]).standard_normal(ID_DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def image_noise(seed: int, index: int, schedule: Schedule) -> tuple[np.ndarray, np.ndarray | None]:
    """Initial latents [4, 64, 64] (times init_noise_sigma) and, for samplers that add noise, the
    per-step noise [N, 4, 64, 64]: a function of (seed, index) only, so batching never changes an image."""
    rng = np.random.default_rng([seed, index])
    shape = (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    x = (rng.standard_normal(shape) * schedule.init_noise_sigma).astype(np.float32)
    noise = rng.standard_normal((schedule.steps,) + shape).astype(np.float32) if schedule.uses_noise else None
    return x, noise


def run_items(identities, num_images, indices, seeds, default_seed: int) -> tuple[list, list, list]:
    """The checked arguments of a run of several identities: unit identities [512], one index sequence
    per identity (`indices`, else range(num_images); a range stays a range, never listed), one seed per
    identity (`seeds`, else `default_seed`). Raises InvalidInputError naming the argument."""
    try:
        ids = np.asarray(identities)
    except (ValueError, TypeError):         # rows of different lengths
        raise InvalidInputError(f"identities: not an [M, {ID_DIM}] array (rows of different lengths?)") from None
    if ids.ndim != 2 or len(ids) < 1:
        raise InvalidInputError(f"identities: shape {ids.shape}, expected [M, {ID_DIM}] with M >= 1")
    ids = [normalize_identity(row, f"identity {j}") for j, row in enumerate(ids)]
    num_images = checks.whole(num_images, "num_images")         # checked even where `indices` overrides it
    if indices is None:
        if not 1 <= num_images <= MAX_INDEX:
            raise InvalidInputError(f"num_images must be in 1..2**63-1 (got {num_images})")
        indices = [range(num_images)] * len(ids)
    else:
        indices = [idx if isinstance(idx, range) else [checks.whole(i, "image index") for i in idx]
                   for idx in checks.sequence(indices, "indices", "one sequence of image indices per identity, such as "
                                                           "[[0, 1]] for one identity", nested=True)]
    seeds = [default_seed] * len(ids) if seeds is None else \
        [checks.whole(s, "seed") for s in checks.sequence(seeds, "seeds", "one seed per identity, such as [7]")]
    if len(indices) != len(ids) or len(seeds) != len(ids) or not all(0 <= s <= MAX_INDEX for s in seeds):
        raise InvalidInputError(f"{len(ids)} identities need as many index lists and seeds in 0..2**63-1 "
                                f"(got {len(indices)} and {len(seeds)})")
    bounds = [index_bounds(idx) for idx in indices if idx]      # bool(), not len(): a huge range overflows len()
    if not bounds or min(b[0] for b in bounds) < 0 or max(b[1] for b in bounds) > MAX_INDEX:
        raise InvalidInputError("image indices must be a non-empty list of numbers in 0..2**63-1 "
                                f"(got {[idx if isinstance(idx, range) else idx[:4] for idx in indices[:2]]})")
    return ids, indices, seeds


def index_count(idx: Sequence[int]) -> int:
    """len(idx), also for a range longer than len() takes (2**63 and more indices)."""
    if isinstance(idx, range):
        return (idx[-1] - idx[0]) // idx.step + 1 if idx else 0
    return len(idx)


def index_bounds(idx: Sequence[int]) -> tuple[int, int]:
    """(smallest, largest) of a non-empty index sequence; a range's without listing it."""
    if isinstance(idx, range):
        return min(idx[0], idx[-1]), max(idx[0], idx[-1])
    return min(idx), max(idx)


def run_batches(indices: list, size: int) -> Iterator[list[tuple[int, int]]]:
    """(identity j, image index i) pairs, identity-major, `size` at a time, made as they are needed."""
    batch = []
    for j, idx in enumerate(indices):
        for i in idx:
            batch.append((j, i))
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3   # one uint8 RGB image: 786 kB


def max_images_in_memory() -> int:
    """How many images `generate`/`generate_many` may hold: those whose uint8 arrays fill half of this
    machine's physical memory (the other half is the models', the batch's and the system's). More would
    end in a MemoryError (or the host swapping) after hours of work; knowable before the first step."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):     # no sysconf (Windows): assume 64 GiB
        total = 64 << 30
    return max(1, total // 2 // IMAGE_BYTES)
