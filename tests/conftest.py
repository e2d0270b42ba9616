"""Shared fixtures that start the real services: an S3 endpoint (moto server), a local Ray."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _triton_interpreter_without_cuda() -> None:
    """Without CUDA the Triton kernels' tests run in Triton's CPU interpreter, chosen before triton loads."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_triton_interpreter_without_cuda()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the package's helper, lazily imported: it loads torch.distributed)."""
    from arflow_scale.bench.process_group import free_local_port

    return free_local_port()


def tool_module(name: str):
    """A tools/ script imported as a module (its main() not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _atomic_conditional_writes():
    """S3 checks If-None-Match / If-Match and writes or deletes as one atomic step; moto's threaded server
    checks, then writes, unlocked, so two drivers creating the same lock at once could both get 200 (seen
    in the run-lock contention test). One lock around moto's object writes and deletes gives the endpoint
    S3's guarantee; reads stay concurrent. -> a function that undoes it."""
    import threading

    from moto.s3.responses import S3Response

    lock = threading.Lock()
    originals = {name: getattr(S3Response, name) for name in ("put_object", "_key_response_delete")}

    def locked(original):
        def call(self, *args, **kwargs):
            with lock:
                return original(self, *args, **kwargs)
        return call

    def undo() -> None:
        for name, original in originals.items():
            setattr(S3Response, name, original)

    for name, original in originals.items():
        setattr(S3Response, name, locked(original))
    return undo


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto server), with dummy credentials in the env.

    Yields the endpoint URL. Tests create their own buckets (unique names) with `make_bucket`.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    restore = _atomic_conditional_writes()
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=url)
    try:
        yield url
    finally:
        server.stop()
        restore()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def make_bucket(s3_endpoint):
    """Create a fresh bucket on the S3 endpoint; returns its name."""
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)

    def _make(prefix: str = "arflow") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        client.create_bucket(Bucket=name)
        return name

    return _make


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A light local Ray (2 CPUs, no dashboard), shared by the session's tests."""
    import ray

    from arflow_scale.cluster.connect import start_local_ray

    temp_dir = Path(os.environ.get("ARFLOW_RAY_TMP", REPO / ".ray_tmp")) / os.environ.get("PYTEST_XDIST_WORKER", "")
    start_local_ray(2, temp_dir, dashboard=False)  # as `arflow train` starts its local Ray
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture()
def one_thread():
    """Small tensors: one intra-op thread avoids OpenMP spinning on the shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(model, seed: int = 0, std: float = 0.05):
    """Break the zero-init so every path carries signal (adaLN/final are zero at start)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
