"""Rows of the benchmark harness that stop part-way (a crash, --row-timeout): each keeps what it measured
and says what was under way, down to which model a torch.compile row was compiling."""
from __future__ import annotations

import json

import numpy as np

class _SlowRunner:
    """A benchmark row that measures batch 1 and then dies at batch 4 (as a row stopped by a timeout)."""
    notes: list = []

    def __init__(self, cfg):
        self.cfg = cfg

    def load(self):
        pass

    def sync(self):
        pass

    def generate(self, batch):
        if batch == 4:
            raise TimeoutError("stopped")
        return np.zeros((batch, 512, 512, 3), np.uint8)

    def stages(self):
        return {}

    def compile_parts(self):
        return {}

    def info(self):
        return {"precision": "fp16"}


def test_a_row_stopped_part_way_keeps_what_it_measured(monkeypatch, tmp_path):
    from benchmarks import harness, report, runners

    monkeypatch.setitem(runners.RUNNERS, "slow", _SlowRunner)
    cfg = {"backend": "slow", "repeats": 2, "warmup": 0, "batches": [1, 4]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert harness.row_main(tmp_path / "config.json", tmp_path / "row.json") == 1
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["status"] == "failed" and "stopped" in row["reason"]
    partial = row["partial"]
    assert partial["status"] == "partial" and partial["latency_s"]["median"] >= 0
    assert partial["throughput_ips"].keys() == {"1"} and partial["cold_start_s"] is not None
    partial.update(backend="slow", reason="stopped after 540 s (--row-timeout); partial measurements kept")
    assert harness.measured(partial)
    doc = {"_file": "x.json", "options": {"size": "full", "steps": 25, "guidance": 3.0, "batches": [1, 4],
                                          "repeats": 2, "precision_resolved": "fp16"},
           "device_kind": "cuda", "machine": {}, "created": "now", "git": {}, "rows": [partial]}
    text = "\n".join(report.run_section(doc, None))
    assert "**slow (partial)**" in text and "stopped after 540 s" in text


class _ColdRunner(_SlowRunner):
    def generate(self, batch):
        raise TimeoutError("still compiling")


def test_a_row_stopped_in_its_cold_start_keeps_its_load_time_and_says_where(monkeypatch, tmp_path):
    from benchmarks import harness, runners

    monkeypatch.setitem(runners.RUNNERS, "cold", _ColdRunner)
    (tmp_path / "config.json").write_text(json.dumps({"backend": "cold", "repeats": 1, "warmup": 0, "batches": [1]}))
    assert harness.row_main(tmp_path / "config.json", tmp_path / "row.json") == 1
    partial = json.loads((tmp_path / "row.json").read_text())["partial"]
    assert partial["load_s"] is not None and "first image" in partial["under_way"]


class _CompilingRunner(_SlowRunner):
    def compile_parts(self):
        def vae():
            raise TimeoutError("still compiling")
        return {"UNet": lambda: None, "VAE decoder": vae}


def test_a_row_stopped_while_compiling_names_the_model_and_keeps_the_compiles_that_ended(monkeypatch, tmp_path):
    from benchmarks import harness, report, runners

    monkeypatch.setitem(runners.RUNNERS, "compiling", _CompilingRunner)
    (tmp_path / "config.json").write_text(json.dumps({"backend": "compiling", "repeats": 1, "warmup": 0,
                                                      "batches": [1]}))
    assert harness.row_main(tmp_path / "config.json", tmp_path / "row.json") == 1
    partial = json.loads((tmp_path / "row.json").read_text())["partial"]
    assert partial["under_way"] == "compiling VAE decoder (cold start)"
    assert list(partial["compile_s"]) == ["UNet"] and partial["compile_s"]["UNet"] >= 0
    assert partial["info"] == {"precision": "fp16"} and partial["cold_start_s"] is None
    partial.update(backend="torch-compile", info={"compile_mode": "max-autotune"}, compile_s={"UNet": 312.0},
                   reason="stopped after 480 s (--row-timeout); it stopped during compiling VAE decoder (cold start)")
    doc = {"_file": "x.json", "options": {"size": "full", "steps": 25, "guidance": 3.0, "batches": [1],
                                          "repeats": 2, "precision_resolved": "fp16"},
           "device_kind": "cuda", "machine": {}, "created": "now", "git": {}, "rows": [partial]}
    text = "\n".join(report.run_section(doc, None))
    assert "compiling VAE decoder (cold start); compiled (max-autotune): UNet 312 s" in text
