"""`arc2face-train prepare`: photos -> our face front end -> WebDataset shards of training samples.

Each photo: decode (EXIF-upright RGB) -> SCRFD -> the largest face (as Arc2Face does) -> ArcFace
embedding of its 112x112 alignment -> the 512x512 training view (crop.py). A sample in a shard is
    KEY.jpg       the training view, JPEG quality 95
    KEY.id.npy    the unit ArcFace embedding, float32 [512]
    KEY.json      {"source", "box", "det_score", "kps", "n_faces"}
Work is split into numbered shards of `shard_size` input photos (img2dataset's scheme): shard k is
committed by writing `shard-k.tar` and then `shard-k.stats.json` (its counts and skipped photos), both
atomically; a later run skips every shard whose stats file exists, so an interrupted run continues
where it stopped and a finished one is a no-op, except that a shard is redone when a photo it skipped
has changed since (its size or modification time: fixed or replaced), so a fixed photo is used (a removed
photo changes the input list, which is refused). `prepare.json` pins the input list, the shard size and
the settings that decide a sample (the face models' sha256, --min-score, --min-size, the image limits):
a run with other photos or settings into the same folder is refused once a shard holds a sample (extra entries that
are no photo files, which an older version's walk left out, do not count: the pinned list is kept).
`skipped.txt` lists every skipped photo with its reason (photos with no usable face, unreadable files);
they are skipped, never fatal. A file name that is not valid UTF-8 is written there as its own bytes.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from arc2face_rt.atomic import atomic_write, is_temp_name, locked_folder, remove_stale_temps
from arc2face_rt.errors import ImageDecodeError, InvalidInputError
from arc2face_rt.face.identity import SKIPPABLE, FaceAnalyzer
from arc2face_rt.face.image_io import check_image_file, expand_paths, load_image
from arc2face_rt.fileio import loads_json
from arc2face_rt.outputs import PROBE_PREFIX, check_output_dir

from .crop import TRAIN_SIZE, train_crop

PLAN_FILE = "prepare.json"
SKIPPED_FILE = "skipped.txt"
JPEG_QUALITY = 95


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.tar"


def stats_name(k: int) -> str:
    return f"shard-{k:05d}.stats.json"


@dataclass(frozen=True)
class PrepareReport:
    photos: int                  # input photos in all
    shards: int                  # shards in all
    shards_done_before: int      # shards an earlier run had committed (not redone)
    written: int                 # samples in all shards
    skipped: list[tuple[str, str]]   # (photo, reason), all shards


def _new_plan(files: list[Path], shard_size: int) -> dict:
    return {"version": 1, "shard_size": shard_size, "size": TRAIN_SIZE, "files": [str(p) for p in files]}


def _plan(out: Path, files: list[Path], shard_size: int, say: Callable[[str], None]) -> tuple[dict | None, list[Path]]:
    """(the plan (prepare.json) to write on a first run, or None on a later run; the photos to use).

    A later run refuses other inputs or another shard size, unless no shard holds a sample yet (say the
    earlier run skipped every photo, given the wrong folder): then it starts again with these. It keeps
    the pinned list when the walk now finds only extra entries that are no photo files (a symbolic link to
    a folder, a dangling link, a pipe; an older version's walk left them out): they would only be
    skipped, so the shards stay the same."""
    plan = _new_plan(files, shard_size)
    path = out / PLAN_FILE
    if not path.exists():
        # anything but our own abandoned temporary files: a data folder holds only what prepare writes
        taken = sorted(p.name for p in out.iterdir() if not _ours(p.name)) if out.is_dir() else []
        if taken:
            raise InvalidInputError(f"{out}: holds {taken[0]}{f' and {len(taken) - 1} more' if len(taken) > 1 else ''}"
                                    f", which prepare did not write (no {PLAN_FILE}); move them away or use a new --out")
        return plan, files
    try:
        old = loads_json(path.read_text())
    except ValueError as e:
        raise InvalidInputError(f"{path}: unreadable ({e}); use a new --out") from None
    if not isinstance(old, dict) or not isinstance(old.get("files", []), list):
        raise InvalidInputError(f"{path}: damaged (not a plan of prepare's); use a new --out")
    if old.get("shard_size") == shard_size and old.get("files") == plan["files"]:
        return None, files
    if not any(out.glob("shard-*.tar")):      # nothing of value: the earlier run found no usable face at all
        say(f"{out}: holds no sample yet: starting again with these --images")
        return plan, files
    if old.get("shard_size") != shard_size:
        raise InvalidInputError(f"{out}: was prepared with --shard-size {old.get('shard_size')}; pass the same to "
                                "continue, or use a new --out")
    then, now = old.get("files") or [], plan["files"]
    gone, new = [f for f in then if f not in set(now)], [f for f in now if f not in set(then)]
    reasons = [] if gone else [_not_a_photo(f) for f in new]
    if reasons and all(reasons):
        say(f"{len(new)} entr{'y' if len(new) == 1 else 'ies'} found now, not in {PLAN_FILE}, left out as before: "
            f"{new[0]!r} {reasons[0]}")
        return None, [Path(f) for f in then]
    which = (f"{gone[0]!r} is gone" if gone else f"{new[0]!r} is new") if gone or new else "their order differs"
    raise InvalidInputError(f"{out}: was prepared from another list of photos ({len(then)} then, {len(now)} now: "
                            f"{which}); pass the same --images with the same photos to continue, or use a new --out")


def _settings(analyzer: FaceAnalyzer) -> dict:
    """What decides a sample besides its photo: the face models (their files' sha256), the detector's
    --min-score, --min-size and the image limits. prepare.json records them."""
    det = analyzer.detector
    return {"face_models": analyzer.model_ids(), "min_score": det.score_threshold if det else None,
            "min_size": analyzer.min_size,
            "limits": asdict(analyzer.limits) if is_dataclass(analyzer.limits) else vars(analyzer.limits)}


def _same_settings(out: Path, settings: dict, no_sample: bool) -> bool:
    """Whether a later run has the settings of the first (a plan from before they were recorded: any
    settings). Other settings are refused once a shard holds a sample (its samples would mix two)."""
    then = loads_json((out / PLAN_FILE).read_text()).get("settings")
    if not isinstance(then, dict) or then == settings:
        return True
    if no_sample:
        return False
    diffs = [f"{k}: {then.get(k)!r} then, {settings[k]!r} now" for k in settings if then.get(k) != settings[k]]
    raise InvalidInputError(f"{out}: was prepared with other settings ({'; '.join(diffs) or repr(then)}); its samples "
                            "would mix two of them: pass the same --models (or --detector, --recognizer), "
                            "--min-score, --min-size and image limits to continue, or use a new --out")


def _ours(name: str) -> bool:
    """A temporary file or folder of ours (a write in progress or abandoned; check_output_dir's probe)."""
    return is_temp_name(name) or name.startswith(PROBE_PREFIX)


def _not_a_photo(path: str) -> str:
    """Why `path` is no photo file (a folder, a link to one or to nothing, a pipe), or "" when it is a file."""
    if os.path.isfile(path):
        return ""
    try:
        check_image_file(path)
    except (ImageDecodeError, InvalidInputError) as e:
        return str(e).removeprefix(f"{path}: ")
    return "not a regular file"        # a race: it became one since


def _sample(analyzer: FaceAnalyzer, path: Path) -> dict:
    """One photo -> the shard entries (bytes), or a SKIPPABLE error."""
    image = load_image(path, analyzer.limits)
    emb, face, n = analyzer.embed_image(image, str(path))
    view = train_crop(image, face.kps)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(view, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    npy = io.BytesIO()
    np.save(npy, np.asarray(emb, np.float32))
    meta = {"source": str(path), "box": [round(float(v), 2) for v in face.box], "det_score": round(face.score, 4),
            "kps": [[round(float(v), 2) for v in p] for p in face.kps], "n_faces": n}
    return {"jpg": jpg.tobytes(), "id.npy": npy.getvalue(), "json": json.dumps(meta).encode()}


def _write_shard(out: Path, k: int, samples: list[dict]) -> None:
    import webdataset as wds

    def render(f):
        with wds.TarWriter(f, encoder=False, mtime=0) as tw:     # fixed mtime: the same photos give the same bytes
            for s in samples:
                tw.write(s)
    atomic_write(out / shard_name(k), render, overwrite=True)   # a stale one from a killed run is redone


def prepare(images: Sequence[str | Path], out: str | Path, analyzer_factory: Callable[[], FaceAnalyzer],
            shard_size: int = 1000, progress: Callable[[int], None] | None = None,
            say: Callable[[str], None] = lambda m: None) -> PrepareReport:
    """Write the shards for `images` (files, folders, globs; folders recursively) into `out`.

    `analyzer_factory` opens the face models; it is called only when a shard is left to do, or to
    compare the settings of a folder that holds no sample yet. `progress(n)`
    is called after each photo with the number done. `out` is made, and locked while the run reads and
    writes it: a second run into the same folder on this machine is refused at once (two runs into one
    new folder both ended well, one's shards replaced by the other's photos). A run that fails before
    its first file removes the folders it made."""
    if shard_size < 1:
        raise InvalidInputError(f"--shard-size must be at least 1 (got {shard_size})")
    files = expand_paths(images, recursive=True)
    out = check_output_dir(out)
    with locked_folder(out, "arc2face-train prepare"):
        return _prepare(files, out, analyzer_factory, shard_size, progress, say)


def _prepare(files: list[Path], out: Path, analyzer_factory: Callable[[], FaceAnalyzer], shard_size: int,
             progress: Callable[[int], None] | None, say: Callable[[str], None]) -> PrepareReport:
    plan, files = _plan(out, files, shard_size, say)
    n_shards = -(-len(files) // shard_size)
    todo = [k for k in range(n_shards) if plan is not None or not _done(out, k)]   # a new plan: every shard
    if len(todo) < n_shards:
        say(f"{n_shards - len(todo)} of {n_shards} shard(s) already done; continuing with the rest")
    no_sample = not any(out.glob("shard-*.tar"))
    # face models opened when a shard is left to do, or to compare the settings of a folder that holds no
    # sample yet (other settings may find faces the first did not); refused, they leave --out as it was
    analyzer = analyzer_factory() if todo or (plan is None and no_sample and n_shards) else None
    if analyzer is not None:
        settings = _settings(analyzer)
        if plan is None and not _same_settings(out, settings, no_sample):
            say(f"{out}: holds no sample yet: starting again with these settings")
            plan, todo = _new_plan(files, shard_size), list(range(n_shards))
        if plan is not None:
            plan["settings"] = settings
    remove_stale_temps(out)
    if plan is not None:
        for stats in out.glob("shard-*.stats.json"):         # an earlier run's, which kept no sample: redo those
            stats.unlink()
        atomic_write(out / PLAN_FILE, json.dumps(plan, indent=1).encode(), overwrite=True)
    for k in todo:
        samples, skipped = [], []
        for i, path in enumerate(files[k * shard_size:(k + 1) * shard_size]):
            try:
                s = _sample(analyzer, path)
            except SKIPPABLE as e:
                skipped.append({"path": str(path), "reason": str(e), "stat": _signature(path)})
            else:
                samples.append({"__key__": f"{k * shard_size + i:09d}", **s})
            if progress:
                progress(1)
        if samples:
            _write_shard(out, k, samples)
        stats = {"shard": k, "photos": len(samples) + len(skipped), "written": len(samples), "skipped": skipped}
        atomic_write(out / stats_name(k), json.dumps(stats, indent=1).encode(), overwrite=True)
    return _summarise(out, len(files), n_shards, n_shards - len(todo))


def _signature(path: str | Path) -> list[int] | None:
    """What tells a changed photo: [size, mtime_ns], or None when it cannot be stat()ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def _done(out: Path, k: int) -> bool:
    """Shard k is committed and none of the photos it skipped has changed since."""
    try:
        stats = loads_json((out / stats_name(k)).read_text())
        return all(s.get("stat") == _signature(s["path"]) for s in stats["skipped"])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True          # damaged: _summarise says what to do with it


def _line(path: str, reason: str) -> bytes:
    """One skipped.txt line; a non-UTF-8 file name (held as surrogates) goes back to its own bytes."""
    text = f"{path}\t{' '.join(reason.split())}\n"
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _summarise(out: Path, photos: int, n_shards: int, done_before: int) -> PrepareReport:
    written, skipped = 0, []
    for k in range(n_shards):
        try:
            stats = loads_json((out / stats_name(k)).read_text())
            written += int(stats["written"])
            skipped += [(str(s["path"]), str(s["reason"])) for s in stats["skipped"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInputError(f"{out / stats_name(k)}: damaged ({' '.join(str(e).split())[:80]}); move it "
                                    "and its shard away and run the same command to prepare that shard again") from None
    text = b"".join(_line(p, r) for p, r in skipped)
    path = out / SKIPPED_FILE
    if not path.is_file() or path.read_bytes() != text:
        atomic_write(path, text, overwrite=True)
    return PrepareReport(photos, n_shards, done_before, written, skipped)
