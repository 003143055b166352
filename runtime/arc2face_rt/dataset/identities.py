"""The identities of a synthetic dataset: seeded random unit vectors (new, non-existent people),
optionally kept only when no earlier one is too similar, or the rows of a `.npy` of embeddings; and
the noise seed of each identity's images."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InvalidInputError
from ..npyio import read_npy
from ..pipeline import normalize_identity
from ..specs import ID_DIM

MAX_IDENTITIES_FILE_BYTES = 1 << 32          # 2 M float32 embeddings
_DRAWS_PER_IDENTITY = 1000                    # rejection sampling gives up after this many draws per identity


def identity_seed(seed: int, j: int) -> int:
    """The noise seed of identity j's images (image i uses default_rng([identity_seed, i]), as
    `generate --seed` does): each identity gets its own noise, so image i of two identities does
    not share pose, light and background."""
    return int(np.random.default_rng([seed, 0x5EED, j]).integers(2**63 - 1))


def _candidate(seed: int, k: int) -> np.ndarray:
    v = np.random.default_rng([seed, 0x1D, k]).standard_normal(ID_DIM)
    return v / np.linalg.norm(v)


def random_identities(n: int, seed: int, max_similarity: float | None = None,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
    """[n, 512] float32 unit vectors; candidate k is drawn from default_rng([seed, 0x1D, k]) and, with
    `max_similarity`, kept only if its cosine to every identity kept before it is at most that.
    Random 512-d directions are nearly orthogonal (cosine std 1/sqrt(512) = 0.044), so thresholds
    down to ~0.2 cost few rejections for thousands of identities; the check is O(n^2)."""
    if n < 1:
        raise InvalidInputError(f"--identities must be >= 1 (got {n})")
    if max_similarity is not None and n > 1 and max_similarity < -1 / (n - 1):
        # the cosines of n unit vectors sum (over pairs) to at least -n/2: the largest is >= -1/(n-1)
        raise InvalidInputError(f"--max-id-similarity {max_similarity}: no {n} directions are that far apart (the "
                                f"most similar pair of any {n} has a cosine of at least {-1 / (n - 1):.3g}); raise it "
                                "(random identities have cosines around 0 +- 0.044)")
    out = np.empty((n, ID_DIM), np.float64)
    kept, k = 0, 0
    while kept < n:
        v = _candidate(seed, k)
        k += 1
        if max_similarity is None or kept == 0 or float((out[:kept] @ v).max()) <= max_similarity:
            out[kept] = v
            kept += 1
            if progress:
                progress(1)
        elif k > _DRAWS_PER_IDENTITY * n:
            raise InvalidInputError(f"--max-id-similarity {max_similarity}: only {kept} of {n} identities found "
                                    f"in {k} draws; raise it (random identities have cosines around 0 +- 0.044)")
    return out.astype(np.float32)


def load_identities(path: str | Path) -> np.ndarray:
    """A `.npy` of [N, 512] float embeddings -> [N, 512] unit float32 rows."""
    fix = "write an [N, 512] float array with numpy.save"
    a = read_npy(path, MAX_IDENTITIES_FILE_BYTES, fix=fix)
    if a.ndim != 2 or a.shape[1] != ID_DIM or len(a) < 1:
        raise InvalidInputError(f"{path}: shape {a.shape}, expected [N, {ID_DIM}] ArcFace embeddings; {fix}")
    return np.stack([normalize_identity(row, f"{path}: row {j}") for j, row in enumerate(a)])

