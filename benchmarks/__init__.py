"""Benchmark harness for arc2face-rt: `python -m benchmarks run|report|export|demo`.

Every backend row runs in its own child process (honest cold start and peak memory, and a crash in
one backend cannot take the run down); results are JSON files under benchmarks/results/, and
`report` turns them into RESULTS.md and a chart. See benchmarks/README.md.
"""
