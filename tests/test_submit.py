"""Job submission: runtime_env and entrypoint construction, cluster files, and (slow) a real loopback
Ray cluster with the dashboard that runs a tiny training through `arflow submit --follow`."""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from arflow_scale.cluster import jobs

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARFLOW = str(BIN / "arflow")


def test_entrypoint_is_quoted_argv(tmp_path):
    marker = tmp_path / "pwned"
    args = ["scaling", "fit", "--csv", f"x.csv; touch {marker}", "--out", "$(touch " + str(marker) + ")"]
    entry = jobs.build_entrypoint(args, python=sys.executable)
    assert shlex.split(entry) == jobs.entrypoint_argv(args, python=sys.executable)
    proc = subprocess.run(entry, shell=True, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and f"x.csv; touch {marker}" in proc.stderr
    assert not marker.exists()
    with pytest.raises(ValueError, match="nothing to run"):
        jobs.build_entrypoint([])


def test_runtime_env_working_dir_excludes_and_env():
    environ = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
               "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "HOME": "/root", "DS_ACCELERATOR": "cpu"}
    env = jobs.build_runtime_env(forward=["DS_ACCELERATOR", "NCCL_DEBUG=WARN"], environ=environ)
    assert Path(env["working_dir"]) == REPO
    for pattern in ("/.venv/", "/runs/", "/mlruns/", "/data/", "/.ray_tmp/", "/.git/"):
        assert pattern in env["excludes"]
    assert "data/" not in env["excludes"]  # unanchored would drop arflow_scale/data/
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["env_vars"]["DS_ACCELERATOR"] == "cpu" and env["env_vars"]["NCCL_DEBUG"] == "WARN"
    assert "HOME" not in env["env_vars"]
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "600"  # a stopping run's checkpoint before SIGKILL
    shown = json.dumps(jobs.redacted(env))
    assert "s3cr3t" not in shown and "AWS_SECRET_ACCESS_KEY" in shown
    with pytest.raises(ValueError, match="--env MISSING_VAR: not set"):
        jobs.build_runtime_env(forward=["MISSING_VAR"], environ=environ)
    with pytest.raises(ValueError, match="not an environment variable name"):
        jobs.build_runtime_env(forward=["BAD-NAME=1"], environ=environ)
    with pytest.raises(ValueError, match="does not contain the arflow_scale package"):
        jobs.build_runtime_env(working_dir="/tmp", environ=environ)


def test_packaged_working_dir_keeps_the_data_package(tmp_path):
    """Ray's own packager, with our excludes, keeps arflow_scale/data and drops venv/runs/data."""
    from ray._private.runtime_env.packaging import create_package

    env = jobs.build_runtime_env(environ={})
    os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    try:
        create_package(env["working_dir"], tmp_path / "pkg.zip", excludes=env["excludes"],
                       include_gitignore=False)
    finally:
        os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    import zipfile

    names = zipfile.ZipFile(tmp_path / "pkg.zip").namelist()
    assert any(n.startswith("arflow_scale/data/") for n in names)
    assert any(n.startswith("arflow_scale/cluster/") for n in names)
    assert not any(n.startswith((".venv/", "runs/", "data/", ".git/", ".ray_tmp/")) for n in names)


def test_virtual_envs_of_any_name_stay_out_of_the_package(tmp_path):
    """A second venv in the project (`make test-floors`' `.venv-floors`, a user's `venv`) is not shipped with a job:
    Ray's packager, with our excludes, drops every folder holding a pyvenv.cfg and keeps folders that only look
    like one."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for folder in ("arflow_scale", ".venv-floors/lib", "venv/bin", "envy"):
        (project / folder).mkdir(parents=True)
        (project / folder / "x.py").write_text("x = 1\n")
    for venv in (".venv-floors", "venv"):
        (project / venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    env = jobs.build_runtime_env(working_dir=project, environ={})
    assert jobs.virtual_envs_in(project) == ["/.venv-floors/", "/venv/"]
    assert {"/.venv-floors/", "/venv/"} <= set(env["excludes"])
    create_package(env["working_dir"], tmp_path / "pkg.zip", excludes=env["excludes"], include_gitignore=False)
    names = zipfile.ZipFile(tmp_path / "pkg.zip").namelist()
    assert "arflow_scale/x.py" in names and "envy/x.py" in names
    assert not any(n.startswith((".venv-floors/", "venv/")) for n in names), names


def test_template_and_cluster_files():
    template = jobs.load_runtime_env_template(REPO / "cluster/runtime_env.yaml")
    env = jobs.build_runtime_env(template=template, forward=["MLFLOW_TRACKING_URI=http://10.0.0.2:5000"],
                                 environ={"MLFLOW_TRACKING_URI": "sqlite:///laptop.db"})
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.2:5000"  # --env beats template
    assert env["config"]["setup_timeout_seconds"] == 1800 and "/notebooks/" in env["excludes"]
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray accepts it

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    launcher = yaml.safe_load((REPO / "cluster/ray-cluster.yaml").read_text())
    jsonschema.validate(launcher, schema)
    setup = launcher["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    project_at = next(i for i, c in enumerate(setup) if "arflow_scale[eval]" in c)
    assert torch_at < project_at
    assert "--dashboard-host=127.0.0.1" in launcher["head_start_ray_commands"][-1]

    rayjob = yaml.safe_load((REPO / "cluster/rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    assert shlex.split(rayjob["spec"]["entrypoint"])[:3] == ["python", "-m", "arflow_scale.cli"]
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"]
    assert "SECRET" not in rayjob["spec"]["runtimeEnvYAML"]


def test_bad_inputs_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs the dashboard URL"):
        jobs.job_address("ray://10.0.0.1:10001")
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")  # not a dashboard URL: ignored
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert jobs.job_address() == jobs.DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265/")
    assert jobs.job_address() == "http://10.0.0.1:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.delenv("RAY_ADDRESS")
    bad = tmp_path / "env.yaml"
    bad.write_text("env_vars: [1, 2]\n")
    with pytest.raises(ValueError, match="env.yaml: env_vars must be a mapping"):
        jobs.load_runtime_env_template(bad)
    with pytest.raises(ValueError, match="missing.yaml: runtime_env template not found"):
        jobs.load_runtime_env_template(tmp_path / "missing.yaml")
    assert jobs.masked_command("python -m x train run.storage_options.secret=abc a.b=1") == \
        "python -m x train 'run.storage_options.secret=***' a.b=1"
    proc = subprocess.run([ARFLOW, "jobs", "list", "--address", f"http://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot reach the Ray dashboard" in proc.stderr


# --- a real loopback cluster -------------------------------------------------------------------

@pytest.fixture(scope="module")
def loopback_cluster():
    """`ray start --head --block` on 127.0.0.1 with the dashboard and token auth; killed by process group."""
    temp = Path(tempfile.mkdtemp(prefix="arfr", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    argv = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=2", "--object-store-memory=268435456", f"--temp-dir={temp / 'ray'}",
            "--include-dashboard=true", "--disable-usage-stats"]
    log = (temp / "ray_start.log").open("w")
    head = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while not _listening(dashboard) and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # a socket probe first: each `arflow jobs list` costs a process start
        while True:
            probe = subprocess.run([ARFLOW, "jobs", "list", "--address", address], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"loopback Ray did not start: {(temp / 'ray_start.log').read_text()[-3000:]}")
            time.sleep(2)
        yield {"address": address, "env": env, "temp": temp}
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM the cluster's process group (only what `ray start` spawned), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            head.poll()
            try:
                os.killpg(head.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    head.wait(timeout=10)


def _train_args(folder: Path, steps: int) -> list[str]:
    return ["train", "--config", str(REPO / "configs/demo.yaml"), f"train.steps={steps}",
            "cluster.num_workers=1", "cluster.local_num_cpus=2", "train.log_every=1", "train.sample_every=0",
            "train.sample_steps=2", "checkpoint.every=1000", "tracking.system_metrics=false",
            f"run.storage_path={folder / 'runs'}", "run.name=submitted", f"data.manifest={folder / 'digits'}",
            f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]


@pytest.mark.slow
def test_submit_training_follow_list_logs(loopback_cluster, tmp_path):
    cluster = loopback_cluster
    secret = secrets.token_hex(16)
    env = {**cluster["env"], "AWS_SECRET_ACCESS_KEY": secret}
    proc = subprocess.run([ARFLOW, "submit", "--address", cluster["address"], "--follow",
                           "--env", "DS_ACCELERATOR=cpu", "--env", "TORCH_EXTENSIONS_DIR",
                           "--", *_train_args(tmp_path, steps=3)],
                          env={**env, "TORCH_EXTENSIONS_DIR": os.environ.get(
                              "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED" and result["address"] == cluster["address"]
    submission_id = result["submission_id"]
    trained = json.loads([line for line in proc.stderr.splitlines() if '"final_step"' in line][-1])
    assert trained["final_step"] == 3 and trained["checkpoint"]
    assert (tmp_path / "runs" / "submitted").is_dir()  # the job wrote where we told it to
    assert secret not in proc.stdout + proc.stderr

    listed = subprocess.run([ARFLOW, "jobs", "list", "--address", cluster["address"]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    jobs_listed = {j["submission_id"]: j for j in json.loads(listed.stdout.strip().splitlines()[-1])["jobs"]}
    assert jobs_listed[submission_id]["status"] == "SUCCEEDED"
    assert "arflow_scale.cli" in jobs_listed[submission_id]["entrypoint"]
    assert secret not in listed.stdout + listed.stderr

    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    refused = subprocess.run([ARFLOW, "jobs", "list", "--address", cluster["address"]],
                             env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "refused" in refused.stderr

    logs = subprocess.run([ARFLOW, "jobs", "logs", submission_id, "--address", cluster["address"]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and '"final_step": 3' in logs.stdout
    assert json.loads(logs.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    missing = subprocess.run([ARFLOW, "jobs", "logs", "raysubmit_nope", "--address", cluster["address"]],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "raysubmit_nope" in missing.stderr


@pytest.mark.slow
def test_stopping_a_submitted_run_checkpoints_it(loopback_cluster, tmp_path):
    """`arflow jobs stop` sends SIGTERM: the training run checkpoints its next step and the job is STOPPED."""
    cluster = loopback_cluster
    proc = subprocess.run([ARFLOW, "submit", "--address", cluster["address"], "--env", "DS_ACCELERATOR=cpu",
                           "--", *_train_args(tmp_path, steps=100000)],
                          env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    submission_id = json.loads(proc.stdout.strip().splitlines()[-1])["submission_id"]
    follow = subprocess.Popen([ARFLOW, "jobs", "logs", submission_id, "--follow", "--address", cluster["address"]],
                              env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        logs = []
        for line in follow.stdout:  # stop it once it trains
            logs.append(line)
            if "step 1/100000" in line:
                break
        stop = subprocess.run([ARFLOW, "jobs", "stop", submission_id, "--wait", "--address", cluster["address"]],
                              env=cluster["env"], capture_output=True, text=True, timeout=180)
        logs.append(follow.stdout.read())  # to the job's end
    finally:
        follow.kill()
        follow.wait()
    assert stop.returncode == 0, stop.stderr
    assert json.loads(stop.stdout.strip().splitlines()[-1])["status"] == "STOPPED"
    stopped = re.search(r"stopped on SIGTERM at step (\d+), checkpoint (\S+);", "".join(logs))
    assert stopped, "".join(logs)[-3000:]
    checkpoint = Path(stopped.group(2))
    assert checkpoint.name == f"checkpoint_{int(stopped.group(1)):09d}" and (checkpoint / "meta.json").is_file()
