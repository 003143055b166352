"""`GenerationOptions`: what to generate, one field per `arc2face-rt generate` flag that changes the
images (and `--batch`, which does not), checked in one place."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import checks
from .errors import InvalidInputError
from .schedulers import SCHEDULERS
from .specs import DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS

MAX_GUIDANCE = 100.0        # CFG scales beyond this are a typo, not a setting (1e39 overflows float32)


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate; each field is one `arc2face-rt generate` flag."""
    steps: int = DEFAULT_STEPS            # --steps: denoising steps
    guidance: float = DEFAULT_GUIDANCE    # --guidance: CFG scale; <= 1 runs the no-CFG step graph
    scheduler: str = DEFAULT_SCHEDULER    # --scheduler: dpmpp2m | ddim | euler | lcm
    seed: int = 0                         # --seed: image i uses numpy default_rng([seed, i])
    # --batch: images per graph call (the same noise; another batch size may move a pixel by one grey level)
    batch_size: int = DEFAULT_BATCH

    def check(self) -> None:
        for name in ("steps", "seed", "batch_size"):
            checks.whole(getattr(self, name), f"GenerationOptions.{name}")
        guidance = checks.real(self.guidance, "GenerationOptions.guidance")    # a float: Fraction, numpy too
        if self.steps < 1:
            raise InvalidInputError(f"--steps must be >= 1 (got {self.steps})")
        if self.scheduler not in SCHEDULERS:
            raise InvalidInputError(f"--scheduler must be one of {', '.join(SCHEDULERS)} (got {self.scheduler!r})")
        if not np.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
            raise InvalidInputError(f"--guidance must be a number in 0..{MAX_GUIDANCE:g} (got {self.guidance}; "
                                    f"Arc2Face uses {DEFAULT_GUIDANCE}, and images saturate well below {MAX_GUIDANCE:g})")
        if self.batch_size < 1:
            raise InvalidInputError(f"--batch must be >= 1 (got {self.batch_size})")
        if not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"--seed must be in 0..2**63-1 (got {self.seed})")


def checked_options(options) -> GenerationOptions:
    """`options` checked, with numpy scalars made Python numbers (what the PNGs record as JSON)."""
    if not isinstance(options, GenerationOptions):
        raise InvalidInputError(f"options must be a GenerationOptions, got {type(options).__name__}")
    options.check()
    return replace(options, steps=int(options.steps), guidance=float(options.guidance), seed=int(options.seed),
                   batch_size=int(options.batch_size))
