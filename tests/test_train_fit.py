"""`arc2face-train fit` on the tiny random checkpoint: it learns, resumes exactly, splits across
processes exactly, and its checkpoints export and generate with this project unchanged."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from train_fixtures import prepared_data

    return prepared_data(tmp_path_factory.mktemp("train-data"))


def _cfg(model_dir, data, out, **kw):
    from arc2face_ref.train.config import FitConfig

    base = dict(model_dir=model_dir, data=data, out=out, resolution=64, batch_size=4, lr=1e-3, workers=0,
                checkpoint_every=1000)
    return FitConfig(**{**base, **kw})


def _weights(ckpt):
    from arc2face_ref.loading import load_models

    m = load_models(ckpt)
    return {**{f"unet.{k}": v for k, v in m.unet.state_dict().items()},
            **{f"encoder.{k}": v for k, v in m.encoder.state_dict().items()}}


@pytest.mark.slow      # ~40 steps at batch 8: about 30 s on a quiet 2-core machine
def test_overfits_eight_samples(tiny_model_dir, data, tmp_path):
    from arc2face_ref.train.loop import fit

    res = fit(_cfg(tiny_model_dir, data, tmp_path / "run", steps=40, batch_size=8, lr=2e-3, warmup_steps=5),
              progress=False)
    first, last = np.mean(res.losses[:3]), np.mean(res.losses[-5:])
    assert first / last >= 5, (first, last)


@pytest.mark.parametrize("steps", [8, pytest.param(20, marks=pytest.mark.slow)])
def test_resume_equals_straight_run(tiny_model_dir, data, tmp_path, steps):
    """N steps straight == N/2 steps, then --resume from that checkpoint, N/2 more (cosine LR, warmup,
    EMA, ID dropout: all of the state that has to survive). The issue's 20 == 10 + 10 is the slow case."""
    half = steps // 2
    from arc2face_ref.train.checkpoint import load_state
    from arc2face_ref.train.loop import fit

    kw = dict(steps=steps, checkpoint_every=half, lr_schedule="cosine", warmup_steps=3, ema_decay=0.9, id_dropout=0.3,
              batch_size=2)
    straight = fit(_cfg(tiny_model_dir, data, tmp_path / "a", **kw), progress=False)
    assert [p.name for p in straight.checkpoints] == [f"checkpoint-{half}", f"checkpoint-{steps}"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / f"checkpoint-{steps}")          # as if killed after the first checkpoint
    resumed = fit(_cfg(tiny_model_dir, data, tmp_path / "b", **kw), resume=True, progress=False)
    assert resumed.start_step == half and len(resumed.losses) == steps - half
    np.testing.assert_allclose(resumed.losses, straight.losses[half:], rtol=1e-6)
    wa, wb = _weights(tmp_path / "a" / f"checkpoint-{steps}"), _weights(tmp_path / "b" / f"checkpoint-{steps}")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    sa, sb = load_state(tmp_path / "a" / f"checkpoint-{steps}"), load_state(tmp_path / "b" / f"checkpoint-{steps}")
    for k in sa["trainable"]:
        torch.testing.assert_close(sb["trainable"][k], sa["trainable"][k], rtol=1e-5, atol=1e-6)
    assert sa["processes"] == 1 and "base_model" not in sa           # recorded for a resume to compare
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert len(rows) == steps + 1 and rows[-1].startswith(f"{steps},")
    # each row's lr is the rate its update used (diffusers' schedule: 0 at the first warm-up step)
    from diffusers.optimization import get_scheduler
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    oracle = get_scheduler("cosine", sgd, num_warmup_steps=3, num_training_steps=steps)
    used = []
    for _ in range(steps):
        used.append(oracle.get_last_lr()[0])
        sgd.step()                                      # as training does (torch warns of a schedule stepped first)
        oracle.step()
    lr_column = rows[0].split(",").index("lr")
    np.testing.assert_allclose([float(r.split(",")[lr_column]) for r in rows[1:]], used, rtol=1e-5, atol=1e-12)
    assert used[0] == 0
    base = _weights(tiny_model_dir)
    assert any(not torch.equal(base[k], wa[k]) for k in base if k.startswith("encoder."))   # both trained
    assert any(not torch.equal(base[k], wa[k]) for k in base if k.startswith("unet."))
    from arc2face_rt.errors import InvalidInputError
    with pytest.raises(InvalidInputError, match="--lr"):
        fit(_cfg(tiny_model_dir, data, tmp_path / "b", **{**kw, "steps": steps + 10, "lr": 1.0}), resume=True)


