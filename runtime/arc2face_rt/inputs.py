"""What an image is a pure function of, besides the engines and options: the identity (a unit
ArcFace vector, validated and fingerprinted) and the per-image initial latents and step noise, drawn
from (seed, index) alone so that batching never changes an image."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .errors import InvalidInputError
from .npyio import read_npy
from .schedulers import Schedule
from .specs import ID_DIM, LATENT_CHANNELS, LATENT_SIZE


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


IDENTITY_MAX_BYTES = 1 << 20    # a [1, 512] float64 .npy is 4.2 kB; anything near 1 MiB is another file


def load_identity(path: str | Path) -> np.ndarray:
    """An identity .npy ([512] or [1, 512] float) -> unit float32 [512]."""
    emb = read_npy(path, IDENTITY_MAX_BYTES, fix="write one with `arc2face-rt embed --image PHOTO --out id.npy`")
    return normalize_identity(emb, str(path))


def identity_fingerprint(identity: np.ndarray) -> str:
    """16 hex digits of sha256 over the unit float32 identity: tells runs apart, reveals nothing."""
    return hashlib.sha256(normalize_identity(identity).tobytes()).hexdigest()[:16]


def random_identity(seed: int) -> np.ndarray:
    """A random unit vector: a new, non-existent identity (how synthetic face datasets are made)."""
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
