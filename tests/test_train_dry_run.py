"""`arflow train --dry-run` (train/launch_plan.py): the launch's checks and plan with nothing written; a run that
stops and resumes is checked in tests/test_train_stop.py (resume, then finished)."""
from __future__ import annotations

import json
from pathlib import Path

from arflow_scale.cli import main
from arflow_scale.config import load_config
from arflow_scale.model.flops import count_parameters, forward_flops
from arflow_scale.train.launch_plan import prepare_inputs
from test_golden import DEMO_CONFIG


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _dry_run(capsys, *overrides: str, flags: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    code = main(["train", "--config", DEMO_CONFIG, "--dry-run", *flags, *overrides])
    printed = capsys.readouterr()
    return code, json.loads(printed.out.strip().splitlines()[-1]) if code == 0 else {}, printed.err


def test_a_new_run_is_planned_from_the_config_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"run.storage_path={tmp_path}/runs", f"data.manifest={tmp_path}/digits", "train.steps=40"]
    code, plan, err = _dry_run(capsys, *overrides)
    assert code == 0 and _files(tmp_path) == [], err
    cfg = load_config(DEMO_CONFIG, overrides)
    assert (plan["action"], plan["checkpoint"], plan["from_step"], plan["steps_to_train"]) == ("start", None, 0, 40)
    assert plan["run_folder"] == f"{tmp_path}/runs/demo" and plan["model"]["params"] == count_parameters(cfg.model)
    sequences = cfg.data.batch_size * cfg.cluster.num_workers * cfg.train.grad_accum
    assert plan["global_batch"] == sequences and plan["images_per_step"] == sequences * cfg.model.k
    assert plan["train_flops_per_step"] == 3 * forward_flops(cfg.model) * sequences
    assert plan["train_flops_to_go"] == 40 * plan["train_flops_per_step"]
    assert plan["data"] == {"manifest": f"{tmp_path}/digits", "prepare": "digits"}  # written by the real launch
    assert plan["mlflow_tracking_uri"] == f"sqlite:///{tmp_path}/runs/demo/mlflow.db"
    assert f"{tmp_path}/runs/demo would start a new run; 40 steps to train" in err and "gpu_hours" not in plan

    code, estimate, err = _dry_run(capsys, *overrides, flags=("--mfu", "0.4", "--peak-tflops", "100"))
    gpu_hours = plan["train_flops_to_go"] / (100e12 * 0.4) / 3600
    assert code == 0 and estimate == {**plan, "gpu_hours": gpu_hours, "hours": gpu_hours / cfg.cluster.num_workers,
                                      "assumed_peak_tflops": 100.0, "assumed_mfu": 0.4}, err
    for half in (("--mfu", "0.4"), ("--peak-tflops", "100")):  # the demo leaves train.peak_tflops unset
        code, _, err = _dry_run(capsys, *overrides, flags=half)
        assert code == 2 and "needs --mfu and a peak (--peak-tflops or train.peak_tflops) together" in err, err

    prepare_inputs(cfg)  # the shards the launch would write: now the plan reads them
    written = _files(tmp_path)
    code, plan, err = _dry_run(capsys, *overrides)
    assert code == 0 and _files(tmp_path) == written, err
    assert plan["data"] == {"manifest": f"{tmp_path}/digits", "prepare": None, "classes_trained": 10,
                            "classes_left_out": []}


def test_a_launch_that_would_fail_fails_the_dry_run_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _dry_run(capsys, f"run.storage_path={tmp_path}/runs", f"data.manifest={tmp_path}/none",
                            "run.prepare_data=", "train.steps=40")
    assert code == 2 and "data.manifest" in err and _files(tmp_path) == [], err
    code, _, err = _dry_run(capsys, f"run.storage_path={tmp_path}/runs", f"data.manifest={tmp_path}/digits",
                            "train.global_batch_size=33")
    assert code == 2 and "train.global_batch_size: 33 sequences is not a multiple" in err and _files(tmp_path) == []