def test_a_skipped_update_does_not_advance_the_lr_schedule(tiny_model_dir, data, tmp_path, monkeypatch):
    """An fp16 step whose update the loss scaler skipped (an overflow) leaves the schedule where it was, as
    Accelerate's scheduler wrapper does; the first step is made to look skipped (fp16 needs a GPU)."""
    from accelerate.optimizer import AcceleratedOptimizer

    from arc2face_ref.train.loop import fit

    skipped = iter([True])
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: next(skipped, False)))
    fit(_cfg(tiny_model_dir, data, tmp_path / "run", steps=4, batch_size=2, warmup_steps=3), progress=False)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    lr_column = rows[0].split(",").index("lr")
    np.testing.assert_allclose([float(r.split(",")[lr_column]) for r in rows[1:]],
                               [0, 0, 1e-3 / 3, 2e-3 / 3], rtol=1e-5)


def test_a_resume_on_other_processes_or_another_lora_base_is_refused(tiny_model_dir, tmp_path):
    """The order of the samples and the global batch depend on the process count (a 2-process run resumed
    on one trained samples again); LoRA adapters sit on --model-dir's weights, which a checkpoint does not
    hold (a resume with another --model-dir grafted them onto it)."""
    from test_bad_input_export import model_copy

    from arc2face_ref.train.loop import _check_same_run, _run_identity
    from arc2face_rt.errors import InvalidInputError

    lora = _cfg(tiny_model_dir, tmp_path, tmp_path / "run", lora_rank=4)
    same = _run_identity(lora, 2)
    assert same["processes"] == 2 and sorted({k.split("/")[0] for k in same["base_model"]}) == \
        ["arc2face", "encoder", "vae"]
    _check_same_run({"processes": 2, "base_model": same["base_model"]}, same, "ckpt", lora)
    _check_same_run({}, same, "ckpt", lora)                          # a checkpoint from before: not checked
    with pytest.raises(InvalidInputError, match=r"trained on 2 process\(es\), this run has 1"):
        _check_same_run({"processes": 2}, _run_identity(lora, 1), "ckpt", lora)
    # other samples (a resume with another --data trained on, exit 0); a moved folder is the same data
    from arc2face_ref.train.shards import data_fingerprint, index_shards
    from train_fixtures import prepared_data

    data = prepared_data(tmp_path / "data")
    mine = {"processes": 1, "data": data_fingerprint(index_shards(data))}
    shutil.move(data, tmp_path / "moved")
    _check_same_run(mine, {"processes": 1, "data": data_fingerprint(index_shards(tmp_path / "moved"))}, "ckpt", lora)
    fewer = {"processes": 1, "data": data_fingerprint(index_shards(tmp_path / "moved")[:-1])}
    with pytest.raises(InvalidInputError, match=r"trained on other samples than --data .* \(8 there, 7 here"):
        _check_same_run(mine, fewer, "ckpt", lora)
    _check_same_run({"processes": 1}, fewer, "ckpt", lora)          # a checkpoint from before: not checked
    other = model_copy(tiny_model_dir, tmp_path / "m2")
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()                                                  # a hard link: never write through
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    moved = _cfg(other, tmp_path, tmp_path / "run", lora_rank=4)
    with pytest.raises(InvalidInputError, match=r"another base model .* \(vae/diffusion_pytorch_model.safetensors "
                                                r"differs\)"):
        _check_same_run({"processes": 2, "base_model": same["base_model"]}, _run_identity(moved, 2), "ckpt", moved)
    assert "base_model" not in _run_identity(_cfg(tiny_model_dir, tmp_path, tmp_path / "run"), 1)
    assert "base_model" not in _run_identity(lora, 2, hash_base=False)      # the other processes: not hashed
    _check_same_run({"processes": 2, "base_model": same["base_model"]}, _run_identity(moved, 2, hash_base=False),
                    "ckpt", moved)


