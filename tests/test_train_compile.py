"""`train.compile` end to end on a real local Ray and DeepSpeed (CPU, inductor): a compiled run that crashes
resumes bit-identically with an uninterrupted compiled run, and MLflow gets `model_tflops` and `mfu`."""
from __future__ import annotations

import math

import pytest

from test_train_resume import digits, loss_history, run_training  # noqa: F401 - digits is a fixture

pytestmark = pytest.mark.slow
PEAK_TFLOPS = 0.5
COMPILED = ("train.zero_stage=2", "train.compile=true", "cluster.num_workers=1", f"train.peak_tflops={PEAK_TFLOPS}")


@pytest.fixture(scope="module")
def compiled_reference(ray_local, digits, tmp_path_factory):  # noqa: F811
    return run_training(digits, str(tmp_path_factory.mktemp("compiled_ref")), "ref", *COMPILED)


def test_compiled_run_resumes_bit_identically_after_a_crash(compiled_reference, digits, tmp_path):  # noqa: F811
    result = run_training(digits, str(tmp_path), "crash", *COMPILED, "run.max_failures=1",
                          "faults.crash_rank_at_step=3", "faults.rank=0")
    ref = compiled_reference
    assert result["final_step"] == ref["final_step"] == 6
    assert (result["params_sha256"], result["ema_sha256"]) == (ref["params_sha256"], ref["ema_sha256"])
    assert result["final_loss"] == ref["final_loss"] and math.isfinite(result["final_loss"])
    ours = loss_history(result["mlflow_tracking_uri"], result["mlflow_run_id"])
    theirs = loss_history(ref["mlflow_tracking_uri"], ref["mlflow_run_id"])
    assert len(ours[3]) == 1  # step 3 ran before the crash and again after the restart: logged once
    assert {step: values[-1] for step, values in ours.items()} == {step: values[0] for step, values in theirs.items()}


def test_mfu_and_model_tflops_are_logged_beside_images_per_s(compiled_reference):
    """model_tflops = 3 x forward FLOPs x sequences per step / step time (one worker); mfu = that / peak."""
    from mlflow.tracking import MlflowClient

    from arflow_scale.config import config_from_dict
    from arflow_scale.tasks import task_for
    from test_train_resume import BASE

    client = MlflowClient(compiled_reference["mlflow_tracking_uri"])
    run_id = compiled_reference["mlflow_run_id"]
    history = {name: {m.step: m.value for m in client.get_metric_history(run_id, name)}
               for name in ("step_time", "model_tflops", "mfu", "images_per_s")}
    assert sorted(history["mfu"]) == list(range(1, 7)) == sorted(history["model_tflops"])
    cfg = config_from_dict({}, list(BASE))
    flops_per_step = 3 * task_for(cfg.model).forward_flops() * cfg.data.batch_size
    for step, seconds in history["step_time"].items():
        assert history["model_tflops"][step] == pytest.approx(flops_per_step / seconds / 1e12, rel=1e-9)
        assert history["mfu"][step] == pytest.approx(history["model_tflops"][step] / PEAK_TFLOPS, rel=1e-9)
