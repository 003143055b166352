"""Damaged training inputs end in one clear error (InvalidInputError / MissingWeightsError, which the
CLIs print as one line with exit 2), never a traceback: id.npy members of a shard, a worker's error
re-raised by DataLoader, a damaged resume state or metrics log, prepare's stats files, a null
scheduler config, a damaged quantisation record, calibration counts out of range."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from arc2face_rt.errors import InvalidInputError, MissingWeightsError


def _ref(tmp_path, payload: bytes):
    from arc2face_ref.train.shards import SampleRef

    shard = tmp_path / "shard-00000.tar"
    shard.write_bytes(b"x" * 7 + payload)
    return SampleRef(shard, "000000001", {"id.npy": (7, len(payload))})


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("payload,words", [
    (b"hello", "damaged id.npy"),
    (_npy(np.array([{"a": 1}], dtype=object)), "damaged id.npy"),
    (_npy(np.array(["x"] * 512)), "not 512 numbers"),
    (_npy(np.zeros((3, 7), np.float32)), "not 512 numbers"),
    (_npy(np.full(512, np.nan, np.float32)), "not finite"),
])
def test_a_damaged_identity_in_a_shard_is_named(tmp_path, payload, words):
    from arc2face_ref.train.shards import read_id

    with pytest.raises(InvalidInputError, match=words) as e:
        read_id(_ref(tmp_path, payload))
    assert "sample 000000001" in str(e.value) and "delete the shard and its .stats.json" in str(e.value)
    assert read_id(_ref(tmp_path, _npy(np.ones((1, 512), np.float64)))).shape == (512,)


class _Damaged(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise InvalidInputError("shard-00000.tar: sample 1 has an undecodable jpg; prepare it again")


def test_a_worker_error_keeps_only_its_own_line():
    """DataLoader puts the worker's whole traceback into the re-raised message; fit keeps our line."""
    from arc2face_ref.train.loop import _unwrapped

    # timeout: a worker forked from a process with threads can hang; fail then, do not hang CI
    loader = torch.utils.data.DataLoader(_Damaged(), batch_size=1, num_workers=1, timeout=300)
    with pytest.raises(InvalidInputError) as e:
        list(_unwrapped(loader))
    assert str(e.value) == "shard-00000.tar: sample 1 has an undecodable jpg; prepare it again"


@pytest.mark.parametrize("content", [b"garbage", None, "list-config"])
def test_a_damaged_resume_state_is_named(tmp_path, content):
    from arc2face_ref.train.checkpoint import STATE, load_state

    path = tmp_path / "checkpoint-2"
    (path / STATE).parent.mkdir(parents=True)
    if content == "list-config":
        torch.save({"step": "x", "config": []}, path / STATE)
    elif content is not None:
        (path / STATE).write_bytes(content)
    with pytest.raises(InvalidInputError, match="missing" if content is None else "damaged"):
        load_state(path)


def test_a_damaged_metrics_log_is_named(tmp_path):
    from arc2face_ref.train.validation import RunLog

    (tmp_path / "metrics.csv").write_bytes(bytes(range(128, 256)) * 2)
    with pytest.raises(InvalidInputError, match="metrics.csv is damaged"):
        RunLog(tmp_path, 2)


def test_a_damaged_prepare_stats_file_is_named(tmp_path):
    from arc2face_ref.train.prepare import _summarise, stats_name

    (tmp_path / stats_name(0)).write_text("garbage")
    with pytest.raises(InvalidInputError, match="damaged"):
        _summarise(tmp_path, 1, 1, 0)


def test_a_null_scheduler_config_is_refused(tmp_path):
    from arc2face_ref.loading import read_scheduler_config

    (tmp_path / "scheduler_config.json").write_text("null")
    with pytest.raises(MissingWeightsError, match="not a scheduler config object"):
        read_scheduler_config(tmp_path / "scheduler_config.json")


@pytest.mark.parametrize("damage", [lambda q: q.update(calibration=None), lambda q: q.update(source=[]),
                                    lambda q: q.update(files={"../outside.onnx": {"bytes": 1}})])
def test_a_damaged_quantisation_record_is_stale_not_a_crash(tmp_path, damage):
    from arc2face_export import calib
    from arc2face_export.quantize import RECIPE_REVISION, QuantRecipe, expected_calibration, quant_is_current
    from dataclasses import asdict

    r = QuantRecipe("int8").resolved()
    q = {"recipe": asdict(r), "recipe_revision": RECIPE_REVISION, "source": {"sha256": {"step_cfg.onnx": "a"}},
         "calibration": expected_calibration(calib.Calibration()), "files": {}}
    m = {"stages": {"step_cfg": {"files": {"step_cfg.onnx": {"sha256": "a"}}}}, "quantized": {"step_cfg": q}}
    assert quant_is_current(tmp_path, json.loads(json.dumps(m)), "step_cfg", r, calib.Calibration())
    damage(q)
    assert not quant_is_current(tmp_path, m, "step_cfg", r, calib.Calibration())


