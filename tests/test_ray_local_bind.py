"""The local Ray that `arflow train` starts listens on loopback only: every socket of its processes, the
Prometheus /metrics endpoints included (listed with psutil in a separate driver process). Its dashboard serves the
State API on 127.0.0.1, which Ray Train's placement-group cleaner polls every second (train/ray_trainer.py); its
internal gRPC ports listen on every interface (Ray maps 127.0.0.1 to the node IP), so token authentication is on.
Its workers start with the local settings (`LOCAL_RAY_ENV`); the driver's environment stays as it was."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from conftest import REPO

DRIVER = """
import json, os, urllib.request
import psutil, ray
from ray.dashboard.utils import get_address_for_submission_client
from ray.util.state import list_nodes
from arflow_scale.cluster.connect import LOCAL_RAY_ENV, ray_session
from arflow_scale.train.ray_trainer import state_api_sees_this_node

with ray_session(local_num_cpus=1):
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    # the State API address Ray's own processes find is this dashboard's when this is the machine's only Ray
    # (with another one running, the search fails); the probe must say which
    try:
        found_here = get_address_for_submission_client(None) == f"http://{url}"
    except ConnectionError:  # "Found multiple active Ray instances"
        found_here = False
    dashboard = [os.environ.get("RAY_AUTH_MODE"), url, len(list_nodes(address=f"http://{url}")),
                 [found_here, state_api_sees_this_node()]]
    # a worker process too; it starts with LOCAL_RAY_ENV, which the driver's environment no longer has
    in_worker = ray.get(ray.remote(lambda: {key: os.environ.get(key) for key in LOCAL_RAY_ENV}).remote())
    environment = [in_worker == LOCAL_RAY_ENV, any(key in os.environ for key in LOCAL_RAY_ENV)]
    me = psutil.Process()
    processes = {p.pid: p for p in [me, *me.children(recursive=True)]}
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in processes:
            try:
                name = processes[c.pid].name()
            except psutil.Error:
                name = "?"
            metrics = None
            if c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{c.laddr.port}/metrics", timeout=3) as r:
                        metrics = r.status == 200 and b"ray_" in r.read()
                except Exception:
                    metrics = False
            found.append([c.laddr.ip, c.laddr.port, name, metrics])
print(json.dumps(dashboard))
print(json.dumps(environment))
print(json.dumps(found))
"""


def test_local_ray_listens_on_loopback_only(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="arflow-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": str(REPO), "ARFLOW_RAY_TMP": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # the defaults
        env.pop(name, None)
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    auth, url, nodes, state_api = json.loads(out.stdout.strip().splitlines()[-3])
    assert auth == "token" and url.startswith("127.0.0.1:") and nodes == 1
    found_here, sees_this_node = state_api  # Ray Train's placement-group cleaner watches through it
    assert sees_this_node == found_here
    assert json.loads(out.stdout.strip().splitlines()[-2]) == [True, False]  # LOCAL_RAY_ENV: workers only
    sockets = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(sockets) >= 6, f"too few of Ray's listening sockets seen: {sockets}"
    exposed = [s for s in sockets if s[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert any(s[3] for s in sockets), f"no Prometheus /metrics endpoint among {sockets}"
