"""Image files are written while the next batch is generated (`write_behind`), in order, with a write's
error raised in the caller and every submitted write finished however the run ends."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from arc2face_rt import folder_run
from arc2face_rt.folder_run import FolderRun
from arc2face_rt.pipeline import GenerationOptions, GenerationResult
from arc2face_rt.write_behind import WriteBehind


class _Pipe:
    """Batches of black images; generate() marks that batch b has started."""

    def __init__(self, fail_at: int | None = None):
        self.started: dict[int, threading.Event] = {}
        self.fail_at = fail_at

    def generate(self, identity, options, on_step=None, indices=(), **kw):
        b = indices[0] // options.batch_size
        self.started.setdefault(b, threading.Event()).set()
        if b == self.fail_at:
            raise KeyboardInterrupt
        n = len(indices)
        return GenerationResult(np.zeros((n, 8, 8, 3), np.uint8), [{"index": i} for i in indices], {"denoise": 0.0})


def test_a_batch_is_written_while_the_next_is_generated(tmp_path, monkeypatch):
    """Each write of batch b waits (up to 10 s) for batch b+1's generation to start: written in turn with
    the generation, as before, no write would see it start."""
    pipe, opts, seen = _Pipe(), GenerationOptions(batch_size=2, seed=0), []
    real = folder_run.save_png

    def save(path, image, params, overwrite=False):
        b = params["index"] // 2
        if b < 2:                                         # batches 0, 1 of 0..2: a next batch exists
            seen.append(pipe.started.setdefault(b + 1, threading.Event()).wait(10))
        assert threading.current_thread() is not threading.main_thread()
        return real(path, image, params, overwrite=overwrite)

    monkeypatch.setattr(folder_run, "save_png", save)
    s = FolderRun(out=tmp_path / "o", count=6).write(pipe, np.zeros(512, np.float32), opts, {}, log=lambda m: None)
    assert seen == [True] * 4 and s.written == 6
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [f"arc2face_0_{i:04d}.png" for i in range(6)]


def test_a_stop_keeps_every_submitted_write_and_counts_it(tmp_path, monkeypatch):
    said = []
    pipe = _Pipe(fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        FolderRun(out=tmp_path / "o", count=6).write(pipe, np.zeros(512, np.float32),
                                                      GenerationOptions(batch_size=2, seed=0), {}, log=said.append)
    assert len(list((tmp_path / "o").glob("*.png"))) == 4 and not list((tmp_path / "o").glob(".*"))
    assert "stopped after 4 of 6 image(s)" in said[-1]


def test_write_errors_reach_the_caller_in_order():
    order = []

    def write(k):
        order.append(k)
        if k == 1:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        with WriteBehind() as behind:
            behind.submit(write, 0)
            behind.submit(write, 1)
            behind.submit(write, 2)        # raises batch 1's error before submitting
    assert order == [0, 1]
    with pytest.raises(OSError):
        with WriteBehind() as behind:
            behind.submit(write, 1)         # raised when the block ends
    done = []
    with pytest.raises(ValueError):
        with WriteBehind() as behind:
            behind.submit(lambda: (threading.Event().wait(0.2), done.append(1)))
            raise ValueError("the block's own error is kept; the write still finishes first")
    assert done == [1]
