"""`arc2face-rt dataset`: flags and the command; the work is in `dataset.runner` and `dataset.worker`."""
from __future__ import annotations

import sys
from contextlib import ExitStack

from .. import argtypes
from ..errors import InvalidInputError
from ..backends.openvino import CPU_PRECISIONS
from ..pipeline import BACKENDS, GenerationOptions
from ..schedulers import SCHEDULERS
from ..folder_setup import sampling_options
from ..images import DEFAULT_JPEG_QUALITY, IMAGE_FORMATS
from ..specs import DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS
from ..specs import LCM_LORA_DEFAULTS as LCM
from .spec import FORMATS, ON_REJECT, DatasetSpec

# Far beyond any face-recognition training set (tens of thousands of identities, tens of images each),
# and what one process holds: the identities ([N, 512] floats) and one shard's image records.
MAX_IDENTITIES = 10**6
MAX_PER_IDENTITY = 10**4


def add_dataset_parser(sub) -> None:
    p = sub.add_parser("dataset", help="a synthetic face-recognition dataset: N new identities x K images",
                       description="Generate K images of each of N identities (random new ones, or the rows of a "
                                   ".npy) into an ImageFolder tree or WebDataset tar shards, in shards of "
                                   "identities that are committed atomically and skipped by --resume; "
                                   "in-process or on a Ray cluster (--ray).")
    p.add_argument("--engines", required=True, type=argtypes.path, help="engines folder (manifest.json + graphs)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--identities", type=argtypes.count(1, MAX_IDENTITIES, "a number of identities"), metavar="N",
                     help=f"N random identities (unit vectors drawn from --seed; at most {MAX_IDENTITIES:.0e}: they are "
                          "held in memory, and larger sets are several datasets with other --seed values)")
    who.add_argument("--identities-from", type=argtypes.path, metavar="FILE.npy",
                     help="the identities: an [N, 512] array of ArcFace embeddings")
    p.add_argument("--per-identity", type=argtypes.count(1, MAX_PER_IDENTITY, "a number of images"), required=True,
                   metavar="K", help=f"images kept per identity (at most {MAX_PER_IDENTITY:.0e}; a shard's records "
                                     "are held in memory)")
    p.add_argument("--out", required=True, type=argtypes.path, help="output folder (new or empty; or --resume)")
    p.add_argument("--format", choices=FORMATS, default="folders",
                   help="folders: DIR/id_000123/0007.png (ImageFolder); wds: WebDataset tar shards DIR/shard-NNNNNN.tar "
                        "with KEY.png, KEY.json, KEY.cls (default folders; .jpg with --image-format jpg)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="png",
                   help="png: lossless, the generation parameters in a text chunk (default); jpg: JPEG at "
                        "--jpeg-quality, smaller and quicker to encode, the parameters in its comment "
                        "(similarities are of the generated pixels, before compression)")
    p.add_argument("--jpeg-quality", type=argtypes.count(1, 100, "a JPEG quality"), default=None,
                   metavar="Q", help=f"--image-format jpg: quality 1..100 (default {DEFAULT_JPEG_QUALITY})")
    p.add_argument("--shard-size", type=argtypes.count(1, name="a number of identities"), default=16, metavar="IDS",
                   help="identities per shard: the unit of commit, resume and distribution (default 16)")
    p.add_argument("--max-id-similarity", type=argtypes.number(-1.0, 1.0, "a cosine"), default=None, metavar="COS",
                   help="random identities: redraw one whose cosine to an earlier identity exceeds COS")
    p.add_argument("--seed", type=argtypes.seed, default=0,
                   help="identities and noise: image i of identity j uses seed identity_seed(SEED, j) (default 0)")
    # None: the folder's default, as for `generate` (Arc2Face's; LCM's on folders with an LCM-LoRA fused in)
    p.add_argument("--steps", type=int,
                   help=f"denoising steps (default {DEFAULT_STEPS}; {LCM['steps']} with an LCM-LoRA)")
    p.add_argument("--guidance", type=float,
                   help=f"CFG scale (default {DEFAULT_GUIDANCE}; {LCM['guidance']:g} with an LCM-LoRA)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help=f"sampler (default {DEFAULT_SCHEDULER}; {LCM['scheduler']} with an LCM-LoRA)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"images per graph call, across identities (default {DEFAULT_BATCH})")
    f = p.add_argument_group("identity filter (needs the face models)")
    f.add_argument("--models", type=argtypes.path, default=None, metavar="DIR",
                   help="folder with scrfd_10g_bnkps.onnx and arcface.onnx: every image is embedded and its "
                        "cosine to its identity recorded")
    f.add_argument("--min-similarity", type=argtypes.number(-1.0, 1.0, "a cosine"), default=None, metavar="COS",
                   help="drop images whose cosine to their identity is below COS (or that show no face)")
    f.add_argument("--on-reject", choices=ON_REJECT, default=None,
                   help="drop: keep fewer images; regenerate: replace with the identity's next index (default drop)")
    f.add_argument("--max-tries", type=argtypes.count(1, name="a factor"), default=None,
                   help="regenerate: at most K x this many images per identity (default 4)")
    r = p.add_argument_group("where it runs")
    r.add_argument("--backend", choices=BACKENDS, default="auto", help="as for `generate`")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device")
    r.add_argument("--cpu-precision", choices=CPU_PRECISIONS, default="auto", help="OpenVINO precision")
    r.add_argument("--no-verify", action="store_true", help="check the engines' file sizes only, not their sha256")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run shards on Ray actors: no value starts a local Ray, 'auto' or HOST:PORT joins a "
                        "cluster (needs `pip install 'arc2face-rt[scale]'`)")
    r.add_argument("--workers", type=argtypes.count(1, name="a number of workers"), default=None,
                   help="--ray: actors (default one per GPU, else per CPU)")
    r.add_argument("--resume", action="store_true",
                   help="finish an interrupted run: keep committed shards, redo the others")
    p.set_defaults(func=cmd_dataset)


