"""The one way this project connects to Ray: join a cluster, or start a light local one.

A local Ray listens on 127.0.0.1 only: its node IP is the loopback address, so GCS, raylet, object manager,
workers, the dashboard (which also serves the State API that Ray Train's controller polls), the dashboard
and runtime-env agents and every Prometheus `/metrics` endpoint bind 127.0.0.1. Ray 2.60 turns a loopback
node IP into the machine's address unless it believes it runs where Ray has no multi-node clusters
(macOS, Windows: `ray_constants.ENABLE_RAY_CLUSTER`, read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray
is imported); `_loopback_node` clears that flag while the local Ray starts. A joined cluster keeps its own
settings (README, Security). Worker output is streamed to the driver only when `verbose`: by default the
driver's console shows our own progress lines (train/console.py), not Ray's.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import ray
from ray._private import ray_constants

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
LOCAL_NODE_IP = "127.0.0.1"  # a local Ray's node IP: every port it opens listens on loopback only
RAY_TMP_ENV = "ARFLOW_RAY_TMP"  # where the local Ray keeps its sockets and logs (default ./.ray_tmp)
# What a local Ray's processes (and so Ray Train's controller) start with, unless the environment says otherwise:
# - one local node is never preempted, so no run needs Ray Train's preemption watcher (an actor process per run);
# - the controller polls its workers every 0.25 s instead of 2 s: a local run learns its workers started, reported
#   and finished sooner (measured: a 6-step 2-worker run on this 2-core machine, 23 s -> 16 s; CPU unchanged).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def connect_ray(address: Optional[str] = None, local_num_cpus: Optional[int] = None, *,
                verbose: bool = False, dashboard: bool = True) -> bool:
    """Join `address` / RAY_ADDRESS, else start a local Ray; True when this call connected (the caller then
    owns the shutdown). Ray's driver-side logging is lowered to errors unless `verbose`."""
    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.ERROR
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
        return True
    start_local_ray(local_num_cpus or os.cpu_count(), Path(os.environ.get(RAY_TMP_ENV, ".ray_tmp")),
                    dashboard=dashboard, verbose=verbose)
    return True


def start_local_ray(num_cpus: int, temp_dir: Path, *, dashboard: bool, verbose: bool = False) -> None:
    """Start a new local Ray on loopback (the module docstring) with `num_cpus`, its files under `temp_dir`."""
    temp_dir = temp_dir.resolve()
    temp_dir.mkdir(parents=True, exist_ok=True)
    with _loopback_node(), local_ray_environment():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOCAL_NODE_IP,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, _temp_dir=str(temp_dir),
                 _node_ip_address=LOCAL_NODE_IP, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While a local Ray starts: keep a loopback node IP as it is (see the module docstring)."""
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:  # another Ray version: its ports then follow its own defaults (README, Security)
        logging.getLogger(__name__).warning("this Ray has no ENABLE_RAY_CLUSTER flag; the local Ray may listen "
                                            "on the machine's address")
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextmanager
def local_ray_environment() -> Iterator[None]:
    """While a local Ray starts (its GCS and raylet inherit this process's environment, its workers theirs):
    LOCAL_RAY_ENV's values where the environment has none. The caller's environment is restored afterwards."""
    added = {key: value for key, value in LOCAL_RAY_ENV.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def ray_session(address: Optional[str] = None, local_num_cpus: Optional[int] = None, *,
                verbose: bool = False, dashboard: bool = True) -> Iterator[None]:
    """Connected to Ray inside the block; shut down afterwards if this block connected (so no worker line is
    streamed after a command's JSON line)."""
    connected = connect_ray(address, local_num_cpus, verbose=verbose, dashboard=dashboard)
    try:
        yield
    finally:
        if connected and ray.is_initialized():
            ray.shutdown()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
