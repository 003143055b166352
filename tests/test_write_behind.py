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
            seen.append(pipe.started.setdefault(b + 1, threading.Event()).wait(60))
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


class _ManyPipe:
    """`iter_many` in batches of 2 images; marks that batch b has started."""

    def __init__(self):
        self.started: dict[int, threading.Event] = {}

    def prepare(self, options):
        pass

    def run_params(self):
        return {"backend": "ort", "precision": "fp32", "engines": "0"}

    def legacy_engine_id(self):
        return None

    def iter_many(self, identities, options, indices, seeds):
        flat = [(j, i) for j, idx in enumerate(indices) for i in idx]
        for b in range(0, len(flat), 2):
            self.started.setdefault(b // 2, threading.Event()).set()
            part = flat[b:b + 2]
            yield GenerationResult(np.zeros((len(part), 8, 8, 3), np.uint8), [{"i": i} for _, i in part], {})


def test_a_dataset_batch_is_written_while_the_next_is_generated(tmp_path, monkeypatch):
    from arc2face_rt.dataset import writers
    from arc2face_rt.dataset.spec import DatasetSpec
    from arc2face_rt.dataset.worker import ShardWorker, WorkerConfig

    spec = DatasetSpec(identities=3, per_identity=2, options=GenerationOptions(batch_size=2), shard_size=3)
    pipe, seen, real = _ManyPipe(), [], writers.FolderShardWriter.add
    added = []

    def add(self, j, index, image, sample):
        b = len(added) // 2
        added.append(1)
        if b < 2:                                       # batches 0, 1 of 0..2: a next batch exists
            seen.append(pipe.started.setdefault(b + 1, threading.Event()).wait(60))
        return real(self, j, index, image, sample)

    monkeypatch.setattr(writers.FolderShardWriter, "add", add)
    (tmp_path / "o" / "shards").mkdir(parents=True)
    worker = ShardWorker(WorkerConfig(out=tmp_path / "o", spec=spec, engines=tmp_path), np.eye(3, 512, dtype=np.float32),
                         pipe=pipe)
    m = worker.run(0)
    assert seen == [True] * 4
    assert [r["file"] for r in m["images"]] == [f"id_{j:06d}/{i:04d}.png" for j in range(3) for i in range(2)]
