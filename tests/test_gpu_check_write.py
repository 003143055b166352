"""gpu-check's `write` phase without a GPU: images/s as `generate` and `dataset` write them, against the
pipeline alone, on the DIR's export (benchmarks/dataset_bench.py)."""
from __future__ import annotations

import json

import pytest

from test_gpu_check import isolated_gpu_check  # noqa: F401 - the fixture


@pytest.fixture
def gpu_check_dir(tiny_model_dir, tiny_engines, tmp_path):
    """A gpu-check DIR whose export.json names a copy of the tiny engines and the checkpoint with its face
    models, as the export phase leaves it."""
    from arc2face_ref.face_models import write_face_models
    from test_bad_input import engines_copy

    engines = engines_copy(tiny_engines, tmp_path / "engines")
    model = tmp_path / "model"
    model.mkdir()
    for child in tiny_model_dir.iterdir():
        (model / child.name).symlink_to(child)
    write_face_models(model, seed=0, size="tiny")
    out = tmp_path / "gc"
    out.mkdir()
    (out / "export.json").write_text(json.dumps({"status": "ok", "engines_dir": str(engines),
                                                 "model_dir": str(model)}))
    return out, engines


@pytest.mark.parametrize("row_ort", [None, "off: the row failed in a fused graph: simulated"],
                         ids=["fused", "row-ort-went-plain"])
def test_the_write_phase_prices_writing_against_the_pipeline_alone(gpu_check_dir, isolated_gpu_check,  # noqa: F811
                                                                    row_ort):
    """Every mode makes the same 4 batches; each is priced against generating them alone (nothing
    written); the graphs are the plain ones where this DIR's row:ort went without the fused ones."""
    from benchmarks.gpu_check import GpuCheckOptions, gpu_check

    out, engines = gpu_check_dir
    if row_ort:
        (out / "row-ort.json").write_text(json.dumps({"status": "ok", "fused_graphs": row_ort}))
    gpu_check(GpuCheckOptions(out=out, phases=("write",), size="tiny", device="cpu", steps=2, batches=(1,),
                              guidance=1.0))
    doc = json.loads((out / "write.json").read_text())
    assert doc["status"] == "ok", doc.get("traceback")
    assert list(doc["modes"]) == ["pipeline", "generate", "dataset-folders", "dataset-wds", "dataset-filter"]
    assert (doc["images"], doc["batch"], doc["steps"], doc["guidance"]) == (4, 1, 2, 1.0)   # 4 batches
    assert doc["backend"] == "ort (cpu, fp32)" and doc["engines"] == str(engines)
    assert doc["run_params"]["backend"] == "ort"
    assert all(m["images_per_s"] > 0 and m["images_per_s_vs_pipeline"] > 0 for m in doc["modes"].values())
    (threads,) = doc["pipeline_threads_cpu_s"]     # where the pipeline's CPU time went, by thread name
    *named, other = threads
    assert other[:2] == ["(other)", None] and all(cpu >= 0.05 and n >= 1 for _, n, cpu in named)
    assert "main" in [name for name, _, _ in named]                  # the generating thread
    cpu = doc["modes"]["pipeline"]["cpu_s"][0]
    assert sum(c for _, _, c in named) <= cpu + 0.05 and abs(sum(c for _, _, c in threads) - cpu) <= 0.05
    assert doc["fused_graphs"] == ("off: row:ort went without them (the row failed in a fused graph: simulated)"
                                   if row_ort else "used where the folder has them")


def test_the_write_phase_measures_again_plainly_when_a_fused_graph_fails(gpu_check_dir, isolated_gpu_check,  # noqa: F811
                                                                         monkeypatch):
    import os

    import benchmarks.dataset_bench as dataset_bench
    from benchmarks.gpu_check import GpuCheckOptions, gpu_check

    out, _ = gpu_check_dir
    seen = []

    def fails_fused_once(*args, **kw):
        seen.append(os.environ.get("ARC2FACE_ORT_FUSED"))
        if len(seen) == 1:
            raise RuntimeError("step_cfg.ort-cuda.onnx: simulated kernel refusal; ARC2FACE_ORT_FUSED=0 runs the "
                               "plain graphs")
        return {"modes": {}}

    monkeypatch.setattr(dataset_bench, "bench_dataset", fails_fused_once)
    gpu_check(GpuCheckOptions(out=out, phases=("write",), size="tiny", device="cpu"))
    doc = json.loads((out / "write.json").read_text())
    assert doc["status"] == "ok" and seen == [None, "0"]
    assert doc["fused_graphs"].startswith("off: the phase failed in a fused graph: step_cfg.ort-cuda.onnx")