@pytest.mark.parametrize("flag", ["--identities", "--per-run", "--steps"])
def test_openvino_int8_counts_are_checked_before_any_work(tmp_path, capsys, flag):
    from arc2face_export.cli import main

    with pytest.raises(SystemExit) as e:
        main(["openvino-int8", "--engines", str(tmp_path), flag, "0"])
    assert e.value.code == 2 and f"{flag}: 0 is outside" in capsys.readouterr().err


def test_fit_refuses_missing_face_models_before_loading_anything(tiny_model_dir, tmp_path, capsys):
    """README: everything a user can get wrong is checked before any model is loaded; --face-models was
    only opened once training had started (after two model loads and a 'training ...' line)."""
    pytest.importorskip("accelerate")
    from arc2face_ref.train.cli import main
    from train_fixtures import prepared_data

    data = prepared_data(tmp_path / "d")
    capsys.readouterr()
    rc = main(["fit", "--model-dir", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
               "--steps", "2", "--batch-size", "1", "--workers", "0", "--validate-every", "1",
               "--face-models", str(tmp_path / "no-models"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--face-models" in err[0], err
    assert not (tmp_path / "run").exists()


def test_prepare_with_no_usable_photo_is_a_user_error(tmp_path, capsys):
    """Every photo skipped: one line, exit 2, naming the file that lists why (was exit 1); the same --out
    then takes other photos (it refused them: "prepared from another list of photos")."""
    from arc2face_ref.train.cli import main
    from face_fixtures import tiny_models_dir
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "tiny.png")
    (tmp_path / "photos" / "junk.png").write_text("not an image")
    rc = main(["prepare", "--images", str(tmp_path / "photos"), "--models", str(tiny_models_dir()),
               "--out", str(tmp_path / "data"), "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no photo gave a usable face (2 skipped" in err[0], err
    assert len((tmp_path / "data" / "skipped.txt").read_text().splitlines()) == 2
    # the wrong folder, corrected: a folder holding no sample does not pin its list of photos
    from train_fixtures import astronaut_variants

    astronaut_variants(tmp_path / "faces", n=3)
    argv = ["prepare", "--models", str(tiny_models_dir()), "--out", str(tmp_path / "data"), "--device", "cpu", "-q"]
    assert main(argv + ["--images", str(tmp_path / "faces")]) == 0, capsys.readouterr().err
    assert "holds no sample yet: starting again" in capsys.readouterr().err
    assert (tmp_path / "data" / "skipped.txt").read_text() == ""
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "prepare.json", "shard-00000.stats.json", "shard-00000.tar", "skipped.txt"]
    assert main(argv + ["--images", str(tmp_path / "photos")]) == 2      # now it holds samples: pinned
    assert "was prepared from another list of photos" in capsys.readouterr().err


def test_a_fit_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_model_dir, tmp_path, capsys,
                                                                      monkeypatch):
    pytest.importorskip("accelerate")
    from arc2face_ref.train import loop
    from arc2face_ref.train.cli import main
    from train_fixtures import prepared_data

    data = prepared_data(tmp_path / "d")
    mse = loop.F.mse_loss
    monkeypatch.setattr(loop.F, "mse_loss", lambda a, b: mse(a, b) * float("nan"))     # a run that diverges
    rc = main(["fit", "--model-dir", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "new" / "run"),
               "--steps", "2", "--batch-size", "1", "--workers", "0", "-q"])
    assert rc == 2 and "loss became nan" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()       # it held only the metrics of two failed steps; new/ too is undone


def test_a_stopped_fit_says_how_to_continue_from_its_checkpoints(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C after a checkpoint: one line naming the newest checkpoint and --resume (it said only
    "interrupted")."""
    pytest.importorskip("accelerate")
    from arc2face_ref.train import loop
    from arc2face_ref.train.cli import main
    from train_fixtures import prepared_data

    data, calls = prepared_data(tmp_path / "d"), []
    mse = loop.F.mse_loss

    def stop_at_the_second_step(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return mse(a, b)
    monkeypatch.setattr(loop.F, "mse_loss", stop_at_the_second_step)
    rc = main(["fit", "--model-dir", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
               "--steps", "3", "--checkpoint-every", "1", "--batch-size", "1", "--workers", "0", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err[-1] == (f"arc2face-train: interrupted: the checkpoints in {tmp_path / 'run'} are kept "
                                     "(the newest: checkpoint-1); run the same command with --resume to continue"), err
    assert "arc2face-train: interrupted" not in err[:-1]


def test_fit_refuses_a_zero_adam_epsilon(tmp_path, capsys):
    """--adam-eps 0 made the first step 0/0 = NaN, which fit then blamed on --lr or fp16."""
    from arc2face_ref.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--model-dir", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "run"),
              "--adam-eps", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--adam-eps: 0 is outside" in err[0], err
    from arc2face_ref.train.config import FitConfig

    with pytest.raises(InvalidInputError, match="--adam-eps must be above 0"):     # the library's callers too
        FitConfig(model_dir=tmp_path, data=tmp_path, out=tmp_path, adam_eps=0.0)


def test_fit_refuses_more_validation_steps_than_the_scheduler_has(tmp_path, capsys):
    """--val-steps 1e9 was accepted and failed (or ran for days) at the first validation, after training."""
    from arc2face_ref.train.cli import main
    from arc2face_ref.train.config import FitConfig

    with pytest.raises(SystemExit) as e:
        main(["fit", "--model-dir", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "run"),
              "--val-steps", "1e9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--val-steps: 1e9 is outside 1..1000" in err[0], err
    with pytest.raises(InvalidInputError, match="--val-steps 1001: at most 1000"):
        FitConfig(model_dir=tmp_path, data=tmp_path, out=tmp_path, val_steps=1001)
    FitConfig(model_dir=tmp_path, data=tmp_path, out=tmp_path, val_steps=1000)


def test_fit_help_shows_every_default():
    """fit's description promises every option's default in --help (argparse shows it only with help text)."""
    from arc2face_ref.train.cli import build_parser

    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    assert [a.option_strings for a in fit._actions if not a.help] == []


def test_resume_refuses_what_fit_did_not_write(tmp_path):
    """--resume replaced a user's files and a damaged checkpoint (starting afresh over them, exit 0);
    now each is named, with what to move away. What fit writes itself is fine."""
    from arc2face_ref.train.checkpoint import STATE, check_resumable

    run = tmp_path / "run"
    check_resumable(run)                                      # nothing there yet: a new run
    (run / "validation").mkdir(parents=True)
    (run / "metrics.csv").write_text("step\n")
    (run / "checkpoint-2" / STATE).parent.mkdir(parents=True)
    (run / "checkpoint-2" / STATE).write_bytes(b"x")
    check_resumable(run)
    (run / "checkpoint-3").write_text("not a folder")
    with pytest.raises(InvalidInputError, match="checkpoint-3 is not a complete checkpoint"):
        check_resumable(run)
    (run / "checkpoint-3").unlink()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="holds notes.txt, which fit does not write"):
        check_resumable(run)


def test_a_damaged_checkpoint_to_resume_from_is_named_with_its_fix(tiny_model_dir, tmp_path):
    """Its missing VAE used to get "download the released weights": it is the checkpoint to move away."""
    import shutil

    from arc2face_ref.train.loop import _load_start_models

    ckpt = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(tiny_model_dir, ckpt)
    for f in (ckpt / "vae").glob("diffusion_pytorch_model.*"):
        f.unlink()
    with pytest.raises(MissingWeightsError, match=r"--resume: .*checkpoint-4 is damaged .*move it away") as e:
        _load_start_models(ckpt, tiny_model_dir)
    assert "download" not in str(e.value)


@pytest.mark.parametrize("flags,words", [(["--lora-alpha", "8"], "--lora-alpha scales LoRA adapters"),
                                         (["--face-models", "fm"], "--face-models serves validation only"),
                                         # 100000 started 1,270 loader processes and used all 23 GB of RAM
                                         (["--workers", "100000"], "--workers 100000: at most"),
                                         # 1e8 hung building the sampler's index list
                                         (["--batch-size", "100000000"], "at most 4096 per process")])
def test_fit_refuses_a_flag_that_would_be_ignored(tmp_path, capsys, flags, words):
    """--lora-alpha without --lora-rank trained every weight; --face-models without --validate-every was
    never read: both ran to exit 0 without a word (like --lora-scale without --lora, refused)."""
    from arc2face_ref.train.cli import main

    rc = main(["fit", "--model-dir", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--out",
               str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_run_an_older_version_started_with_an_idle_lora_alpha_resumes(tmp_path):
    """Older versions took --lora-alpha without --lora-rank (it did nothing); fit now refuses that pair,
    so such a run must resume without it, and a real LoRA run's alpha still may not change."""
    from arc2face_ref.train.config import FitConfig, resume_changes

    now = FitConfig(model_dir=tmp_path, data=tmp_path, out=tmp_path).to_json()
    assert resume_changes(now, {**now, "lora_alpha": 8.0}) == []
    lora = {**now, "lora_rank": 4, "lora_alpha": 4.0}
    assert resume_changes(lora, {**lora, "lora_alpha": 8.0}) == ["lora_alpha"]
    assert resume_changes(now, {**now, "lr": 1.0}) == ["lr"]


def test_a_resume_with_other_options_names_the_flags_that_started_the_run(tmp_path):
    """The refusal names each stored setting as `fit`'s own flag (train_unet=True read "--train-unet",
    which fit does not have: the fix was to drop --freeze-unet)."""
    from arc2face_ref.train.cli import build_parser
    from arc2face_ref.train.config import FitConfig, as_flags

    cfg = FitConfig(model_dir=tmp_path, data=tmp_path, out=tmp_path, gradient_checkpointing=True).to_json()
    said = {k: as_flags(k, v) for k, v in cfg.items()}
    assert said["train_unet"] == "without --freeze-unet" and said["lr"] == "--lr 1e-05"
    assert said["adam_betas"] == "--adam-betas 0.9 0.999" and said["gradient_checkpointing"] == \
        "with --gradient-checkpointing"
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    for k, text in said.items():                       # every flag named is one of fit's
        flag = next(w for w in text.split() if w.startswith("--"))
        assert flag in fit._option_string_actions, (k, text)


def test_a_shard_sample_without_its_image_is_named_not_dropped(tmp_path):
    """A committed shard whose sample lacks a part (here its jpg) was trained without that sample, silently;
    the shard's stats file records how many prepare wrote."""
    import tarfile

    from arc2face_ref.train.prepare import PLAN_FILE, shard_name, stats_name
    from arc2face_ref.train.shards import index_shards

    (tmp_path / PLAN_FILE).write_text(json.dumps({"files": ["a.jpg", "b.jpg"], "shard_size": 2}))
    (tmp_path / stats_name(0)).write_text(json.dumps({"written": 2}))
    with tarfile.open(tmp_path / shard_name(0), "w") as tf:
        for key, parts in (("000000", ("jpg", "id.npy", "json")), ("000001", ("id.npy", "json"))):
            for part in parts:
                data = b"x"
                info = tarfile.TarInfo(f"{key}.{part}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    for written in (2, 1):
        (tmp_path / stats_name(0)).write_text(json.dumps({"written": written}))
        with pytest.raises(InvalidInputError, match=r"sample 000001 has no jpg; it holds 1 complete sample\(s\), and "
                                                    rf"{stats_name(0)} records {written}; move both away"):
            index_shards(tmp_path)
    with tarfile.open(tmp_path / shard_name(0), "w") as tf:           # every sample complete, one fewer than
        for part in ("jpg", "id.npy", "json"):                         # its stats file records
            info = tarfile.TarInfo(f"000000.{part}")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    (tmp_path / stats_name(0)).write_text(json.dumps({"written": 2}))
    with pytest.raises(InvalidInputError, match=rf"shard-00000.tar: it holds 1 complete sample\(s\), and "
                                                rf"{stats_name(0)} records 2"):
        index_shards(tmp_path)


def test_a_lora_rank_above_every_adapted_layer_is_refused(tiny_model_dir):
    """--lora-rank 100000 was killed for memory without a word; past every layer's min(in, out) a rank adds
    nothing (the UNet and the encoder together: the tiny UNet's layers are narrower than the encoder's)."""
    import re

    from arc2face_ref.loading import load_models
    from arc2face_ref.train.model import set_trainable

    m = load_models(tiny_model_dir)
    with pytest.raises(InvalidInputError, match=r"--lora-rank 100000: above every adapted layer's width") as e:
        set_trainable(m.unet, m.encoder, True, True, lora_rank=100000)
    widest = int(re.search(r"use at most (\d+)", str(e.value))[1])
    assert widest == 768 == m.encoder.config.hidden_size                    # the encoder's, wider than the UNet's
    assert not any("lora_" in n for n, _ in m.unet.named_parameters())      # refused before any adapter went in
    assert set_trainable(m.unet, m.encoder, True, True, lora_rank=widest)    # the largest useful rank trains
