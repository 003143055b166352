"""Bad input to `arc2face-export` (and its write failures), through the real command in a child
process: exit code 2, one `arc2face-export: error:` line, no traceback, nothing written or changed
(the harness is test_bad_input's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_bad_input import EXPORT, _sandbox, assert_refused, engines_copy, replace_file


def model_copy(m: Path, dst: Path) -> Path:
    """A model folder whose files are hard links to the tiny checkpoint's (change them with replace_file)."""
    return engines_copy(m, dst)


def _torch_save(obj, path: Path) -> None:
    import torch

    path.unlink()                                  # a hard-linked copy: never write through to the original
    torch.save(obj, path)


def _int32_weights(path: Path) -> None:
    """`path`'s safetensors with every tensor cast to int32 (same names and shapes)."""
    from safetensors.torch import load_file, save_file

    state = {k: v.to(__import__("torch").int32) for k, v in load_file(str(path)).items()}
    path.unlink()                                  # a hard-linked copy: never write through to the original
    save_file(state, str(path))


def _edit_json(path: Path, **changes) -> None:
    replace_file(path, json.dumps({**json.loads(path.read_text()), **changes}).encode())


def _fake_checkpoint(d: Path, extra: str | None = None) -> None:
    d.mkdir()
    (d / "RANDOM_WEIGHTS.txt").write_text("x")
    if extra:
        (d / extra).write_text("mine")


