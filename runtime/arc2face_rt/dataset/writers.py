"""Shard writers: a shard is built out of sight and committed with renames, so a reader (or a run
killed at any moment) never sees half of one.

- `FolderShardWriter` (`--format folders`): images go to `DIR/.shard-NNNNNN.arc2face-HOST-PID-R.tmp/
  id_000123/0007.png` (`.jpg` with `--image-format jpg`); commit renames each finished identity folder to `DIR/id_000123/`.
- `TarShardWriter` (`--format wds`): samples stream into a temporary tar beside `DIR/shard-NNNNNN.tar`
  (WebDataset layout: members `KEY.png` or `KEY.jpg`, `KEY.json`, `KEY.cls` in sample order, written with the
  standard library's tarfile; reading it needs no arc2face-rt); commit links it into place.

Either way the shard's manifest (`DIR/shards/shard-NNNNNN.json`) is written after the commit and is
what marks the shard done. A commit that finds its target already there (a run killed between the
renames and the manifest) keeps it if it has the same bytes and refuses otherwise: nothing is
silently overwritten. Memory holds one image at a time.
"""
from __future__ import annotations

import contextlib
import filecmp
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..atomic import temp_dir, temp_prefix, usual_mode
from ..errors import OutputExistsError
from .spec import identity_dir, image_key, shard_name

_TAR_MTIME = 0           # fixed member times: the same shard gives the same tar bytes


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files or cmp.common_dirs:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in cmp.common_files)


def _conflict(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path}: exists with other content (another run's output?); not overwritten: "
                             "move it away or choose another --out")


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError raised without a file name (a write through a file object: a full disk, a file-size
    limit) names `path`, the output being written, so its one-line message says where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


class FolderShardWriter:
    """ImageFolder layout: DIR/id_000123/0007.png (or .jpg: `ext`)."""

    def __init__(self, out: Path, shard: int, ext: str = "png"):
        self.out, self.ext = out, ext
        self.stage = temp_dir(out, shard_name(shard))
        self.files: list[str] = []
        self.sizes: list[int] = []

    def add(self, j: int, index: int, image: bytes, sample: dict) -> str:
        d = self.stage / identity_dir(j)
        d.mkdir(exist_ok=True)
        name = f"{identity_dir(j)}/{index:04d}.{self.ext}"
        with _naming(self.out / name), open(self.stage / name, "wb") as f:
            f.write(image)
        self.files.append(name)
        self.sizes.append(len(image))
        return name

    def commit(self) -> dict:
        """Move each identity folder into place; {"files": [...], "bytes": [...]} for the manifest."""
        for d in sorted(self.stage.iterdir()):
            for f in d.iterdir():                 # to the disk before the rename makes them visible
                fd = os.open(f, os.O_RDONLY)
                try:
                    with _naming(self.out / d.name / f.name):
                        os.fsync(fd)
                finally:
                    os.close(fd)
            target = self.out / d.name
            try:
                os.rename(d, target)             # fails on a non-empty target: never clobbers
            except OSError:
                if not (target.is_dir() and _same_tree(d, target)):
                    raise _conflict(target) from None
        shutil.rmtree(self.stage)
        return {"files": self.files, "bytes": self.sizes}

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


class TarShardWriter:
    """WebDataset tar shard: DIR/shard-000003.tar with KEY.png (or KEY.jpg: `ext`), KEY.json, KEY.cls per sample."""

    def __init__(self, out: Path, shard: int, ext: str = "png"):
        self.path, self.ext = out / f"{shard_name(shard)}.tar", ext
        fd, tmp = tempfile.mkstemp(dir=out, prefix=temp_prefix(self.path.name), suffix=".tmp")
        os.fchmod(fd, usual_mode())
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, j: int, index: int, image: bytes, sample: dict) -> str:
        key = image_key(j, index)
        with _naming(self.path):
            self._member(f"{key}.{self.ext}", image)
            self._member(f"{key}.json", json.dumps(sample, sort_keys=True).encode())
            self._member(f"{key}.cls", str(j).encode())        # the class label FR trainers read
        self.keys.append(key)
        return key

    def commit(self) -> dict:
        """Close, sync and link the tar into place; {"tar", "bytes", "sha256", "keys"} for the manifest."""
        with _naming(self.path):
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        h = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        try:
            os.link(self.tmp, self.path)         # fails if the name exists: never clobbers
        except FileExistsError:
            if not filecmp.cmp(self.tmp, self.path, shallow=False):
                raise _conflict(self.path) from None
        self.tmp.unlink()
        return {"tar": self.path.name, "bytes": self.path.stat().st_size, "sha256": h.hexdigest(), "keys": self.keys}

    def abort(self) -> None:
        try:
            self.tar.close()
            self.file.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


WRITERS = {"folders": FolderShardWriter, "wds": TarShardWriter}
