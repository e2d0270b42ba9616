"""What the driver hands Ray Train and what a worker hands back, as Ray Train's controller sees them: the loop
config is one object-store reference and the result's module needs the standard library only, so the controller
imports neither torch, MLflow nor this package for a run (about 3 s of CPU per launch on 2 cores)."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_worker_args_travel_as_one_object_reference(ray_local, tmp_path):
    from arflow_scale.config import load_config
    from arflow_scale.train.args import ARGS_KEY, WorkerArgs

    args = WorkerArgs(config=load_config(REPO / "configs" / "demo.yaml", [f"run.storage_path={tmp_path}"]),
                      run_url=str(tmp_path / "demo"), storage_options={"anon": False})
    loop_config = args.loop_config()
    assert list(loop_config) == [ARGS_KEY] and isinstance(loop_config[ARGS_KEY], ray_local.ObjectRef)
    assert WorkerArgs.from_loop_config(loop_config) == args


def test_the_worker_result_unpickles_without_torch_mlflow_or_ray():
    code = ("import pickle, sys\n"
            "from arflow_scale.train.result import WorkerResult\n"
            "result = WorkerResult(final_step=3, final_loss=0.5, params_sha256='ab', error=None)\n"
            "assert pickle.loads(pickle.dumps(result)) == result\n"
            "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'deepspeed', 'arflow_scale.config') "
            "if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
