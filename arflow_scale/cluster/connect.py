"""The one way this project connects to Ray: join a cluster, or start a light local one.

A local Ray binds its dashboard to 127.0.0.1 (it also serves the State API that Ray Train's controller
polls); its internal gRPC ports listen on the node IP, guarded by Ray's token authentication (README,
Security). Worker output is streamed to the driver only when `verbose`: by default the driver's console
shows our own progress lines (train/console.py), not Ray's.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import ray

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
RAY_TMP_ENV = "ARFLOW_RAY_TMP"  # where the local Ray keeps its sockets and logs (default ./.ray_tmp)


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
    temp_dir = Path(os.environ.get(RAY_TMP_ENV, ".ray_tmp")).resolve()
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=local_num_cpus or os.cpu_count(), include_dashboard=dashboard,
             dashboard_host="127.0.0.1", object_store_memory=LOCAL_OBJECT_STORE_BYTES, _temp_dir=str(temp_dir),
             log_to_driver=verbose, logging_level=level)
    return True


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
