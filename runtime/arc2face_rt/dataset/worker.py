"""`ShardWorker`: one loaded pipeline (and face models) that makes whole shards. The same class runs
in-process and as a Ray actor; a shard is a pure function of the spec, the engines and the
identities, so which worker makes it never changes a byte.

Within a shard, identities are batched together (`Arc2FacePipeline.iter_many`), images stream to
the shard writer one batch at a time (encoded and written by a background thread while the next batch
is generated: `write_behind`), and with face models each image is embedded with our ArcFace
path and its cosine to its identity recorded; under `min_similarity` it is dropped (counted), or with
`on_reject="regenerate"` replaced by the identity's next unused index (at most K * max_tries tries).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_write
from ..errors import EngineMismatchError, NoFaceError, OutputExistsError
from ..fileio import loads_json
from ..images import image_bytes
from ..provenance import as_current
from ..write_behind import WriteBehind
from .identities import identity_seed
from .spec import DatasetSpec, shard_name
from .writers import WRITERS

SHARDS_DIR = "shards"
SHARD_FORMAT = "arc2face-rt-dataset-shard"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker opens its models and where it writes (picklable: Ray ships it to each actor)."""
    out: Path
    spec: DatasetSpec
    engines: Path
    backend: str = "auto"
    device: str = "auto"
    verify: bool = True
    cpu_precision: str = "auto"
    models: Path | None = None         # face models folder (scrfd_10g_bnkps.onnx, arcface.onnx)
    run: dict | None = None            # the run record of the dataset being resumed: a worker that would make
                                       # other pixels (a Ray node whose CPU resolves another precision) refuses


def same_record(records: list[tuple[dict, str]]) -> dict:
    """The run record all of `records` (record, who) share; EngineMismatchError naming the first who differs."""
    want, first = records[0]
    for mine, who in records[1:]:
        if mine != want:
            k = next(k for k in sorted(set(mine) | set(want)) if mine.get(k) != want.get(k))
            raise EngineMismatchError(
                f"{who}: this worker would make other pixels than {first} ({k}: {want.get(k)!r} there, "
                f"{mine.get(k)!r} here); run every worker on the same kind of machine, or pin the setting "
                "(--backend, --device, --cpu-precision)")
    return want


def manifest_path(out: Path, shard: int) -> Path:
    return Path(out) / SHARDS_DIR / f"{shard_name(shard)}.json"


def open_face_models(config: WorkerConfig):
    """The `FaceAnalyzer` that scores images (None without face models); `arc2face-rt dataset --ray`
    also opens it once on the driver, so that missing or broken models are refused before --out is touched."""
    if not config.spec.score:
        return None
    from ..face.identity import FaceAnalyzer
    from ..face.models import load_face_models

    det, rec = load_face_models(config.models, device=config.device, engines=config.engines,
                                backend=config.backend, verify=config.verify)
    return FaceAnalyzer(det, rec)


