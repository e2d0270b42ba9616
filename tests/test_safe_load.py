"""DeepSpeed checkpoint files load weights-only: its allow-listed classes pass, anything else is refused."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from arflow_scale.checkpoint.safe_load import safe_load, weights_only_torch_load, weights_only_zero_to_fp32


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_deepspeed_objects_load_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
             "base_optimizer_state": {"state": {0: {"exp_avg": torch.arange(4.0)}}}}
    path = tmp_path / "optim_states.pt"
    torch.save(state, path)
    loaded = safe_load(path)
    assert loaded["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"][0]["w"].numel == 4
    assert torch.equal(loaded["base_optimizer_state"]["state"][0]["exp_avg"], torch.arange(4.0))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _RunsCode()}, path)
    with pytest.raises(pickle.UnpicklingError):
        safe_load(path)


def test_zero_to_fp32_reads_weights_only_and_is_restored(tmp_path):
    from deepspeed.utils import zero_to_fp32

    path = tmp_path / "evil.pt"
    torch.save({"x": _RunsCode()}, path)
    with weights_only_zero_to_fp32():
        with pytest.raises(pickle.UnpicklingError):
            zero_to_fp32.torch.load(path, map_location="cpu", weights_only=False)
        assert zero_to_fp32.torch.float32 is torch.float32
    assert zero_to_fp32.torch is torch


def test_torch_load_is_weights_only_inside_the_window_and_restored(tmp_path):
    """DeepSpeed's universal-checkpoint code calls torch.load(weights_only=False) in many modules."""
    evil, plain = tmp_path / "evil.pt", tmp_path / "plain.pt"
    torch.save({"x": _RunsCode()}, evil)
    torch.save({"w": torch.arange(6.0)}, plain)
    original = torch.load
    with weights_only_torch_load():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(evil, weights_only=False)
        assert torch.equal(torch.load(plain, weights_only=False)["w"], torch.arange(6.0))
    assert torch.load is original
    assert torch.equal(safe_load(plain, mmap=True)["w"][2:4], torch.tensor([2.0, 3.0]))