# Each case: (id, setup(sandbox, tiny model dir), argv of `arc2face-export` run in the sandbox, words)
EXPORT_CASES = [
    ("onnx-out-is-file", lambda t, m: (t / "f").write_text("x"), ["onnx", "--model-dir", "{t}/m", "--out", "{t}/f"],
     "is a file"),
    ("onnx-no-model", lambda t, m: None, ["onnx", "--model-dir", "{t}/none", "--out", "{t}/e"], "no such model folder"),
    ("onnx-out-empty", lambda t, m: None, ["onnx", "--model-dir", "{m}", "--out", ""], "must not be empty"),
    ("onnx-force-user-folder", lambda t, m: ((t / "f").mkdir(), (t / "f" / "notes.txt").write_text("x")),
     ["onnx", "--model-dir", "{m}", "--out", "{t}/f", "--force"], "not an engines folder"),
    ("onnx-force-foreign-manifest", lambda t, m: ((t / "f").mkdir(), (t / "f" / "manifest.json").write_text("{}"),
                                                  (t / "f" / "projector.onnx").write_text("x")),
     ["onnx", "--model-dir", "{m}", "--out", "{t}/f", "--force"], "not an engines manifest"),
    ("onnx-size-mismatch", lambda t, m: _edit_json(model_copy(m, t / "m2") / "vae" / "config.json", layers_per_block=2),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "does not match"),
    # parts each valid on their own (matching weights or not) that are not one Arc2Face model
    ("onnx-unet-for-8-channel-latents", lambda t, m: _edit_json(model_copy(m, t / "m2") / "arc2face" / "config.json",
                                                                in_channels=8, out_channels=8),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "arc2face/config.json: in_channels is 8, where Arc2Face"),
    ("onnx-vae-latent-channels", lambda t, m: _edit_json(model_copy(m, t / "m2") / "vae" / "config.json",
                                                         latent_channels=8),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "vae/config.json: latent_channels is 8"),
    ("onnx-encoder-of-another-width", lambda t, m: _edit_json(model_copy(m, t / "m2") / "encoder" / "config.json",
                                                              hidden_size=1024),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "encoder/config.json: hidden_size is 1024"),
    ("onnx-vae-scale-null", lambda t, m: _edit_json(model_copy(m, t / "m2") / "vae" / "config.json",
                                                    scaling_factor=None),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "scaling_factor is None, not a positive number"),
    ("onnx-vae-scale-0", lambda t, m: _edit_json(model_copy(m, t / "m2") / "vae" / "config.json", scaling_factor=0),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "scaling_factor is 0, not a positive number"),
    ("onnx-encoder-eps-null", lambda t, m: _edit_json(model_copy(m, t / "m2") / "encoder" / "config.json",
                                                      layer_norm_eps=None),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "layer_norm_eps is None, not a positive number"),
    ("onnx-config-list", lambda t, m: replace_file(model_copy(m, t / "m2") / "vae" / "config.json", b"[1, 2]"),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "not a model config"),
    ("onnx-config-unbuildable", lambda t, m: _edit_json(model_copy(m, t / "m2") / "arc2face" / "config.json",
                                                        block_out_channels=[32]),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "cannot be built"),
    ("onnx-encoder-garbage", lambda t, m: replace_file(model_copy(m, t / "m2") / "encoder" / "pytorch_model.bin",
                                                       b"garbage" * 100),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "pytorch_model.bin: unreadable"),
    ("onnx-encoder-a-list", lambda t, m: _torch_save([1, 2], model_copy(m, t / "m2") / "encoder" / "pytorch_model.bin"),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "pytorch_model.bin: holds list, not a model's weights"),
    ("onnx-unet-weights-int32", lambda t, m: _int32_weights(model_copy(m, t / "m2") / "arc2face" /
                                                            "diffusion_pytorch_model.safetensors"),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "more tensors are not floating point"),
    ("onnx-scheduler-list", lambda t, m: replace_file(model_copy(m, t / "m2") / "scheduler" / "scheduler_config.json",
                                                      b"[]"),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "not a scheduler config object"),
    ("onnx-scheduler-not-a-number", lambda t, m: _edit_json(model_copy(m, t / "m2") / "scheduler" /
                                                            "scheduler_config.json", num_train_timesteps="x"),
     ["onnx", "--model-dir", "{t}/m2", "--out", "{t}/e2"], "scheduler_config.json: unusable"),
    ("checkpoint-out-is-file", lambda t, m: (t / "f").write_text("x"), ["random-checkpoint", "--out", "{t}/f"],
     "is a file"),
    ("openvino-int8-engines-empty", lambda t, m: None, ["openvino-int8", "--engines", ""], "must not be empty"),
    ("checkpoint-out-empty", lambda t, m: None, ["random-checkpoint", "--out", ""], "must not be empty"),
    ("checkpoint-force-current-folder", lambda t, m: (t / "notes.txt").write_text("x"),
     ["random-checkpoint", "--out", ".", "--force"], "current folder"),
    ("checkpoint-force-current-folder-spelled", lambda t, m: (t / "sub").mkdir(),
     ["random-checkpoint", "--out", "sub/..", "--force"], "current folder"),
    ("checkpoint-force-ancestor", lambda t, m: None, ["random-checkpoint", "--out", "..", "--force"],
     "contains the current folder"),
    ("checkpoint-force-user-folder", lambda t, m: ((t / "u").mkdir(), (t / "u" / "a.txt").write_text("x")),
     ["random-checkpoint", "--out", "u", "--force"], "not a random checkpoint"),
    ("checkpoint-force-checkpoint-with-user-file", lambda t, m: _fake_checkpoint(t / "u", "notes.txt"),
     ["random-checkpoint", "--out", "{t}/u", "--force"], "notes.txt"),
    ("checkpoint-seed-huge", lambda t, m: None, ["random-checkpoint", "--out", "{t}/c", "--seed", str(2**70)],
     "--seed"),
    ("demo-n-0", lambda t, m: None, ["demo", "--out", "{t}/d", "-n", "0"], "-n must be"),
    ("demo-steps-5000", lambda t, m: None, ["demo", "--out", "{t}/d", "--steps", "5000"], "--steps"),
    ("demo-seed-huge", lambda t, m: None, ["demo", "--out", "{t}/d", "--seed", str(2**64)], "--seed"),
    ("demo-foreign-model-folder", lambda t, m: ((t / "d" / "model-tiny").mkdir(parents=True),
                                                (t / "d" / "model-tiny" / "mine.txt").write_text("x")),
     ["demo", "--out", "{t}/d"], "the demo writes its model there"),
    ("demo-foreign-engines-folder", lambda t, m: ((t / "d" / "engines-tiny-fp32").mkdir(parents=True),
                                                  (t / "d" / "engines-tiny-fp32" / "notes.txt").write_text("x")),
     ["demo", "--out", "{t}/d"], "not an engines folder"),
    ("build-unknown-stage", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--no-face", "--stages", "bogus"], "invalid choice"),
    ("build-stage-not-in-the-folder", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--no-face", "--stages", "step_cfg_control"],
     "not in"),
    ("build-opt-batch-outside-the-profile-before-any-export", lambda t, m: None,
     ["build-engines", "--model-dir", "{m}", "--out", "{t}/new", "--precision", "fp32", "--no-face",
      "--opt-batch", "20"], "outside the batch profile"),
    ("build-opt-batch-for-stages-without-a-batch", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--no-face", "--stages", "projector",
      "--opt-batch", "4"], "--stages builds none of them"),
    ("onnx-ort-cuda-for-stages-without-fused-graphs", lambda t, m: None,
     ["onnx", "--model-dir", "{m}", "--out", "{t}/e2", "--precision", "fp16", "--stages", "projector", "--ort-cuda"],
     "--stages exports none of them"),
    ("build-compute-capability-unknown", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--no-face", "--compute-capability", "99.9"],
     "cannot target"),
    ("build-compute-capability-garbage", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--compute-capability", "abc"], "--compute-capability"),
    ("build-workspace-negative", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--workspace-mib", "-5"], "--workspace-mib"),
    ("build-batch-huge", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--batch", "100000000000"], "--batch"),
    ("build-refused-by-the-library", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--no-face", "--stages", "projector", "--batch",
      "1,1,256", "--workspace-mib", "1"], "could not build"),
    ("build-quantisation-options-with-fp32", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--no-face", "--calib-data", "{t}/none.npz",
      "--quant-level", "2", "--calib-steps", "4"], "--calib-data, --calib-steps, --quant-level: quantisation options"),
    ("build-pipeline-calibration-options-with-calib-data", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "int8", "--no-face", "--calib-data", "{t}/none.npz",
      "--calib-steps", "4", "--calib-identities", "2"], "--calib-identities, --calib-steps: settings of the pipeline"),
    ("build-face-models-missing", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--face-models", "{t}/none"], "no such folder"),
    ("build-face-models-none-there", lambda t, m: (t / "faces").mkdir(),
     ["build-engines", "--out", "{e}", "--precision", "fp32", "--face-models", "{t}/faces"], "neither face model"),
    ("build-other-precision", lambda t, m: None, ["build-engines", "--out", "{e}", "--precision", "fp16"],
     "holds fp32 graphs"),
    ("build-fp8-for-ampere", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "fp8", "--compute-capability", "8.0,8.9"], "8.9 or newer"),
    ("build-smoothquant-alpha-2", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "int8", "--smoothquant-alpha", "2"], "--smoothquant-alpha"),
    ("build-calib-percentile-10", lambda t, m: None,
     ["build-engines", "--out", "{e}", "--precision", "int8", "--calib-percentile", "10"], "--calib-percentile"),
]


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_cli_refuses(case, tiny_model_dir, tiny_engines, tmp_path):
    _, setup, argv, words = case
    t, e = _sandbox(tmp_path, tiny_engines)
    setup(t, tiny_model_dir)
    # random-checkpoint is refused before it says what it writes: the error is the only line
    assert_refused(EXPORT, "arc2face-export", [a.format(t=t, e=e, m=tiny_model_dir) for a in argv], t, words, cwd=t,
                   only_line=argv[0] == "random-checkpoint")


