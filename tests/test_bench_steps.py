"""The step timing and profiling of `tools/gpu_bench.py` on CPU: host time against step time, the union of device
intervals, and the host reads a profiled step makes."""
from __future__ import annotations

import json

import torch

from arflow_scale.bench.steps import busy_time, profile_steps, time_steps

DEVICE = torch.device("cpu")


def _step_reading_twice():
    """A step that multiplies and reads two values on the host (as a logging loop or a norm check would)."""
    x = torch.randn(64, 64)

    def step(number: int) -> torch.Tensor:
        y = (x @ x).sum()
        float(y)
        y.item()
        return y
    return step


def test_busy_time_is_the_union_of_the_intervals():
    assert busy_time([]) == 0.0
    assert busy_time([(20.0, 30.0), (0.0, 10.0), (5.0, 15.0), (22.0, 25.0)]) == 25.0  # overlap and containment
    assert busy_time([(0.0, 1.0), (1.0, 2.0)]) == 2.0


def test_profiled_steps_count_the_host_reads_and_write_a_trace(tmp_path):
    trace = tmp_path / "trace.json"
    profiled = profile_steps(_step_reading_twice(), DEVICE, str(trace), steps=2)
    assert profiled.host_reads == 2.0 and profiled.syncs == 0.0
    assert profiled.device_busy_ms is None and profiled.wall_ms > 0  # no device on CPU
    assert "aten::mm" in {op["op"] for op in profiled.top}
    line = profiled.line()
    assert line["device_busy_fraction"] is None and line["host_reads_per_step"] == 2.0
    assert json.loads(trace.read_text())["traceEvents"]


def test_timed_steps_keep_the_host_time_of_each_step():
    times = time_steps("reads", _step_reading_twice, DEVICE, warmup=1, steps=3)
    assert len(times.step_s) == len(times.host_s) == 3 and len(times.losses) == 4
    assert all(0 < host <= step for host, step in zip(times.host_s, times.step_s))


def test_bench_config_passes_overlap_comm_to_the_engine_config():
    """gpu_bench --overlap-comm: on one rank the trainer leaves DeepSpeed's overlap off unless asked."""
    from arflow_scale.bench.steps import bench_config
    from arflow_scale.train.deepspeed_config import build_deepspeed_config

    def overlap(setting):
        cfg = bench_config("tiny/2", 8, 1, 3, 4, num_classes=10, overlap_comm=setting)
        return build_deepspeed_config(cfg, 1, "cuda")["zero_optimization"]["overlap_comm"]

    assert (overlap(None), overlap(True), overlap(False)) == (False, True, False)
