"""Synthetic face-recognition datasets (`arc2face-rt dataset`): N new identities x K images, batched
across identities, optionally filtered by ArcFace similarity, written as an ImageFolder tree or
WebDataset tar shards, in atomically committed shards of identities that `--resume` skips, in-process
or on a Ray cluster (`ray_runner`, optional).

    spec.py        what a run makes, and its cut into shards
    identities.py  random (seeded, optionally distinct) or given identities; per-identity noise seeds
    writers.py     shard writers: folders, tar
    worker.py      ShardWorker: one pipeline making whole shards (in-process or as a Ray actor)
    runner.py      the output folder, resume, the run, summary.json
    ray_runner.py  shards on Ray actors
    cli.py         the `dataset` flags
"""
