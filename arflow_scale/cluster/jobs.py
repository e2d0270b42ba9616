"""Ray Jobs API submission: runtime_env (project as working_dir, settings and secrets as env vars),
a quoted `arflow` entrypoint, log following, job listing. Secret values are never printed or logged.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TextIO

from arflow_scale.schema import mask_override, read_yaml_mapping


log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore-style, anchored at the project root ("/data/" must not drop arflow_scale/data/).
WORKING_DIR_EXCLUDES = ["/.venv/", "/runs/", "/mlruns/", "/data/", "/.ray_tmp/", "/.git/",
                        "__pycache__/", "*.egg-info/", "/.pytest_cache/", "*.db", "/scaling_report/",
                        "/checkpoints/", "/build/", "/dist/", "*.pt", "*.ckpt", "*.safetensors", "*.npz",
                        "/.whl/", "/.gl/"]
# Non-secret settings forwarded when set locally (storage endpoint, tracking server, FID weights).
SETTING_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                "AWS_REGION", "ARFLOW_INCEPTION")
# Credentials forwarded when set locally; their values never leave the runtime_env.
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# RAY_JOB_STOP_WAIT_TIME_S: how long `arflow jobs stop` (SIGTERM) waits before Ray SIGKILLs the driver (Ray's
# default: 3 s); a stopping run needs a step and a checkpoint (train/stop.py).
JOB_DEFAULT_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                   "RAY_JOB_STOP_WAIT_TIME_S": "600"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MASK = "***"


def project_root() -> Path:
    """The folder holding the `arflow_scale` package (the repository root when installed editable)."""
    return Path(__file__).resolve().parents[2]


def job_address(address: Optional[str] = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS if it is an http(s) URL, else the loopback."""
    if address is None:
        candidates = [os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")]
        address = next((c for c in candidates if c and re.match(r"^https?://", c)), DEFAULT_ADDRESS)
    if not re.match(r"^https?://", address):
        raise ValueError(f"--address {address!r}: the Jobs API needs the dashboard URL, like {DEFAULT_ADDRESS}")
    return address.rstrip("/")


def entrypoint_argv(args: Sequence[str], python: str = "python") -> list[str]:
    """`python -m arflow_scale.cli ARGS...` as an argv list."""
    if not args:
        raise ValueError("nothing to run: give the arflow arguments after `--`, like `-- train --config X`")
    return [python, "-m", "arflow_scale.cli", *[str(a) for a in args]]


def build_entrypoint(args: Sequence[str], python: str = "python") -> str:
    """One shell-safe command line: every argument quoted with shlex.join."""
    return shlex.join(entrypoint_argv(args, python))


def masked_command(command: str) -> str:
    """`command` with values of secret-looking `key=value` overrides replaced by ***."""
    try:
        words = shlex.split(command)
    except ValueError:
        return MASK
    return shlex.join(mask_override(word) for word in words)


def load_runtime_env_template(path: str | Path) -> dict:
    """A runtime_env YAML (like cluster/runtime_env.yaml); relative working_dir is taken from the file's cwd."""
    path = Path(path)
    data = read_yaml_mapping(path, "runtime_env template")
    env_vars = data.get("env_vars", {}) or {}
    if not isinstance(env_vars, dict):
        raise ValueError(f"{path}: env_vars must be a mapping, got {env_vars!r}")
    for key, value in env_vars.items():
        if not ENV_NAME.match(str(key)) or not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"{path}: env_vars.{key}: need NAME: scalar value")
    data["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    return data


def forwarded_env(forward: Sequence[str] = (), environ: Mapping[str, str] | None = None,
                  template_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Env vars for the job, later wins: defaults, local settings/secrets, the template's, each --env.

    `--env KEY` forwards the local value of KEY; `--env KEY=VALUE` sets it.
    """
    environ = os.environ if environ is None else environ
    env = dict(JOB_DEFAULT_ENV)
    for key in (*SETTING_VARS, *SECRET_VARS):
        if environ.get(key):
            env[key] = environ[key]
    env.update(template_env or {})
    for item in forward:
        key, sep, value = item.partition("=")
        if not ENV_NAME.match(key):
            raise ValueError(f"--env {key!r}: not an environment variable name")
        if not sep:
            if key not in environ:
                raise ValueError(f"--env {key}: not set in the local environment")
            value = environ[key]
        env[key] = value
    return env


def virtual_envs_in(folder: Path) -> list[str]:
    """Anchored excludes for the Python virtual environments at the top of `folder`, whatever their names
    (`.venv-floors`, `venv`, ...): each holds a `pyvenv.cfg`, and shipped with a job it is hundreds of MB."""
    return sorted(f"/{child.name}/" for child in folder.iterdir() if (child / "pyvenv.cfg").is_file())


def build_runtime_env(*, working_dir: str | Path | None = None, forward: Sequence[str] = (),
                      template: Optional[dict] = None, environ: Mapping[str, str] | None = None) -> dict:
    """runtime_env: the project as working_dir (minus venv/runs/data/...), env vars from `forwarded_env`."""
    runtime_env = dict(template or {})
    wd = Path(working_dir or runtime_env.get("working_dir") or project_root()).resolve()
    if not (wd / "arflow_scale").is_dir():
        raise ValueError(f"working_dir {wd}: does not contain the arflow_scale package")
    runtime_env["working_dir"] = str(wd)
    excludes = set(runtime_env.get("excludes") or []) | set(WORKING_DIR_EXCLUDES) | set(virtual_envs_in(wd))
    runtime_env["excludes"] = sorted(excludes)
    runtime_env["env_vars"] = forwarded_env(forward, environ, runtime_env.get("env_vars"))
    return runtime_env


def redacted(runtime_env: Mapping[str, Any]) -> dict:
    """A copy safe to print: every env var value masked except the non-secret defaults."""
    out = dict(runtime_env)
    out["env_vars"] = {k: (v if k in JOB_DEFAULT_ENV else MASK) for k, v in (runtime_env.get("env_vars") or {}).items()}
    return out


def client(address: Optional[str] = None):
    """A JobSubmissionClient for the dashboard at `address` (token auth follows RAY_AUTH_MODE/RAY_AUTH_TOKEN*)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    try:
        return JobSubmissionClient(url)
    except ConnectionError as err:
        raise ValueError(f"cannot reach the Ray dashboard at {url}: {err}") from None
    except AuthenticationError as err:
        raise ValueError(f"the Ray dashboard at {url} refused the request ({err.message.splitlines()[0]}); "
                         "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN_PATH, "
                         "RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None


def submit(args: Sequence[str], *, address: Optional[str] = None, runtime_env: Optional[dict] = None,
           submission_id: Optional[str] = None, python: str = "python",
           entrypoint_num_cpus: Optional[float] = None, entrypoint_num_gpus: Optional[float] = None) -> str:
    """Submit `arflow ARGS` as a Ray job; returns its submission id."""
    jobs = client(address)
    runtime_env = runtime_env if runtime_env is not None else build_runtime_env()
    entrypoint = build_entrypoint(args, python)
    log.info("submitting to %s: %s (env vars: %s)", jobs.get_address(), masked_command(entrypoint),
             ", ".join(sorted(runtime_env.get("env_vars", {}))))
    log.debug("runtime_env: %s", redacted(runtime_env))
    # Our anchored excludes replace .gitignore parsing: its unanchored `data/` would drop arflow_scale/data/.
    saved = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE")
    os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    try:
        return jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=submission_id, metadata={"arflow_command": str(args[0])},
                               entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)
    finally:
        if saved is None:
            os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
        else:
            os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = saved


def follow(submission_id: str, *, address: Optional[str] = None, out: TextIO = sys.stderr,
           poll_s: float = 1.0, timeout_s: Optional[float] = None) -> str:
    """Stream the job's logs into `out` until it ends; returns its final status (SUCCEEDED/FAILED/STOPPED)."""
    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as err:  # the socket dropped: fall back to polling the status
        log.warning("log stream of %s ended early (%s); polling its status", submission_id, err)
    return wait(submission_id, address=address, poll_s=poll_s, timeout_s=timeout_s)


def wait(submission_id: str, *, address: Optional[str] = None, poll_s: float = 1.0,
         timeout_s: Optional[float] = None) -> str:
    """Poll until the job is in a terminal state; returns that state's name."""
    jobs = client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(jobs.get_job_status(submission_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s} s")
        time.sleep(poll_s)


def job_summary(details) -> dict:
    """The listable part of a JobDetails: no runtime_env (it carries forwarded secrets)."""
    status = details.status
    return {
        "submission_id": details.submission_id,
        "status": str(getattr(status, "value", status)),
        "entrypoint": masked_command(details.entrypoint or ""),
        "start_time": details.start_time,
        "end_time": details.end_time,
        "message": details.message,
        "metadata": {k: v for k, v in (details.metadata or {}).items() if k == "arflow_command"},
    }


def list_jobs(address: Optional[str] = None) -> list[dict]:
    """Every job the cluster knows, oldest first, without runtime_env."""
    jobs = [job_summary(d) for d in client(address).list_jobs() if d.submission_id]
    return sorted(jobs, key=lambda j: j["start_time"] or 0)


def job_logs(submission_id: str, address: Optional[str] = None) -> str:
    return client(address).get_job_logs(submission_id)


def job_status(submission_id: str, address: Optional[str] = None) -> str:
    return str(client(address).get_job_status(submission_id).value)


def stop_job(submission_id: str, address: Optional[str] = None) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); True if it was running."""
    return bool(client(address).stop_job(submission_id))
