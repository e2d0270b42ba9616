"""cluster.num_workers=min..max: Ray Train's elastic scaling. On a real local two-node Ray (one CPU each) a run
loses a node mid-training and finishes on the remaining worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from arflow_scale.config import config_from_dict
from conftest import REPO


@pytest.mark.parametrize("value, workers, elastic", [(2, 2, False), ("1..2", (1, 2), True), ("3..3", 3, False)])
def test_num_workers_maps_onto_ray_train_scaling(value, workers, elastic):
    from ray.train import ScalingConfig

    cluster = config_from_dict({}, [f"cluster.num_workers={value}"]).cluster
    scaling = ScalingConfig(num_workers=cluster.scaling_workers)
    assert scaling.num_workers == workers and scaling.elasticity_enabled == elastic
    assert (scaling.min_workers, scaling.max_workers) == cluster.worker_range


NODE_LOSS = r"""
import json, os, shutil, socket, sys, tempfile, threading, time
from pathlib import Path

os.environ["RAY_TMPDIR"] = ray_tmp = tempfile.mkdtemp(prefix="arflow-el-", dir="/tmp")  # short socket paths
os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from arflow_scale.config import config_from_dict
from arflow_scale.data import write_shards
from arflow_scale.train.driver import train

work, steps = Path(sys.argv[1]), int(sys.argv[2])
write_shards("digits", str(work / "digits"), samples_per_shard=64, progress=False)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    dashboard_port = s.getsockname()[1]
cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=True,
                                                            dashboard_port=dashboard_port, temp_dir=ray_tmp))
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
cfg = config_from_dict({}, [
    "model.size=tiny/2", "model.image_size=8", "model.in_channels=1", "model.num_classes=10", "model.k=3",
    "data.batch_size=4", "data.shuffle_buffer=16", f"train.steps={steps}", f"checkpoint.every={steps}",
    "train.log_every=1", "train.sample_every=0", "train.sample_steps=2", "train.zero_stage=0",
    "cluster.num_workers=1..2", "cluster.use_gpu=false", "tracking.system_metrics=false", "run.max_failures=2",
    f"data.manifest={work / 'digits'}", f"run.storage_path={work / 'runs'}", "run.name=elastic"])
out = {}

def fit():
    try:
        out["result"] = train(cfg, address=cluster.address).to_json()
    except BaseException as err:
        out["error"] = repr(err)

thread = threading.Thread(target=fit)
thread.start()
run = work / "runs" / "elastic"
removed_at, deadline = None, time.time() + 480
while thread.is_alive() and removed_at is None and time.time() < deadline:
    time.sleep(0.3)
    try:
        client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
        steps_seen = [m.step for m in client.get_metric_history(json.loads((run / "mlflow_run.json").read_text())["run_id"], "loss")]
    except Exception:
        continue
    if steps_seen and max(steps_seen) >= 2:  # both workers train: take one node away
        removed_at = max(steps_seen)
        cluster.remove_node(nodes[1], allow_graceful=False)
thread.join(480)
out["removed_at"] = removed_at
record = run / f"checkpoint_{steps:09d}" / "meta.json"
out["final_world_size"] = json.loads(record.read_text())["world_size"] if record.exists() else None
if "result" in out:
    history = MlflowClient(out["result"]["mlflow_tracking_uri"]).get_metric_history(out["result"]["mlflow_run_id"], "loss")
    out["logged_step_1"] = sum(m.step == 1 for m in history)
print(json.dumps(out))
cluster.shutdown()
shutil.rmtree(ray_tmp, ignore_errors=True)
"""


@pytest.mark.slow
def test_a_lost_node_leaves_the_run_on_the_remaining_worker(tmp_path):
    """1..2 workers on two 1-CPU nodes: after step 2 one node is removed (its worker dies with it); Ray restarts
    the group on the remaining node, which trains to the end (no checkpoint before the loss: the run restarts
    from step 0; the steps trained again are not logged twice)."""
    steps = 60
    # Right after the loss Ray still counts the lost node's CPU, so Ray Train first asks for 2 workers again and
    # waits for them up to RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default; 15 s here) before it
    # starts the group on what remains.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", NODE_LOSS, str(tmp_path), str(steps)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=590)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    assert out["removed_at"] is not None and out["removed_at"] < steps, "the node was not removed mid-run"
    assert out["result"]["final_step"] == steps and out["final_world_size"] == 1
    assert out["logged_step_1"] == 1 and out["result"]["classes_trained"] == 10