class ShardWorker:
    def __init__(self, config: WorkerConfig, identities: np.ndarray, pipe=None):
        from ..pipeline import Arc2FacePipeline

        self.config, self.identities = config, identities
        self.pipe = pipe or Arc2FacePipeline(config.engines, backend=config.backend, device=config.device,
                                             verify=config.verify, cpu_precision=config.cpu_precision)
        self.pipe.prepare(config.spec.options)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        mine = self.pipe.run_params()
        if config.run is not None:
            same_record([(as_current(config.run, mine, self.pipe.legacy_engine_id()), "the dataset"),
                         (mine, socket.gethostname())])
        self.face = open_face_models(config)
        # what dataset.json records of the models that score (a --resume with others would score the rest
        # differently); hashed once here, not with every shard's record check
        self.face_ids = (self.face.model_ids() or None) if self.face is not None else None

    def record(self) -> tuple[dict, str]:
        """How this worker makes pixels (`Arc2FacePipeline.run_params` once its graphs are open) and, with
        face models, which ones score them (`face_models`); and its name."""
        run = self.pipe.run_params()
        return ({**run, "face_models": self.face_ids} if self.face_ids else run), self.name

    def similarity(self, image: np.ndarray, j: int) -> float | None:
        """ArcFace cosine of `image` to identity j; None when no face is found in it."""
        try:
            emb = self.face.embed_image(image, f"identity {j}")[0]
        except NoFaceError:
            return None
        return float(emb @ self.identities[j])

    def run(self, shard: int, progress: Callable[[int], None] | None = None, expect: dict | None = None) -> dict:
        """Make, write and commit `shard`; return its manifest (also written last, as the commit mark).
        `expect`: the run record the dataset records (`--ray` passes it with every shard: an actor that
        Ray restarted, perhaps on another machine, was never compared with the others); a worker that
        would make other pixels refuses before it writes anything."""
        if expect is not None:
            same_record([(expect, "the dataset's workers"), self.record()])
        c, spec = self.config, self.config.spec
        t0 = time.perf_counter()
        ids = list(spec.shard_identities(shard))
        seeds = {j: identity_seed(spec.options.seed, j) for j in ids}
        need = {j: spec.per_identity for j in ids}
        next_index = {j: 0 for j in ids}
        records: list[dict] = []
        writer = WRITERS[spec.format](Path(c.out), shard, spec.image_format)
        try:
            # a batch's kept images are encoded and written while the next batch is generated (`write_behind`);
            # they are judged here, in turn: ONNX Runtime records its CUDA graphs in global capture mode, which
            # the face models' CUDA calls on another thread (while a new batch size is captured) would spoil
            with WriteBehind() as behind:
                while any(need.values()):                   # one round; regenerated images in the next
                    todo = [j for j in ids if need[j]]
                    indices = [list(range(next_index[j], next_index[j] + need[j])) for j in todo]
                    items = iter([(j, i) for j, idx in zip(todo, indices) for i in idx])
                    for j in todo:
                        next_index[j] += need[j]
                        need[j] = 0
                    for res in self.pipe.iter_many(self.identities[todo], options=spec.options, indices=indices,
                                                   seeds=[seeds[j] for j in todo]):
                        kept = []
                        for image, params in zip(res.images, res.params):
                            j, i = next(items)
                            records.append(self._judge(j, i, image))
                            if records[-1]["kept"]:
                                kept.append((records[-1], image, params))
                            elif spec.on_reject == "regenerate" and \
                                    next_index[j] + need[j] < spec.per_identity * spec.max_tries:
                                need[j] += 1
                            if progress:
                                progress(1)
                        behind.submit(self._write, writer, kept)
            committed = writer.commit()
        except BaseException:
            writer.abort()
            raise
        kept = sum(r["kept"] for r in records)
        manifest = {"format": SHARD_FORMAT, "format_version": 1, "shard": shard, "identities": [ids[0], ids[-1] + 1],
                    "counts": {"generated": len(records), "kept": kept, "dropped": len(records) - kept,
                               "no_face": sum(r["similarity"] is None for r in records) if self.face else 0},
                    **committed, "images": records,
                    "run": {"seconds": round(time.perf_counter() - t0, 3), "worker": self.name}}
        path, data = manifest_path(c.out, shard), json.dumps(manifest, indent=1).encode()
        try:
            atomic_write(path, data, overwrite=False, hint="another run committed this shard meanwhile")
        except OutputExistsError:
            # Another run (a second --resume on the folder) committed this shard meanwhile. Its images
            # passed the writer's byte-for-byte comparison; the same manifest (less its timing) is the
            # same shard, done: as `generate` counts an image another run wrote with the same parameters.
            theirs = _manifest_or_none(path)
            if theirs is None or _less_run(theirs) != _less_run(json.loads(data)):
                raise OutputExistsError(f"{path}: another run committed shard {shard} meanwhile, with other "
                                        "content; not overwritten. Let one run write into a folder at a time") from None
            return theirs
        return manifest

    def _judge(self, j: int, i: int, image: np.ndarray) -> dict:
        """Image i of identity j's record: its similarity (with face models) and whether it is kept."""
        sim = self.similarity(image, j) if self.face else None
        ms = self.config.spec.min_similarity
        return {"identity": j, "index": i, "similarity": sim, "kept": ms is None or (sim is not None and sim >= ms)}

    def _write(self, writer, kept: list[tuple[dict, np.ndarray, dict]]) -> None:
        """Encode and add a batch's kept images to the shard, in order; each record gets its "file"."""
        spec = self.config.spec
        for rec, image, params in kept:
            j, i, sim = rec["identity"], rec["index"], rec["similarity"]
            rec["file"] = writer.add(j, i, image_bytes(image, params, spec.image_format, spec.jpeg_quality),
                                     {"identity": j, "index": i, "similarity": sim, "params": params})

    def close(self) -> None:
        self.pipe.close()


def _less_run(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "run"}


def _manifest_or_none(path: Path) -> dict | None:
    try:
        m = loads_json(path.read_bytes())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None
