"""`arc2face-train fit`: the training loop, on one device or many through Hugging Face Accelerate.

Per optimizer step (semantics of diffusers' examples/text_to_image/train_text_to_image.py):
    z0   = VAE.encode(image).sample · 0.18215 (the VAE's scaling_factor; the VAE is frozen)
    t    ~ U{0 … T−1}, eps ~ N(0, I), z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·eps   (the model's own
           scheduler_config: SD1.5's scaled_linear betas, T = 1000, epsilon prediction)
    loss = MSE(unet(z_t, t, cond), eps), cond from the exported projector (model.py), replaced by the
           unconditional embedding with probability id_dropout (so CFG keeps working)
    AdamW, warmup then constant or cosine LR, gradient clipping, accumulation, optional EMA.
Launch `accelerate launch … arc2face-train fit …` or `torchrun … ` for several devices/nodes; each
process takes its slice of every global batch (shards.py), so the update does not depend on how many
processes share it. Checkpoints: checkpoint.py. Validation and logs: validation.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from arc2face_rt.atomic import remove_stale_temps
from arc2face_rt.errors import InvalidInputError, MissingWeightsError, OutputExistsError
from arc2face_rt.exits import check_interrupt
from arc2face_rt.manifest import sha256_file
from arc2face_rt.outputs import check_output_dir

from ..loading import Arc2FaceModels, cast, load_models, model_files
from .checkpoint import check_resumable, checkpoints, load_state, prune_checkpoints, save_checkpoint
from .config import FitConfig, as_flags, resume_changes
from .model import Trainee, load_trainable_state, set_trainable, trainable_state
from .shards import RunSampler, ShardDataset, data_fingerprint, index_shards, sample_seed
from .validation import RunLog, Validator, open_face_analyzer


@dataclass
class FitResult:
    start_step: int                     # 0, or the step resumed from
    losses: list[float]                 # the loss of each step this run took (mean over all processes)
    checkpoints: list[Path]             # written by this run


def _start(cfg: FitConfig, resume: bool) -> tuple[int, dict | None, Path | None]:
    """(start step, training state, checkpoint) after checking the run folder."""
    found = checkpoints(cfg.out)
    if not resume:
        check_output_dir(cfg.out)
        if cfg.out.exists() and any(cfg.out.iterdir()):
            raise OutputExistsError(f"--out {cfg.out}: exists and is not empty; pass --resume to continue that run, "
                                    "or choose another --out")
        return 0, None, None
    check_resumable(cfg.out)
    if not found:
        return 0, None, None            # --resume on a run with no checkpoint yet: start it
    step, path = list(found.items())[-1]
    state = load_state(path)
    old = state["config"]
    changed = resume_changes(cfg.to_json(), old)
    if changed:
        was = "; ".join(as_flags(k, old.get(k)) for k in changed)
        raise InvalidInputError(f"--resume: {path} was trained otherwise: {was}; resume it with those, or start a "
                                "new run in another --out")
    if step >= cfg.steps:
        raise InvalidInputError(f"--resume: {path} is at step {step}, --steps is {cfg.steps}: nothing left to do; "
                                "raise --steps to train further")
    return step, state, path


def _run_identity(cfg: FitConfig, processes: int, hash_base: bool = True) -> dict:
    """What a resumed run must share with its checkpoint besides the options: the number of processes
    (the order of the samples and the global batch depend on it) and, with LoRA and `hash_base` (the main
    process: one hash of the base per start, not one per process), the base model's weights (sha256 per
    file: the adapters sit on them, and a checkpoint holds the merged weights only)."""
    same = {"processes": processes}
    if cfg.lora_rank and hash_base:
        same["base_model"] = {str(p.relative_to(cfg.model_dir)): sha256_file(p) for p in model_files(cfg.model_dir)
                              if p.relative_to(cfg.model_dir).parts[0] in ("arc2face", "encoder", "vae")}
    return same


def _check_same_run(state: dict | None, same: dict, ckpt: Path | None, cfg: FitConfig) -> None:
    """Refuse a resume whose processes, samples (`data`) or LoRA base differ from the checkpoint's run (a
    checkpoint from before they were recorded is not checked)."""
    if state is None:
        return
    was = state.get("processes", same["processes"])
    if was != same["processes"]:
        raise InvalidInputError(f"--resume: {ckpt} was trained on {was} process(es), this run has {same['processes']}; "
                                "the order of the samples and the global batch depend on it: resume on "
                                f"{was}, or start a new run in another --out")
    data = state.get("data", same.get("data"))
    if "data" in same and data != same["data"]:
        raise InvalidInputError(f"--resume: {ckpt} was trained on other samples than --data {cfg.data} holds "
                                f"({data.get('samples') if isinstance(data, dict) else '?'} there, {same['data']['samples']} here, or other ones); the "
                                "order of the samples depends on them: resume with the data the run started with, "
                                f"or start a new run in another --out with --model-dir {ckpt}")
    base = state.get("base_model", same.get("base_model"))
    if "base_model" in same and base != same["base_model"]:
        diff = sorted(k for k in {*base, *same["base_model"]} if base.get(k) != same["base_model"].get(k))
        raise InvalidInputError(f"--resume: {ckpt} holds LoRA adapters trained on another base model than --model-dir "
                                f"{cfg.model_dir} ({diff[0]} differs); resume with the --model-dir the run started "
                                "with")


def _load_start_models(ckpt: Path | None, model_dir: Path):
    """The models a run starts from: the resumed checkpoint's (a damaged one is named, with the fix:
    move it away and resume from the one before), else MODEL_DIR's."""
    if ckpt is None:
        return load_models(model_dir)
    try:
        return load_models(ckpt)
    except MissingWeightsError as e:
        why = str(e).split("; download")[0].split("; write")[0]
        raise MissingWeightsError(f"--resume: {ckpt} is damaged ({why}); move it away to resume from the checkpoint "
                                  "before it") from None


