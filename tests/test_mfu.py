"""Model FLOP utilisation: the FLOPs of a training step, the peak, the metrics; the GPU recipes' speed settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arflow_scale.config import ConfigError, config_from_dict, load_config
from arflow_scale.tasks import task_for
from arflow_scale.train.mfu import FlopsMeter, measure_peak_tflops, resolve_peak_tflops

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_training_flops_are_three_forwards_per_sequence_and_mfu_divides_by_the_peak():
    cfg = config_from_dict({}, ["model.size=B/2", "model.image_size=32", "model.in_channels=4", "model.k=5"])
    forward = task_for(cfg.model).forward_flops()
    meter = FlopsMeter.for_training(forward, sequences_per_step=64, devices=4, peak_tflops=800.0)
    per_device = 3 * forward * 64 / 4 / 0.5 / 1e12  # 64 sequences over 4 devices in 0.5 s
    assert meter.model_tflops(0.5) == pytest.approx(per_device, rel=1e-12)
    assert meter.metrics(0.5) == {"model_tflops": pytest.approx(per_device), "mfu": pytest.approx(per_device / 800)}
    assert FlopsMeter.for_training(forward, 64, 4, None).metrics(0.5) == {"model_tflops": pytest.approx(per_device)}


def test_peak_is_a_measured_matmul_rate_or_the_configured_value():
    measured = measure_peak_tflops(torch.device("cpu"), torch.float32, n=128, repeats=2)
    assert 1e-5 < measured < 1e3  # a real rate of this CPU, not a constant
    assert resolve_peak_tflops(989.0, torch.device("cpu")) == 989.0
    assert resolve_peak_tflops(None, torch.device("cpu")) is None  # CPU without a configured peak: no mfu


def test_peak_tflops_must_be_positive():
    assert config_from_dict({}, ["train.peak_tflops=989"]).train.peak_tflops == 989.0
    with pytest.raises(ConfigError, match="train.peak_tflops"):
        config_from_dict({}, ["train.peak_tflops=0"])


@pytest.mark.parametrize("name", ["imagenet128.yaml", "imagenet256.yaml"])
def test_gpu_recipes_compile_and_the_defaults_stay_eager(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.train.compile and cfg.model.attention_backend == "auto" and cfg.eval.compile_sampler is None
    assert not load_config(CONFIGS / "demo.yaml").train.compile
