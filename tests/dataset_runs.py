"""Shared by tests/test_dataset*.py: the `arc2face-rt dataset` arguments of the small runs they compare,
and a folder's files for byte-for-byte comparison. The runs themselves are conftest's session fixtures
`wds_run` and `scored_run`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

RT = [sys.executable, "-c", "import sys; from arc2face_rt.cli import main; sys.exit(main())"]
N, K = 4, 2           # the default tests (about a second per tiny image here); the Ray test: the 6 x 3


def dataset_args(engines: Path, out: Path, *extra: str, n: int = N, k: int = K) -> list[str]:
    return ["dataset", "--engines", str(engines), "--identities", str(n), "--per-identity", str(k), "--steps", "1",
            "--batch", "4", "--shard-size", "2", "--seed", "5", "--device", "cpu", "--backend", "ort",
            "--out", str(out), *extra]


def tree(d: Path, skip_run: bool = True) -> dict[str, bytes]:
    """Every file under `d` by relative path; shard manifests without their "run" part (time, worker)
    and summary.json (this run's throughput) left out."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_dir() or p.name == "summary.json":
            continue
        data = p.read_bytes()
        if skip_run and p.parent.name == "shards":
            m = json.loads(data)
            m.pop("run")
            data = json.dumps(m, sort_keys=True).encode()
        out[str(p.relative_to(d))] = data
    return out