def _file_size_limit(nbytes: int):
    """preexec_fn: `ulimit -f` for the child (Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


# A write that fails half-way (file-size limit): one line naming the file, no temporary left, nothing changed
WRITE_LIMIT_CASES = [
    ("checkpoint", ["random-checkpoint", "--out", "{t}/new/model"], "diffusion_pytorch_model.safetensors"),
    ("onnx", ["onnx", "--model-dir", "{m}", "--out", "{t}/new/engines", "--no-validate"], "projector.onnx"),
    ("build-engines", ["build-engines", "--out", "{e}", "--precision", "fp32", "--no-face", "--stages", "projector"],
     "projector.plan"),
]


@pytest.mark.parametrize("case", WRITE_LIMIT_CASES, ids=[c[0] for c in WRITE_LIMIT_CASES])
def test_export_cli_write_failure(case, tiny_model_dir, tiny_engines, tmp_path):
    _, argv, words = case
    t, e = _sandbox(tmp_path, tiny_engines)
    last = assert_refused(EXPORT, "arc2face-export", [a.format(t=t, e=e, m=tiny_model_dir) for a in argv], t, words,
                          cwd=t, preexec_fn=_file_size_limit(1 << 20))
    assert "could not be written" in last or "file too large" in last, last


@pytest.mark.parametrize("call", ["load_models(m)", "write_random_checkpoint(t, force=True)"])
def test_refusals_come_before_the_model_libraries_are_imported(call, tiny_model_dir, tmp_path):
    """A broken config, or a random-checkpoint --out that is the current folder, is refused without
    importing diffusers or transformers (seconds of import on a small machine, for a refusal)."""
    m = model_copy(tiny_model_dir, tmp_path / "m")
    replace_file(m / "vae" / "config.json", b"[1, 2]")
    code = ("import os, sys\n"
            "from arc2face_ref.loading import load_models\n"
            "from arc2face_ref.random_ckpt import write_random_checkpoint\n"
            f"m, t = sys.argv[1], os.getcwd()\n"
            f"try:\n    {call}\nexcept Exception as e:\n"
            "    print(type(e).__name__, 'diffusers' in sys.modules, 'transformers' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, str(m)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.stdout.split()[1:] == ["False", "False"] and r.stdout.split()[0] in ("MissingWeightsError",
                                                                                  "InvalidInputError"), r


@pytest.mark.parametrize("command", ["build-engines", "onnx", "openvino-int8"])
def test_a_second_writer_of_an_engines_folder_is_refused(command, tiny_model_dir, tiny_engines, tmp_path, capsys):
    """Two build-engines runs on one folder each wrote their manifest over the other's (both exit 0, and the
    folder then failed verification): a command that writes a folder holds a lock on it."""
    import fcntl
    import os

    from arc2face_export.cli import main as export_main

    if command == "openvino-int8":
        pytest.importorskip("openvino")
        pytest.importorskip("nncf")
    eng = engines_copy(tiny_engines, tmp_path / "e")
    argv = {"build-engines": ["build-engines", "--out", str(eng), "--precision", "fp32", "--no-face"],
            "onnx": ["onnx", "--model-dir", str(tiny_model_dir), "--out", str(eng), "--force"],
            "openvino-int8": ["openvino-int8", "--engines", str(eng)]}[command]
    fd = os.open(eng, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)                     # as the first writer holds it
        assert export_main(argv) == 2
        assert "another arc2face-export command is writing this folder" in capsys.readouterr().err
    finally:
        os.close(fd)
