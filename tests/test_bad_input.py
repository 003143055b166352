"""Every bad input, through the real command-line tools in a child process, as a user meets them:
exit code 2, one `PROG: error:` line naming the problem, no traceback, nothing written or changed.

Each case builds its inputs in a fresh folder (engines are hard-linked copies of the tiny export; a
case that damages a file replaces it, so the shared export is never touched) and the whole folder is
snapshotted before and after the command.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RT = [sys.executable, "-c", "import sys; from arc2face_rt.cli import main; sys.exit(main())"]
EXPORT = [sys.executable, "-c", "import sys; from arc2face_export.cli import main; sys.exit(main())"]


def snapshot(root: Path) -> dict:
    """{relative path: (kind, size, content hash)} of everything under root (FIFOs are not read)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = (stat.filemode(st.st_mode)[0], 0, os.readlink(p) if p.is_symlink() else "")
    return out


def engines_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    """Give `path` new content without touching the (hard-linked) original."""
    path.unlink()
    path.write_bytes(data)


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m = fn(m)
    replace_file(d / "manifest.json", json.dumps(m).encode())


def _set(path: list, value):
    def fn(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return m
    return fn


def _npy_with_header(p: Path, shape, descr="<f4", payload=b"\0" * 64):
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(payload)


def _npy_raw_header(p: Path, header: str, payload: bytes = b"\0" * 2048):
    """A .npy whose header dict is written verbatim (numpy's writer refuses odd ones)."""
    import struct

    text = (header + "\n").encode("latin1")
    with open(p, "wb") as f:
        if len(text) + 12 < 65536:
            f.write(np.lib.format.magic(1, 0) + struct.pack("<H", len(text)) + text + payload)
        else:
            f.write(np.lib.format.magic(2, 0) + struct.pack("<I", len(text)) + text + payload)


def _corrupt_same_size(d: Path, name: str):
    data = bytearray((d / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    replace_file(d / name, bytes(data))


# Each case: (id, setup(tmp, engines) -> argv list for `arc2face-rt`, expected words in the error line)
GEN = ["generate", "--engines", "{e}", "--steps", "1", "--out", "{t}/out"]
CASES = [
    # identity files
    ("npy-empty", lambda t, e: (t / "id.npy").touch(), GEN + ["--embedding", "{t}/id.npy"], "empty"),
    ("npy-huge-header", lambda t, e: _npy_with_header(t / "id.npy", (10**12,)), GEN + ["--embedding", "{t}/id.npy"],
     "header announces"),
    ("npy-fifo", lambda t, e: os.mkfifo(t / "id.npy"), GEN + ["--embedding", "{t}/id.npy"], "not a regular file"),
    ("npy-folder", lambda t, e: (t / "id.npy").mkdir(), GEN + ["--embedding", "{t}/id.npy"], "folder"),
    ("npy-text", lambda t, e: (t / "id.npy").write_text("hello"), GEN + ["--embedding", "{t}/id.npy"], "not a .npy"),
    ("npy-pickle", lambda t, e: np.save(t / "id.npy", np.array([1, None], object), allow_pickle=True),
     GEN + ["--embedding", "{t}/id.npy"], "Python objects"),
    ("npy-int", lambda t, e: np.save(t / "id.npy", np.ones(512, np.int32)), GEN + ["--embedding", "{t}/id.npy"],
     "dtype"),
    ("npy-zeros", lambda t, e: np.save(t / "id.npy", np.zeros(512, np.float32)), GEN + ["--embedding", "{t}/id.npy"],
     "all zeros"),
    ("npy-big-file", lambda t, e: np.save(t / "id.npy", np.ones((600, 512))), GEN + ["--embedding", "{t}/id.npy"],
     "more than"),
    ("npy-missing", lambda t, e: None, GEN + ["--embedding", "{t}/nope.npy"], "no such file"),
    # options and outputs
    ("batch-0", lambda t, e: None, GEN + ["--random-id", "--batch", "0"], "--batch"),
    ("seed-negative", lambda t, e: None, GEN + ["--random-id", "--seed", "-1"], "--seed"),
    ("guidance-nan", lambda t, e: None, GEN + ["--random-id", "--guidance", "nan"], "--guidance"),
    ("prefix-slash", lambda t, e: None, GEN + ["--random-id", "--prefix", "a/b"], "--prefix"),
    ("prefix-empty", lambda t, e: None, GEN + ["--random-id", "--prefix", ""], "--prefix"),
    ("out-is-file", lambda t, e: (t / "f").write_text("x"),
     ["generate", "--engines", "{e}", "--random-id", "--out", "{t}/f"], "is a file"),
    ("out-under-file", lambda t, e: (t / "f").write_text("x"),
     ["generate", "--engines", "{e}", "--random-id", "--out", "{t}/f/sub"], "cannot be made"),
    ("image-name-is-folder", lambda t, e: (t / "out" / "arc2face_0_0001.png").mkdir(parents=True),
     GEN + ["--random-id", "-n", "3"], "is a folder where image 1 goes"),
    ("image-name-is-folder-resume", lambda t, e: (t / "out" / "arc2face_0_0001.png").mkdir(parents=True),
     GEN + ["--random-id", "-n", "3", "--resume"], "is a folder"),
    ("resume-and-overwrite", lambda t, e: None, GEN + ["--random-id", "--resume", "--overwrite"], "pass one"),
    ("huge-n-collision", lambda t, e: (t / "out" / "arc2face_0_0000.png").parent.mkdir() or
     (t / "out" / "arc2face_0_0000.png").write_bytes(b"x"), GEN + ["--random-id", "-n", str(10**9)], "exist"),
    # engines folders
    ("engines-missing", lambda t, e: None, ["generate", "--engines", "{t}/none", "--random-id", "--out", "{t}/o"],
     "no such engines folder"),
    ("engines-is-file", lambda t, e: (t / "f").write_text("x"),
     ["generate", "--engines", "{t}/f", "--random-id", "--out", "{t}/o"], "engines folder"),
    ("manifest-null", lambda t, e: replace_file(e / "manifest.json", b"null"), GEN + ["--random-id"], "null"),
    ("manifest-list", lambda t, e: replace_file(e / "manifest.json", b"[1, 2]"), GEN + ["--random-id"], "a list"),
    ("manifest-garbage", lambda t, e: replace_file(e / "manifest.json", b"{not json"), GEN + ["--random-id"],
     "unreadable manifest"),
    ("manifest-no-files", lambda t, e: edit_manifest(e, lambda m: (m["stages"]["step_cfg"].pop("files"), m)[1]),
     GEN + ["--random-id"], "files"),
    ("manifest-stages-list", lambda t, e: edit_manifest(e, _set(["stages"], [])), GEN + ["--random-id"], "stages"),
    ("manifest-traversal", lambda t, e: edit_manifest(e, _set(["stages", "projector", "files"],
                                                               {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}})),
     GEN + ["--random-id"], "relative path"),
    ("manifest-absolute", lambda t, e: edit_manifest(e, _set(["stages", "projector", "file"], "/etc/passwd")),
     GEN + ["--random-id"], "projector"),
    ("manifest-int4", lambda t, e: edit_manifest(e, _set(["precision"], "int4")), GEN + ["--random-id"], "int4"),
    ("manifest-revision-string", lambda t, e: edit_manifest(e, _set(["spec_revision"], "1")), GEN + ["--random-id"],
     "not a whole number"),
    ("manifest-bytes-string", lambda t, e: edit_manifest(
        e, lambda m: (m["stages"]["vae_decoder"]["files"]["vae_decoder.onnx"].update(
            bytes=str(m["stages"]["vae_decoder"]["files"]["vae_decoder.onnx"]["bytes"])), m)[1]),
     GEN + ["--random-id"], "not a size"),
    ("manifest-unknown-stage", lambda t, e: edit_manifest(e, lambda m: (m["stages"].update(evil=m["stages"]["step"]),
                                                                        m)[1]), GEN + ["--random-id"], "evil"),
    ("file-loaded-not-checked", lambda t, e: edit_manifest(e, _set(["stages", "step_cfg", "file"], "step.onnx")),
     GEN + ["--random-id"], "not among its checked files"),
    ("symlink-outside", lambda t, e: ((t / "outside.onnx").write_bytes((e / "projector.onnx").read_bytes()),
                                      (e / "projector.onnx").unlink(),
                                      (e / "projector.onnx").symlink_to(t / "outside.onnx")),
     GEN + ["--random-id"], "outside the engines folder"),
    ("corrupt-same-size", lambda t, e: _corrupt_same_size(e, "step_cfg.onnx"), GEN + ["--random-id"],
     "content differs"),
    ("truncated-graph", lambda t, e: replace_file(e / "vae_decoder.onnx", (e / "vae_decoder.onnx").read_bytes()[:999]),
     GEN + ["--random-id"], "truncated"),
    ("graph-missing", lambda t, e: (e / "step.onnx").unlink(), GEN + ["--random-id"], "missing"),
    ("info-traversal", lambda t, e: edit_manifest(e, _set(["stages", "projector", "files"],
                                                           {"../../../etc/hostname": {"sha256": "0" * 64, "bytes": 1}})),
     ["info", "--engines", "{e}", "--verify"], "relative path"),
    ("info-corrupt", lambda t, e: _corrupt_same_size(e, "projector.onnx"), ["info", "--engines", "{e}", "--verify"],
     "content differs"),
    # found by a hostile-input review
    ("npy-subarray-header", lambda t, e: _npy_raw_header(t / "id.npy", "{'descr': ('<f4', (512,)), "
                                                           "'fortran_order': False, 'shape': ()}"),
     GEN + ["--embedding", "{t}/id.npy"], "not a plain array"),
    ("npy-negative-shape", lambda t, e: _npy_with_header(t / "id.npy", (-1, -512)),
     GEN + ["--embedding", "{t}/id.npy"], "not a plain array"),
    ("npy-huge-header", lambda t, e: _npy_raw_header(t / "id.npy", "{'descr': '<f4', 'fortran_order': False, "
                                                       "'shape': (512,)}" + " " * 20000),
     GEN + ["--embedding", "{t}/id.npy"], "not a .npy array"),
    ("steps-out-of-range", lambda t, e: None, GEN + ["--random-id", "--steps", "100000"], "--steps 100000"),
    ("lcm-too-many-steps", lambda t, e: None, GEN + ["--random-id", "--scheduler", "lcm", "--steps", "51"],
     "original_inference_steps"),
    ("guidance-overflows-float32", lambda t, e: None, GEN + ["--random-id", "--guidance", "1e39"], "--guidance"),
    ("prefix-too-long", lambda t, e: None, GEN + ["--random-id", "--prefix", "a" * 200], "shorter --prefix"),
    ("out-empty", lambda t, e: None, ["generate", "--engines", "{e}", "--random-id", "--out", ""], "empty"),
    ("bad-int-option", lambda t, e: None, GEN + ["--random-id", "--batch", "four"], "invalid int"),
    ("resume-foreign-file", lambda t, e: ((t / "out").mkdir(), (t / "out" / "arc2face_0_0001.png").write_text("mine")),
     GEN + ["--random-id", "-n", "3", "--resume"], "not an image this run wrote"),
    ("scheduler-betas-strings", lambda t, e: edit_manifest(e, _set(["scheduler_config", "trained_betas"], ["x"] * 1000)),
     GEN + ["--random-id"], "trained_betas"),
    ("scheduler-huge-train-steps", lambda t, e: edit_manifest(e, _set(["scheduler_config", "num_train_timesteps"],
                                                                      10**9)), GEN + ["--random-id"],
     "num_train_timesteps"),
    ("scheduler-beta-end-2", lambda t, e: edit_manifest(e, _set(["scheduler_config", "beta_end"], 2)),
     GEN + ["--random-id"], "beta_end"),
    ("stages-swapped", lambda t, e: edit_manifest(e, lambda m: (m["stages"].update(
        projector=m["stages"]["vae_decoder"], vae_decoder=m["stages"]["projector"]), m)[1]),
     GEN + ["--random-id"], "is not a 'projector' graph"),
    ("stages-empty", lambda t, e: edit_manifest(e, _set(["stages"], {})), GEN + ["--random-id"],
     "arc2face-export onnx"),
    ("info-scheduler-train-steps-text", lambda t, e: edit_manifest(e, _set(["scheduler_config", "num_train_timesteps"],
                                                                           "abc")),
     ["info", "--engines", "{e}"], "num_train_timesteps"),
    ("info-validation-overflow", lambda t, e: edit_manifest(e, _set(["stages", "projector", "validation", "value"],
                                                                   10**400)),
     ["info", "--engines", "{e}"], "validation record"),
    ("manifest-is-fifo", lambda t, e: ((e / "manifest.json").unlink(), os.mkfifo(e / "manifest.json")),
     GEN + ["--random-id"], "not a regular file"),
    # a folder name over NAME_MAX under a new folder: refused before the models load, no folder left
    ("out-name-too-long", lambda t, e: None, ["generate", "--engines", "{e}", "--steps", "1", "--random-id", "--out",
                                              "{t}/new/" + "y" * 300 + "/y"], "is longer than this file system takes"),
    ("out-name-too-long-in-an-existing-folder", lambda t, e: None, ["generate", "--engines", "{e}", "--steps", "1",
                                                                    "--random-id", "--out", "{t}/" + "y" * 300],
     "is longer than this file system takes"),
    ("embed-out-name-too-long", lambda t, e: None, ["embed", "--image", "{t}", "--out", "{t}/new/" + "y" * 300
                                                    + "/id.npy"], "is longer than this file system takes"),
    ("out-inside-the-engines-folder", lambda t, e: None, GEN[:-1] + ["{e}/images", "--random-id"],
     "is inside the engines folder"),
    ("dataset-out-is-the-engines-folder", lambda t, e: None, ["dataset", "--engines", "{e}", "--identities", "1",
                                                              "--per-identity", "1", "--out", "{e}"],
     "is inside the engines folder"),
    ("embed-models-a-file", lambda t, e: ((t / "m").write_text("x"), Image.new("RGB", (64, 64)).save(t / "p.png")),
     ["embed", "--image", "{t}/p.png", "--out", "{t}/id.npy", "--models", "{t}/m"],
     "m: is a file, not a folder of face models"),
    ("embed-models-empty", lambda t, e: None, ["embed", "--image", "{t}", "--out", "{t}/id.npy", "--models", ""],
     "--models: must not be empty"),
    ("score-detector-empty", lambda t, e: np.save(t / "id.npy", np.ones(512, np.float32)),
     ["score", "--identity", "{t}/id.npy", "{t}", "--detector", ""], "--detector: must not be empty"),
    ("embed-out-under-file", lambda t, e: (t / "f").write_text("x"),
     ["embed", "--image", "{t}", "--out", "{t}/f/id.npy"], "cannot be written"),
    ("embed-max-pixels-inf", lambda t, e: None, ["embed", "--image", "{t}", "--out", "{t}/id.npy", "--max-pixels",
                                                 "inf"], "--max-pixels"),
    ("embed-min-score-2", lambda t, e: None, ["embed", "--image", "{t}", "--out", "{t}/id.npy", "--min-score", "2"],
     "--min-score"),
    ("embed-face-negative", lambda t, e: None, ["embed", "--image", "{t}", "--out", "{t}/id.npy", "--face", "-1"],
     "--face"),
    # identity from files for score
    ("score-bad-identity", lambda t, e: (t / "id.npy").write_bytes(b"\x93NUMPY"), ["score", "--identity", "{t}/id.npy",
                                                                                   "{t}"], "not a .npy"),
    ("embed-out-not-npy", lambda t, e: None, ["embed", "--image", "{t}", "--out", "{t}/id.txt"], ".npy"),
    ("embed-out-is-folder", lambda t, e: (t / "id.npy").mkdir(), ["embed", "--image", "{t}", "--out", "{t}/id.npy"],
     "exist"),
    # found by an exploratory pass: refused only after the images were made, or with advice that fails
    ("out-under-proc", lambda t, e: None, ["generate", "--engines", "{e}", "--steps", "1", "--random-id", "--out",
                                           "/proc/arc2face-out"], "cannot be made"),
    ("overwrite-onto-a-folder", lambda t, e: (t / "out" / "arc2face_0_0001.png").mkdir(parents=True),
     GEN + ["--random-id", "-n", "2", "--batch", "1", "--overwrite"], "is a folder where image 1 goes"),
]


def assert_refused(tool: list[str], prog: str, args: list[str], sandbox: Path, words: str, only_line: bool = False,
                   **run) -> str:
    """Run a CLI in a child: exit 2, a final one-line `PROG: error:` naming `words` (with `only_line`, the
    only line on stderr), no traceback, and the sandbox exactly as before. Returns that line. `run`: more
    subprocess.run arguments."""
    before = snapshot(sandbox)
    r = subprocess.run(tool + args, capture_output=True, text=True, timeout=300, **run)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith(f"{prog}: error:"), r.stderr
    assert len(lines) == 1 or not only_line, r.stderr
    assert words.lower() in lines[-1].lower(), lines[-1]
    assert snapshot(sandbox) == before, "the command changed files"
    return lines[-1]


def _sandbox(tmp_path: Path, tiny_engines: Path) -> tuple[Path, Path]:
    t = tmp_path / "sandbox"
    t.mkdir()
    return t, engines_copy(tiny_engines, t / "engines")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_runtime_cli_refuses(case, tiny_engines, tmp_path):
    _, setup, argv, words = case
    t, e = _sandbox(tmp_path, tiny_engines)
    setup(t, e)
    assert_refused(RT, "arc2face-rt", [a.format(t=t, e=e) for a in argv], t, words)


IMAGE_CASES = [
    ("image-1x1", lambda t: Image.new("RGB", (1, 1)).save(t / "p.png"), "too small"),
    ("image-100000x1", lambda t: Image.new("RGB", (100000, 1)).save(t / "p.png"), "too small"),
    ("image-30000x40", lambda t: Image.new("RGB", (30000, 40)).save(t / "p.png"), "too elongated"),
    ("image-not-an-image", lambda t: (t / "p.png").write_text("hello"), "not an image"),
    ("image-empty", lambda t: (t / "p.png").touch(), "empty"),
    ("image-fifo", lambda t: os.mkfifo(t / "p.png"), "not a regular file"),
    ("image-truncated", lambda t: (Image.new("RGB", (300, 300), (90, 20, 200)).save(t / "full.png"),
                                   (t / "p.png").write_bytes((t / "full.png").read_bytes()[:200]),
                                   (t / "full.png").unlink()), "p.png"),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_embed_refuses_unusable_photos(case, tmp_path):
    from face_fixtures import tiny_models_dir

    _, setup, words = case
    t = tmp_path / "sandbox"
    t.mkdir()
    setup(t)
    last = assert_refused(RT, "arc2face-rt", ["embed", "--image", str(t / "p.png"), "--out", str(t / "id.npy"),
                                              "--models", str(tiny_models_dir()), "--device", "cpu"], t, words)
    assert "usable face" not in last, last            # the cause was the file, not the face


def test_an_engines_folder_whose_name_is_not_utf8(tiny_engines, tmp_path):
    """A folder name with bytes that are not UTF-8 (a Latin-1 name, say): its files are verified (the
    verification stamps hashed the name as UTF-8: a traceback), ONNX Runtime, which cannot open such a
    path, is refused in one line that says so (it blamed the graph), and OpenVINO, which can, generates."""
    from arc2face_rt.backends.openvino import openvino_installed

    t = tmp_path / "sandbox"
    t.mkdir()
    e = engines_copy(tiny_engines, t / os.fsdecode(b"eng\xff"))
    args = ["generate", "--engines", str(e), "--random-id", "-n", "1", "--steps", "1", "--out", str(t / "o")]
    assert_refused(RT, "arc2face-rt", args + ["--backend", "ort"], t, "opens only paths that are valid UTF-8")
    if openvino_installed():
        r = subprocess.run(RT + args + ["--backend", "openvino"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and len(list((t / "o").glob("*.png"))) == 1, r.stderr


def test_info_writes_a_folder_name_that_is_not_utf8_as_its_bytes(tiny_engines, tmp_path):
    """On a UTF-8 terminal (a strict stdout), `info` on such a folder ended in UnicodeEncodeError."""
    e = engines_copy(tiny_engines, tmp_path / os.fsdecode(b"eng\xff"))
    r = subprocess.run([sys.executable, "-c", "import sys; from arc2face_rt.entry import main; sys.exit(main())",
                        "info", "--engines", str(e)], capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0 and r.stdout.startswith(os.fsencode(str(e)) + b": spec revision"), r.stderr


def test_a_file_size_limit_names_its_fix(tiny_engines, tmp_path):
    """EFBIG (`ulimit -f`): the line names the limit to raise, not only "file too large"; the --out folder
    the run made is gone, as nothing was written into it, and the line says to run the command again."""
    import resource

    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))   # noqa: E731
    r = subprocess.run(RT + ["generate", "--engines", str(tiny_engines), "--random-id", "-n", "1", "--steps", "1",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "ulimit -f" in last and last.endswith("none is kept: run the same command again"), \
        r.stderr
    assert not (tmp_path / "o").exists()             # it failed before its first image: no folder left