def _per_sample_noise(seeds: list[int], latent_shape: tuple, timesteps: int, id_dropout: float):
    """Each sample's timestep, noise, VAE sample noise and dropout from its own generator (shards.py)."""
    ts, noise, vae_eps, drop = [], [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        ts.append(int(torch.randint(0, timesteps, (1,), generator=g)))
        noise.append(torch.randn(latent_shape, generator=g))
        vae_eps.append(torch.randn(latent_shape, generator=g))
        drop.append(bool(torch.rand(1, generator=g) < id_dropout))
    return torch.tensor(ts), torch.stack(noise), torch.stack(vae_eps), torch.tensor(drop)


def _unwrapped(loader):
    """The loader's batches. DataLoader re-raises a worker's exception with the worker's whole traceback
    as its message; a user error (a damaged sample) keeps only its own line."""
    try:
        yield from loader
    except InvalidInputError as e:
        if "Original Traceback" not in str(e):
            raise
        raise InvalidInputError(str(e).strip().splitlines()[-1].split("InvalidInputError: ", 1)[-1]) from None


def fit(cfg: FitConfig, resume: bool = False, say: Callable[[str], None] = print, progress: bool = True) -> FitResult:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    import os

    # Accelerate only forms a multi-process CPU group (gloo) when told it runs on the CPU
    # (`accelerate launch --cpu` says so; under torchrun without a GPU we do).
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=cpu_group)
    main = acc.is_main_process
    start, state, ckpt = _start(cfg, resume)
    refs = index_shards(cfg.data)
    same_run = {**_run_identity(cfg, acc.num_processes, hash_base=main),     # the main process saves and checks
                "data": data_fingerprint(refs)}
    _check_same_run(state, same_run, ckpt, cfg)
    analyzer = open_face_analyzer(cfg.face_models) if main and cfg.validate_every and cfg.face_models else None
    # LoRA trains adapters on the base weights; otherwise the checkpoint's weights are the start.
    models = _load_start_models(ckpt if ckpt is not None and not cfg.lora_rank else None, cfg.model_dir)
    if models.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise InvalidInputError(f"{cfg.model_dir}/scheduler: prediction_type "
                                f"{models.scheduler_config['prediction_type']!r}; fit trains epsilon prediction only")
    noise_sched = DDPMScheduler.from_config(models.scheduler_config)
    if main:
        say(f"resuming from {ckpt} (step {start} of {cfg.steps})" if ckpt else
            f"training {cfg.steps} steps on {len(refs)} samples, {acc.num_processes} process(es) on {acc.device}")
    unet, encoder, vae = models.unet, models.encoder, models.vae
    params = set_trainable(unet, encoder, cfg.train_unet, cfg.train_encoder, cfg.lora_rank, cfg.lora_alpha)
    if state is not None and "trainable" in state:
        load_trainable_state(unet, encoder, state["trainable"])
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()    # frozen too: a training encoder's gradients pass through it
        if cfg.train_encoder:       # frozen, its input-gradient hook would backpropagate through it for nothing
            encoder.activation_checkpointing_enable()
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel
        ema = EMAModel(params, decay=cfg.ema_decay)
        if state is not None:
            ema.load_state_dict(state["ema"])
    trainee = Trainee(unet, encoder).train()
    vae.requires_grad_(False).eval()
    vae_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    vae.to(acc.device)
    if vae_dtype != torch.float32:
        cast(vae, vae_dtype)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    # stepped here once per optimizer step: not handed to Accelerate, which would step it once per process
    sched = get_scheduler("cosine" if cfg.lr_schedule == "cosine" else "constant_with_warmup", opt,
                          num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
    model, opt = acc.prepare(trainee, opt)
    if state is not None and state.get("scaler") and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])     # fp16: the loss scale reached, not 65536 again
    acc.wait_for_everyone()             # every process has checked the run folder before it is made
    if main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cfg.out)     # a checkpoint a killed run was writing
    if ema is not None:
        ema.to(acc.device)

    micro_per_step = cfg.grad_accum
    sampler = RunSampler(len(refs), cfg.seed, cfg.batch_size, acc.process_index, acc.num_processes,
                         start * micro_per_step, cfg.steps * micro_per_step)
    loader = torch.utils.data.DataLoader(ShardDataset(refs, cfg.resolution), batch_sampler=sampler,
                                         num_workers=cfg.workers, persistent_workers=False,
                                         worker_init_fn=_worker_leaves_stops_to_the_main_process)
    lat = cfg.resolution // 8
    scale = float(vae.config.scaling_factor)            # 0.18215 for SD1.5
    timesteps = int(noise_sched.config.num_train_timesteps)
    validator = None
    if main and cfg.validate_every:
        validator = Validator(refs, cfg.val_ids, cfg.val_images, cfg.resolution, cfg.val_steps, cfg.val_guidance,
                              cfg.seed, analyzer)
    log = RunLog(cfg.out, start) if main else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not (main and progress), unit="step", dynamic_ncols=True)
    result = FitResult(start, [], [])
    step, step_losses, t0 = start, [], time.perf_counter()
    samples_per_step = cfg.batch_size * acc.num_processes * cfg.grad_accum
    base = cfg.model_dir if ckpt is None else ckpt      # where a checkpoint's VAE, scheduler, face models come from

    for micro, (img, ids) in zip(range(start * micro_per_step, cfg.steps * micro_per_step), _unwrapped(loader)):
        check_interrupt()               # a Ctrl-C swallowed where it landed (a fork hook as workers start)
        seeds = [sample_seed(cfg.seed, k) for k in sampler.sample_numbers(micro)]
        t, noise, vae_eps, drop = (x.to(acc.device) for x in _per_sample_noise(seeds, (4, lat, lat), timesteps,
                                                                               cfg.id_dropout))
        with torch.no_grad():
            dist = vae.encode(img.to(acc.device, vae_dtype)).latent_dist
            z0 = (dist.mean.float() + dist.std.float() * vae_eps) * scale             # [b, 4, lat, lat]
            zt = noise_sched.add_noise(z0, noise, t)
        with acc.accumulate(model):
            eps = model(zt, t, ids.to(acc.device), drop)
            loss = F.mse_loss(eps.float(), noise)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step_losses.append(acc.gather(loss.detach()[None]).mean().item())
        if not acc.sync_gradients:
            continue
        lr = sched.get_last_lr()[0]         # the rate this update used (sched.step sets the next one's)
        if not opt.step_was_skipped:        # an fp16 overflow skipped the update: the schedule waits, as
            sched.step()                    # Accelerate's own scheduler wrapper does
        if ema is not None:
            ema.step(params)
        step += 1
        loss_value = sum(step_losses) / len(step_losses)
        step_losses = []
        result.losses.append(loss_value)
        rate = (step - start) * samples_per_step / max(time.perf_counter() - t0, 1e-9)
        if not math.isfinite(loss_value):
            raise InvalidInputError(f"the loss became {loss_value} at step {step}; lower --lr, or use bf16 instead "
                                    "of fp16")
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", refresh=False)
        bar.update(1)
        sim = math.nan
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or (validator and step % cfg.validate_every == 0):
            acc.wait_for_everyone()
            if main:
                with _ema_weights(ema, params):
                    if validator and step % cfg.validate_every == 0:
                        sim = validator(eval_models(models), cfg.out / "validation" / f"step-{step:06d}.png")
                        trainee.train()
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                        st = {"step": step, "config": cfg.to_json(), "optimizer": opt.state_dict(),
                              "lr_scheduler": sched.state_dict(), **same_run}
                        if acc.scaler is not None:
                            st["scaler"] = acc.scaler.state_dict()
                        if ema is not None:
                            st["ema"] = ema.state_dict()
                        if ema is not None or cfg.lora_rank:
                            st["trainable"] = _raw(ema, unet, encoder)
                        result.checkpoints.append(save_checkpoint(cfg.out, step, unet, encoder, base, st))
                        base = result.checkpoints[-1]       # the resumed checkpoint may be pruned now
                        prune_checkpoints(cfg.out, cfg.keep_checkpoints)
            acc.wait_for_everyone()
        if main:
            log.write(step, loss=loss_value, lr=lr, images_per_s=rate, id_similarity=sim)
    bar.close()
    if log is not None:
        log.close()
    acc.end_training()
    return result


def _worker_leaves_stops_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: a data worker ignores it (the main process
    stops the run and its workers), and dies quietly on SIGTERM, instead of printing a traceback each."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def eval_models(models: Arc2FaceModels) -> Arc2FaceModels:
    """The models for the reference pipeline, in eval mode (they are put back in train mode after)."""
    models.unet.eval()
    models.encoder.eval()
    return models


class _ema_weights:
    """Within the block the trained parameters hold the EMA weights (exactly restored after)."""

    def __init__(self, ema, params):
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


def _raw(ema, unet, encoder) -> dict:
    """The raw (non-EMA) trained tensors; called inside _ema_weights, where the parameters hold EMA ones."""
    if ema is None:
        return trainable_state(unet, encoder)
    names = list(trainable_state(unet, encoder))
    return {n: t.detach().cpu().clone() for n, t in zip(names, ema.temp_stored_params)}
