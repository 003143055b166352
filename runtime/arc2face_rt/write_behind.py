"""Writing one batch behind the generation: image files are encoded and written by one background thread
while the next batch is generated.

Encoding is not free: a 512x512 photograph takes Pillow 63 ms as a PNG at generate's zlib level (93 ms
at its default, which datasets keep; 1.4 ms as a JPEG) on a 2-core AMD EPYC, half a CPU core or more
per GPU at the 7.3 images/s one H200 generates (README: Making a synthetic FR dataset). Done in turn
with the generation, the GPU would wait for it. Pillow's encoder releases the GIL, and so do ONNX
Runtime, OpenVINO and TensorRT while they run, so the two overlap.

    with WriteBehind() as behind:
        for batch in batches:
            images = generate(batch)
            behind.submit(write_all, images)    # waits for the previous batch's writes first

Writes run in submission order, one batch at a time: at most one batch of images waits in memory
beside the one being generated. A write's error (a full disk) is raised in the caller at the next
`submit` or when the block ends. However the block ends (a Ctrl-C, an error), the writes already
submitted finish before it is left, with further stops held meanwhile (`exits.holding_stops`: a second
Ctrl-C lands once they have): each is atomic (`atomic_write`), so what they wrote is complete, and
whoever reports what was kept counts them.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from .exits import holding_stops


class WriteBehind:
    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arc2face-writer")
        self._pending: Future | None = None

    def drain(self) -> None:
        """Wait for the writes submitted so far; raise the first error of them."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def submit(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` after the previous batch's writes have finished (raising their error here)."""
        self.drain()
        self._pending = self._pool.submit(fn, *args)

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, kind, error, tb) -> None:
        with holding_stops():                   # a stop meanwhile is raised once the writes have ended
            self._pool.shutdown(wait=True)      # waits for the write under way
        if kind is None:
            self.drain()                        # the last batch's error, if any
        self._pending = None                    # the block failed: its own error is kept
