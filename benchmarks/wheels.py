"""Python wheels for a GPU machine without network, carried in pieces that each fit one transfer.

Here (with network):  `python -m benchmarks wheels --out .whl` downloads, for CPython 3.12 on
x86-64 Linux, the packages `gpu-check` needs that a CUDA-13 PyTorch image lacks (diffusers, and
onnxruntime-gpu, a CUDA 13 build that loads CUDA/cuDNN from the torch image's nvidia-* wheels), with
`pip download --no-deps`. It then packs them into folders `.whl/call1`, `.whl/call2`, ... of at most
`--max-mib` each: small wheels whole, a larger wheel cut into numbered pieces spread over folders.
Each folder also holds `wheels.json` (every file's name, size, sha256 and pieces, which folder brings
each file, and its own folder number).

There (offline):  `gpu-check --wheels .whl/callK` calls `install`: the folder's files are added to
a stash that persists on that machine between calls, every wheel whose pieces are all there is
reassembled and checked against its sha256, and complete wheels not yet installed are installed with
`pip install --no-index --no-deps --target SITE`. Calls come in order (call1, call2, ...); a wheel is
installed by the call that completes it. A call that misses a piece an EARLIER folder brought is on a
fresh machine (the stash is gone), or came out of order: `install` reports those pieces as "lost", and
gpu-check stops there. `link_nvidia_libraries` then links the image's nvidia-* library folders into
SITE, where onnxruntime-gpu looks for them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_PACKAGES = ("diffusers==0.42.1", "onnxruntime-gpu==1.31.1")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MANIFEST = "wheels.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def download(packages, dest: Path, python: str = "3.12") -> list[Path]:
    """`pip download --no-deps` of binary wheels for CPython `python` on x86-64 Linux into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + list(packages), check=True)
    return sorted(dest.glob("*.whl"))


def pack(wheels: list[Path], out: Path, max_mib: float = 60.0) -> list[Path]:
    """Spread `wheels` over folders out/call1.. of at most `max_mib` MiB each; return the folders."""
    limit = int(max_mib * 2**20)
    items = []                                 # (file name, bytes) of what goes into the folders
    manifest = {"files": {}}
    for w in sorted(wheels, key=lambda p: p.stat().st_size):
        size = w.stat().st_size
        entry = {"bytes": size, "sha256": _sha256(w), "pieces": []}
        n = -(-size // limit)
        if n == 1:
            items.append((w, None, w.name, size))
        else:
            step = -(-size // n)
            for k in range(n):
                name = f"{w.name}.part{k + 1}of{n}"
                entry["pieces"].append(name)
                items.append((w, (k * step, min(size, (k + 1) * step)), name, min(size, (k + 1) * step) - k * step))
        manifest["files"][w.name] = entry
    folders: list[list] = []
    for item in sorted(items, key=lambda i: -i[3]):   # largest first, into the first folder with room
        for f in folders:
            if sum(i[3] for i in f) + item[3] <= limit:
                f.append(item)
                break
        else:
            folders.append([item])
    for old in out.glob("call*"):
        shutil.rmtree(old)
    dirs = []
    manifest["folders"] = {name: k for k, items_k in enumerate(folders, 1) for _, _, name, _ in items_k}
    for k, items_k in enumerate(folders, 1):
        d = out / f"call{k}"
        d.mkdir(parents=True)
        for src, span, name, _ in items_k:
            if span is None:
                shutil.copyfile(src, d / name)
            else:
                with open(src, "rb") as f:
                    f.seek(span[0])
                    (d / name).write_bytes(f.read(span[1] - span[0]))
        (d / MANIFEST).write_text(json.dumps({**manifest, "folder": k}, indent=1))
        dirs.append(d)
    return dirs


def install(source: Path, stash: Path, site: Path) -> dict:
    """Add `source`'s files to `stash`, reassemble complete wheels, install new ones into `site`.

    Returns {"installed": [...], "already": [...], "waiting": {wheel: missing pieces}}, and "lost": the
    missing pieces that an EARLIER folder brought (folder numbers from `pack`): not in the stash, so
    this machine is not the one the earlier calls ran on (or one of them was skipped), and the wheel
    they belong to can never be completed by the later folders."""
    stash.mkdir(parents=True, exist_ok=True)
    site.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copyfile(f, stash / f.name)
    manifest = json.loads((stash / MANIFEST).read_text())
    done_file = site / ".installed.json"
    done = set(json.loads(done_file.read_text())) if done_file.is_file() else set()
    report = {"installed": [], "already": sorted(done), "waiting": {}}
    for name, entry in manifest["files"].items():
        if name in done:
            continue
        wheel = stash / name
        if entry["pieces"]:
            missing = [p for p in entry["pieces"] if not (stash / p).is_file()]
            if missing:
                report["waiting"][name] = missing
                continue
            with open(wheel, "wb") as out:
                for p in entry["pieces"]:
                    out.write((stash / p).read_bytes())
        if not wheel.is_file() or _sha256(wheel) != entry["sha256"]:
            report["waiting"][name] = ["a complete copy with the recorded sha256"]
            continue
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), str(wheel)], check=True)
        done.add(name)
        report["installed"].append(name)
        for p in entry["pieces"]:                      # the wheel is installed: free the disk
            (stash / p).unlink(missing_ok=True)
    done_file.write_text(json.dumps(sorted(done)))
    here, where = manifest.get("folder"), manifest.get("folders", {})
    if here is not None:
        report["lost"] = sorted(p for missing in report["waiting"].values() for p in missing
                                if where.get(p, here) < here)
    return report


def link_nvidia_libraries(site: Path) -> list[str]:
    """onnxruntime.preload_dlls() looks for the nvidia-* wheels' CUDA/cuDNN libraries next to its own
    package folder; installed into `site` it would not see the torch image's. Link them in (idempotent)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dst = site / "nvidia"
    dst.mkdir(parents=True, exist_ok=True)
    linked = []
    for loc in list(spec.submodule_search_locations):
        if Path(loc).resolve() == dst.resolve():
            continue
        for child in Path(loc).iterdir():
            if child.is_dir() and not (dst / child.name).exists():
                (dst / child.name).symlink_to(child)
                linked.append(str(child))
    return linked