def test_resume_keeping_one_checkpoint_prunes_the_resumed_one_and_finishes(tiny_model_dir, data, tmp_path):
    """--resume --keep-checkpoints 1: the checkpoint resumed from is pruned after the next one is saved,
    and the one after that still finds its VAE and scheduler (it copied them from the pruned one). The
    abandoned checkpoint folder of a killed run is removed."""
    from conftest import killed_run_temp

    from arc2face_ref.loading import load_models
    from arc2face_ref.train.loop import fit

    kw = dict(checkpoint_every=1, keep_checkpoints=1, batch_size=1)
    fit(_cfg(tiny_model_dir, data, tmp_path / "run", steps=1, **kw), progress=False)
    left = killed_run_temp(tmp_path / "run", "checkpoint-2")
    res = fit(_cfg(tiny_model_dir, data, tmp_path / "run", steps=3, **kw), resume=True, progress=False)
    assert res.start_step == 1 and [p.name for p in res.checkpoints] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-3", "metrics.csv"]
    assert not left.exists()
    load_models(tmp_path / "run" / "checkpoint-3")                  # complete: VAE and scheduler included


@pytest.mark.slow      # three processes importing torch + diffusers
def test_two_processes_equal_one_with_double_batch(tiny_model_dir, data, tmp_path):
    """torchrun, 2 CPU processes (gloo) with batch 2 each == 1 process with batch 4 (2 micro-steps each)."""
    args = ["fit", "--model-dir", str(tiny_model_dir), "--data", str(data), "--resolution", "64", "--lr", "1e-3",
            "--steps", "2", "--workers", "0", "--id-dropout", "0.5", "--grad-accum", "2", "-q"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "arc2face_ref.train.cli", *args, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    from arc2face_ref.train.cli import main
    assert main([*args, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    l1 = np.loadtxt(tmp_path / "one" / "metrics.csv", delimiter=",", skiprows=1, usecols=1)
    l2 = np.loadtxt(tmp_path / "two" / "metrics.csv", delimiter=",", skiprows=1, usecols=1)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    w1, w2 = _weights(tmp_path / "one" / "checkpoint-2"), _weights(tmp_path / "two" / "checkpoint-2")
    base = _weights(tiny_model_dir)
    for k in w1:
        # Adam divides by |g|: where a gradient is near its eps, the two summation orders of the
        # all-reduce move the update by a few 1e-6 (1% of one lr=1e-3 step)
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert max((w1[k] - base[k]).abs().max().item() for k in w1) > 1e-4        # an update happened


def test_lora_checkpoint_exports_generates_and_validates(tiny_model_dir, data, tmp_path, capsys):
    """LoRA fit with validation -> merged weights equal peft's forward -> `arc2face-export onnx` (which
    checks the graphs against these torch modules) -> `arc2face-rt generate`."""
    from arc2face_export.cli import main as export_main
    from arc2face_rt.cli import main as rt_main
    from arc2face_ref.loading import load_models
    from arc2face_ref.random_ckpt import write_random_checkpoint
    from arc2face_ref.train.checkpoint import load_state
    from arc2face_ref.train.loop import fit
    from arc2face_ref.train.model import load_trainable_state, set_trainable
    from face_fixtures import tiny_models_dir

    model = write_random_checkpoint(tmp_path / "model", size="tiny", seed=0)      # with face models
    run = tmp_path / "run"
    fit(_cfg(model, data, run, steps=4, lora_rank=4, lr=1e-2, validate_every=2, val_ids=2, val_images=2,
             val_steps=2, face_models=tiny_models_dir()), progress=False)
    ckpt = run / "checkpoint-4"
    assert (run / "validation" / "step-000004.png").is_file() and (ckpt / "arcface.onnx").is_file()
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert metrics[2].split(",")[-1] != "" and metrics[2].split(",")[-1] != "nan"     # step 2: similarity
    # merged weights == peft's own forward with the trained adapters
    peft_models = load_models(model)
    set_trainable(peft_models.unet, peft_models.encoder, True, True, lora_rank=4)
    load_trainable_state(peft_models.unet, peft_models.encoder, load_state(ckpt)["trainable"])
    merged = load_models(ckpt)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        want = peft_models.unet(x, torch.tensor([500]), cond).sample
        got = merged.unet(x, torch.tensor([500]), cond).sample
        assert not torch.allclose(want, load_models(model).unet(x, torch.tensor([500]), cond).sample)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    engines = tmp_path / "engines"
    assert export_main(["onnx", "--model-dir", str(ckpt), "--out", str(engines)]) == 0
    out = tmp_path / "images"
    assert rt_main(["generate", "--engines", str(engines), "--random-id", "-n", "1", "--steps", "2",
                    "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 1
