"""A run of images written into a folder (`arc2face-rt generate`): checked before any work, batched
so that a resumed run gives the same bytes, stopped cleanly with everything finished kept.

    run = FolderRun(out=Path("faces"), count=20, prefix="arc2face", resume=True)
    existing = run.check(seed=0)                 # before any model is loaded
    run.check_resume(pipe, identity, options, existing)   # before pipe.prepare() opens the graphs
    summary = run.write(pipe, identity, options, existing, log=print)
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .atomic import remove_stale_temps, undo_new_folders
from .errors import InvalidInputError, OutputExistsError
from .exits import resumable
from .images import save_png
from .outputs import check_names, check_output_dir, existing_images, image_name, is_same_image, plan_resume
from .write_behind import WriteBehind


def batches(count: int, batch: int, done: set[int]) -> Iterator[list[int]]:
    """Indices 0..count-1 in batches aligned to multiples of `batch`, leaving out batches whose
    images are all `done`; lazy, so a huge count costs nothing up front. A partly done batch is made
    whole again (only its missing images are written), so every image comes from the same batch
    as in an uninterrupted run: a resumed run gives the same bytes."""
    for start in range(0, count, batch):
        idx = range(start, min(start + batch, count))
        if not all(i in done for i in idx):
            yield list(idx)


def batches_to_run(count: int, batch: int, done: set[int]) -> int:
    full = Counter(i // batch for i in done)
    skipped = sum(1 for k, n in full.items() if n == min(batch, count - k * batch))
    return math.ceil(count / batch) - skipped


@dataclass
class RunSummary:
    written: int = 0
    skipped: int = 0                  # finished before this run (--resume)
    made_elsewhere: int = 0           # written meanwhile by another process with the same parameters
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FolderRun:
    """Where and how a run writes; each field is one `generate` flag."""
    out: Path
    count: int                        # -n
    prefix: str = "arc2face"          # --prefix
    resume: bool = False              # --resume
    overwrite: bool = False           # --overwrite
    again: str | None = None          # how to finish after a stop (default: the same command with --resume)

    def check(self, seed: int) -> dict[int, Path]:
        """Everything about the output that can be wrong, before any work; returns the entries that
        already carry this run's names ({index: path})."""
        if self.count < 1:
            raise InvalidInputError(f"-n must be >= 1 (got {self.count})")
        if self.resume and self.overwrite:
            raise InvalidInputError("--resume keeps finished images and --overwrite replaces them: pass one of them")
        check_names(self.prefix, seed, self.count)
        check_output_dir(self.out)
        existing = existing_images(self.out, self.prefix, seed, self.count)
        for i, path in sorted(existing.items()):      # neither --resume nor --overwrite replaces these
            if path.is_dir() or path.is_symlink():
                raise InvalidInputError(f"{path}: is a {'folder' if path.is_dir() else 'symbolic link'} where "
                                        f"image {i} goes; move it away or choose another --out/--prefix")
        if existing and not (self.overwrite or self.resume):
            first = existing[min(existing)]
            raise OutputExistsError(f"{first} (and {len(existing) - 1} more of this run's names) exist; pass "
                                    "--resume to finish an interrupted run, --overwrite to replace them, or choose "
                                    "another --out, --seed or --prefix")
        return existing

    def check_resume(self, pipe, identity: np.ndarray, options, existing: dict[int, Path], control=None) -> set[int]:
        """--resume: the indices among `existing` that are finished images of this run; an image made with
        other parameters is refused. `pipe` need not have opened a graph (`Arc2FacePipeline.run_params`
        is known before), so `generate` calls this before it loads anything, and `write` again after."""
        if not self.resume:
            return set()
        kw = {} if control is None else {"control": control}
        return plan_resume(existing, lambda i: pipe.image_params(options, i, identity, **kw), pipe.legacy_engine_id())

    def write(self, pipe, identity: np.ndarray, options, existing: dict[int, Path],
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr), progress=None,
              control=None) -> RunSummary:
        """Generate the missing images into the folder. `progress(total_steps)` returns a tqdm-like bar.
        `control`: the run's ControlNet condition (`control.Control`) or None.
        Raises OutputWriteError (naming what was kept) when the disk fills or a write fails."""
        kw = {} if control is None else {"control": control}
        done = self.check_resume(pipe, identity, options, existing, control)
        s = RunSummary(skipped=len(done))
        todo = self.count - len(done)
        runs = batches_to_run(self.count, options.batch_size, done)
        with undo_new_folders(self.out):       # a run that fails before its first image leaves no new folder
            removed = remove_stale_temps(self.out)
            if removed:
                log(f"removed {removed} temporary file(s) an interrupted run left in {self.out}")
            bar = progress(runs * options.steps) if progress else None
            t0 = time.perf_counter()
            def kept() -> str:
                if not s.written:
                    return f"stopped before the first of {todo} image(s) was finished; none is kept"
                return f"stopped after {s.written} of {todo} image(s), which are kept in {self.out}, none half-written"

            def again() -> str | None:          # None: resumable's default, the same command with --resume
                return self.again or (None if s.written else "run the same command again")
            # the PNGs of a batch are written while the next one is generated (`write_behind`); every
            # write submitted has finished before `resumable` says what was kept
            with resumable(kept, log, bar, again), WriteBehind() as behind:
                for idx in batches(self.count, options.batch_size, done):
                    res = pipe.generate(identity, options=options, on_step=bar.update if bar else None, indices=idx,
                                        **kw)
                    behind.submit(self._save_batch, res, idx, done, options.seed, s)
                    for k, v in res.timings.items():
                        s.timings[k] = s.timings.get(k, 0.0) + v
        s.seconds = time.perf_counter() - t0
        return s

    def _save_batch(self, res, idx: list[int], done: set[int], seed: int, s: RunSummary) -> None:
        for img, params, i in zip(res.images, res.params, idx):
            if i not in done:
                self._save(img, params, seed, i, s)

    def _save(self, img, params: dict, seed: int, index: int, s: RunSummary) -> None:
        path = self.out / image_name(self.prefix, seed, index)
        try:
            save_png(path, img, params, overwrite=self.overwrite)
            s.written += 1
        except OutputExistsError:
            # Another process wrote this name meanwhile (two runs into one folder). The same image with
            # the same parameters is as good as ours; anything else is not ours to replace.
            if not is_same_image(path, params):
                raise OutputExistsError(f"{path}: was written by another process during this run, with other "
                                        "parameters; not overwritten. Let one run write into a folder at a time, "
                                        "or give each its own --out/--prefix") from None
            s.made_elsewhere += 1
