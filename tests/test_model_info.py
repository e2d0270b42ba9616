"""Parameter and FLOP formulas against the module and torch's FLOP counter; `arflow model info`."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from arflow_scale.cli import main
from arflow_scale.flow import sample
from arflow_scale.model import build_model, count_parameters, forward_flops, sampling_flops

pytestmark = pytest.mark.usefixtures("one_thread")


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, overrides", [
    ("tiny/2", {"image_size": 8, "in_channels": 1, "num_classes": 10}),
    ("S/2", {"image_size": 32, "in_channels": 4, "num_classes": 1000}),
    ("B/4", {"image_size": 32, "in_channels": 4, "num_classes": 1000, "attention": "full"}),
    ("L/2", {"image_size": 16, "in_channels": 3, "num_classes": 100, "attention": "intra"}),
    ("XL/2", {"image_size": 32, "in_channels": 4, "num_classes": 1000}),
    ("custom/4", {"depth": 3, "width": 200, "heads": 5, "image_size": 16, "mlp_ratio": 2.5}),
])
def test_parameter_formula_equals_module(size, overrides):
    with torch.device("meta"):  # no memory for the large sizes
        model = build_model(size, **overrides)
    assert count_parameters(model.config) == numel(model)


def test_paper_sizes_have_the_paper_parameter_counts():
    expected_millions = {"S/2": 35, "B/2": 138, "L/2": 483, "XL/2": 712}  # docs/arflow.md §2.6
    for size, millions in expected_millions.items():
        with torch.device("meta"):
            model = build_model(size, image_size=32, in_channels=4, num_classes=1000)
        assert abs(numel(model) / 1e6 - millions) / millions < 0.02, size


@pytest.mark.parametrize("mode", ["hybrid", "full", "intra"])
@pytest.mark.parametrize("k", [1, 3])
def test_flop_formula_equals_torch_flop_counter(mode, k):
    model = build_model("custom/2", depth=2, width=96, heads=3, image_size=8, in_channels=3,
                        num_classes=10, k=k, attention=mode)
    x, t, y = torch.randn(1, k, 3, 8, 8), torch.rand(1, k), torch.tensor([4])
    # The math SDPA backend decomposes into matmuls that the counter sees (CPU fused SDPA has no formula).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    assert forward_flops(model.config) == counter.get_total_flops()


@pytest.mark.parametrize("mode", ["hybrid", "full", "intra"])
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_sampling_flop_formula_equals_torch_flop_counter(mode, cfg_scale):
    model = build_model("custom/2", depth=2, width=96, heads=3, image_size=8, in_channels=3,
                        num_classes=10, k=5, attention=mode)  # sampling feeds one image per call whatever K
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        sample(model, torch.tensor([1, 2]), steps=4, cfg_scale=cfg_scale, generator=0)
    assert 2 * sampling_flops(model.config, 4, guided=cfg_scale != 1.0) == counter.get_total_flops()


def test_full_attention_sampling_grows_quadratically_in_steps():
    with torch.device("meta"):
        full, hybrid = (build_model("S/2", image_size=16, in_channels=4, attention=mode).config
                        for mode in ("full", "hybrid"))
    assert sampling_flops(hybrid, 200) / sampling_flops(hybrid, 100) == pytest.approx(2.0, rel=1e-3)
    assert sampling_flops(full, 200) / sampling_flops(full, 100) > 2.2


def test_hybrid_flops_grow_linearly_and_full_quadratically_in_k():
    def flops(mode, k):
        with torch.device("meta"):
            return forward_flops(build_model("S/2", image_size=32, in_channels=4, k=k, attention=mode).config)

    hybrid_growth = flops("hybrid", 20) / flops("hybrid", 10)
    full_growth = flops("full", 20) / flops("full", 10)
    assert 1.95 < hybrid_growth < 2.1
    assert full_growth > hybrid_growth + 0.3


def test_model_info_cli_prints_one_json_object(capsys):
    code = main(["model", "info", "--size", "XL/2", "--image-size", "32", "--in-channels", "4"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    with torch.device("meta"):
        model = build_model("XL/2", image_size=32, in_channels=4, num_classes=1000, k=5)
    assert info["params"] == numel(model)
    assert info["forward_flops"] == forward_flops(model.config)
    assert (info["tokens_per_image"], info["sequence_length"], info["attention"]) == (256, 1280, "hybrid")
    assert (info["depth"], info["width"], info["heads"], info["patch"]) == (28, 1152, 18, 2)


def test_model_info_cli_options(capsys):
    code = main(["model", "info", "--size", "custom/4", "--depth", "2", "--width", "128", "--heads", "2",
                 "--image-size", "16", "--in-channels", "3", "--k", "7", "--num-classes", "10",
                 "--attention", "full"])
    assert code == 0
    info = json.loads(capsys.readouterr().out.strip())
    assert (info["sequence_length"], info["attention"], info["k"]) == (7 * 16, "full", 7)


@pytest.mark.parametrize("argv, key", [
    (["--size", "XXL/2"], "size"),
    (["--size", "S/2", "--image-size", "31"], "image_size"),
    (["--size", "S/2", "--attention", "sparse"], "attention"),
])
def test_model_info_cli_bad_value_exit_2_naming_key(capsys, argv, key):
    assert main(["model", "info", *argv]) == 2
    assert key in capsys.readouterr().err