def cmd_dataset(args) -> int:
    if args.workers is not None and not args.ray:      # before the imports below: a refusal takes a moment
        raise InvalidInputError(f"--workers {args.workers} needs --ray (the actors it counts); without --ray the "
                                "shards run one after another in this process")
    from .. import provenance
    from ..pipeline import Arc2FacePipeline
    from .identities import load_identities, random_identities
    from .runner import (
        check_output,
        open_output,
        pending_shards,
        recorded_run,
        run_dataset,
    )
    from ..outputs import check_not_in_engines
    from .worker import ShardWorker, WorkerConfig, open_face_models

    if args.ray:
        from .ray_runner import check_ray_address, require_ray
        require_ray()
        check_ray_address(args.ray)
    sampling, note = sampling_options(args.engines, {k: getattr(args, k) for k in ("scheduler", "steps", "guidance")})
    opts = GenerationOptions(**sampling, seed=args.seed, batch_size=args.batch)
    if note:
        _stderr(note)
    if args.on_reject is not None and args.min_similarity is None:
        raise InvalidInputError(f"--on-reject {args.on_reject} needs --min-similarity (the threshold that rejects)")
    if args.max_tries is not None and args.on_reject != "regenerate":
        raise InvalidInputError(f"--max-tries {args.max_tries} needs --on-reject regenerate (it bounds the images "
                                "made to replace rejected ones)")
    if args.jpeg_quality is not None and args.image_format != "jpg":
        raise InvalidInputError(f"--jpeg-quality {args.jpeg_quality} needs --image-format jpg (PNG is lossless)")
    if args.identities_from and args.max_id_similarity is not None:
        _stderr("note: --max-id-similarity applies to random identities; the rows of --identities-from are used as given")
    if args.identities_from:
        identities = load_identities(args.identities_from)
    else:
        identities = None
    given = {k: getattr(args, k) for k in ("on_reject", "max_tries", "jpeg_quality") if getattr(args, k) is not None}
    spec = DatasetSpec(identities=len(identities) if identities is not None else args.identities,
                       per_identity=args.per_identity, options=opts, format=args.format, shard_size=args.shard_size,
                       min_similarity=args.min_similarity, score=args.models is not None,
                       image_format=args.image_format, **given)     # the rest: DatasetSpec's defaults
    spec.check()
    check_not_in_engines(args.out, args.engines)
    if identities is None:
        identities = random_identities(args.identities, args.seed, args.max_id_similarity)
    with Arc2FacePipeline(args.engines, backend=args.backend, device=args.device, verify=not args.no_verify,
                          cpu_precision=args.cpu_precision) as pipe, ExitStack() as stack:
        # a --resume with another setting (backend, precision, engines, options) is refused before graphs load;
        # with --ray only the actors, which open the graphs, know the record (this machine may have no GPU)
        check_output(args.out, spec, identities, None if args.ray else pipe.run_params(), args.resume,
                     pipe.legacy_engine_id())
        config = WorkerConfig(out=args.out, spec=spec, engines=args.engines, backend=args.backend, device=args.device,
                              verify=not args.no_verify, cpu_precision=args.cpu_precision, models=args.models,
                              run=recorded_run(args.out) if args.ray and args.resume else None)  # actors match it
        # everything that can refuse the command (engines, options, face models) before --out is touched
        if args.ray:
            from .ray_runner import ray_actors
            pipe.schedule(opts.scheduler, opts.steps)     # the actors open the sessions
            open_face_models(config)                     # refused here; the actors' own score (and record)
            worker = None
            actors, record = stack.enter_context(ray_actors(config, identities, args.ray, args.workers,
                                                            pending_shards(args.out, spec, args.resume), _stderr))
        else:
            worker, actors = ShardWorker(config, identities, pipe=pipe), None
            record = worker.record()[0]
        done = open_output(args.out, spec, identities, record, args.resume, _stderr,
                           provenance.legacy_engine_id(pipe.manifest, record))
        todo = [s for s in range(spec.shards) if s not in done]
        _stderr(f"arc2face-rt dataset: {spec.identities} identities x {spec.per_identity} images in {spec.shards} "
                f"shard(s) of {spec.shard_size}, {len(done)} already committed; {opts.steps} {opts.scheduler} steps, "
                f"guidance {opts.guidance}, backend {record['backend']} ({record['precision']}), format {spec.format}"
                + (f", keeping cosine >= {spec.min_similarity} ({spec.on_reject})" if spec.min_similarity is not None
                   else ""))
        if pipe.manifest.get("source", {}).get("random_weights"):
            _stderr("note: these engines come from a RANDOM-WEIGHT checkpoint: images will look like noise, not faces"
                    + ("; similarities exercise the filter's mechanics, not quality" if spec.score else ""))
        s = run_dataset(config, identities, todo, ray=args.ray, actors=actors, log=_stderr,
                        progress=_progress_bar, worker=worker, record=record)
    i, run = s["images"], s["this_run"]
    _stderr(f"wrote {run['shards']} shard(s) to {args.out} in {run['seconds']:.1f} s "
            f"({run['images_per_s'] or 0:.2f} images/s); dataset: {s['shards']['committed']} of "
            f"{s['shards']['total']} shards, {i['kept']} images kept, {i['dropped']} dropped"
            + (f", {s['identities']['short']} identities short of {spec.per_identity}" if s['identities']['short'] else ""))
    return 0


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="dataset", file=sys.stderr, disable=None, smoothing=0.1)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
