"""The options of `arc2face-train fit`: one frozen dataclass, one field per flag (cli.py maps them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from arc2face_rt.argtypes import usable_cpus
from arc2face_rt.errors import InvalidInputError

LR_SCHEDULES = ("cosine", "constant")
MAX_BATCH = 4096                    # per process: at 512x512, far past any GPU's memory
MAX_VAL_STEPS = 1000                # SD1.5's num_train_timesteps: a sampler takes at most that many
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class FitConfig:
    model_dir: Path                 # released layout to start from (arc2face/, encoder/, vae/, scheduler/)
    data: Path                      # folder of shards written by `arc2face-train prepare`
    out: Path                       # run folder: checkpoint-N/, metrics.csv, validation/, tensorboard/
    steps: int = 1000               # optimizer steps in all (a resumed run continues up to this)
    batch_size: int = 4             # per process, per micro-step
    grad_accum: int = 1             # micro-steps per optimizer step
    lr: float = 1e-5
    lr_schedule: str = "constant"   # after warmup: "constant" or "cosine" (to 0 at `steps`)
    warmup_steps: int = 0
    weight_decay: float = 1e-2      # AdamW
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0      # 0: no clipping
    resolution: int = 512           # training image side; latents are resolution/8
    train_unet: bool = True
    train_encoder: bool = True
    # probability of replacing a sample's condition by the unconditional one: the encoder trains, so the
    # unconditional embedding CFG subtracts moves with it, and the UNet must keep learning it (SD's 10%)
    id_dropout: float = 0.1
    mixed_precision: str = "no"     # "no", "bf16", "fp16" (Accelerate autocast; master weights stay fp32)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0          # 0: no EMA; else the checkpoints hold the EMA weights
    lora_rank: int = 0              # 0: full fine-tuning; else LoRA (peft) on the trained models' attention
    lora_alpha: float = 0.0         # 0: equal to the rank
    seed: int = 0
    checkpoint_every: int = 500     # steps; the last step always writes one
    keep_checkpoints: int = 0       # 0: keep all; else only the newest N
    validate_every: int = 0         # steps; 0: no validation
    val_ids: int = 4                # identities (the first samples of the data) in the validation grid
    val_images: int = 2             # images per identity
    val_steps: int = 25             # DPM-Solver++ steps for validation images
    val_guidance: float = 3.0
    face_models: Path | None = None  # detector + arcface.onnx, for the validation ID similarity
    workers: int = 2                # data-loading processes

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise InvalidInputError(msg)
        need(self.steps >= 1, f"--steps must be at least 1 (got {self.steps})")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be at least 1")
        need(self.batch_size <= MAX_BATCH, f"--batch-size {self.batch_size}: at most {MAX_BATCH} per process (a "
                                           "larger global batch comes from --grad-accum and more processes)")
        most = max(4 * usable_cpus(), 8)    # loaders waiting on network storage may outnumber the cores
        need(self.workers <= most, f"--workers {self.workers}: at most {most}, four per CPU this process may use and "
                                   "at least 8 (each worker is a process with its own copy of the data set's index)")
        need(self.resolution >= 64 and self.resolution % 64 == 0,
             f"--resolution must be a multiple of 64 (got {self.resolution})")
        need(self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {LR_SCHEDULES}")
        need(self.mixed_precision in PRECISIONS, f"--mixed-precision must be one of {PRECISIONS}")
        need(self.train_unet or self.train_encoder,
             "--freeze-unet and --freeze-encoder together leave nothing to train; drop one")
        need(0 <= self.id_dropout < 1, f"--id-dropout must be in [0, 1) (got {self.id_dropout})")
        need(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1) (got {self.ema_decay})")
        need(self.adam_eps > 0, f"--adam-eps must be above 0 (got {self.adam_eps}): with 0 a weight whose gradient "
                                "is still 0 gets 0/0 = NaN")
        need(self.checkpoint_every >= 1, "--checkpoint-every must be at least 1")
        need(self.val_ids >= 1 and self.val_images >= 1 and self.val_steps >= 1,
             "--val-ids, --val-images and --val-steps must be at least 1")
        need(self.val_steps <= MAX_VAL_STEPS, f"--val-steps {self.val_steps}: at most {MAX_VAL_STEPS}, SD1.5's "
                                              "training timesteps (the sampler has no more to take)")
        need(not self.lora_alpha or self.lora_rank,     # it would train every weight, ignoring the alpha
             "--lora-alpha scales LoRA adapters: it needs --lora-rank N (without it fit trains every weight)")
        need(self.face_models is None or self.validate_every,
             "--face-models serves validation only: add --validate-every N (or drop --face-models)")

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Options a resumed run may change; every other one must equal the run's (it would change the maths).
RESUME_MAY_CHANGE = frozenset({"steps", "checkpoint_every", "keep_checkpoints", "validate_every", "val_ids",
                               "val_images", "val_steps", "val_guidance", "face_models", "workers", "model_dir",
                               "data", "out"})


def resume_changes(new: dict, old: dict) -> list[str]:
    """The options (FitConfig.to_json() keys) a resumed run sets otherwise than its checkpoint's run,
    of those it may not change. Without LoRA (rank 0) the alpha does nothing: older versions took one."""
    def acting(c: dict) -> dict:
        return c if c.get("lora_rank") else {**c, "lora_alpha": 0.0}
    new, old = acting(new), acting(old)
    return [k for k, v in new.items() if k not in RESUME_MAY_CHANGE and old.get(k) != v]


def as_flags(key: str, value) -> str:
    """How the run that stored `value` for FitConfig field `key` was started, in `fit`'s own flags:
    `--lr 0.0001`, `--adam-betas 0.9 0.999`, `without --freeze-unet`, `with --gradient-checkpointing`."""
    if key in ("train_unet", "train_encoder"):          # stored as what trains; the flag says what is frozen
        return f"{'without' if value else 'with'} --freeze-{key.removeprefix('train_')}"
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return f"{'with' if value else 'without'} {flag}"
    if value is None:
        return f"without {flag}"
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
