"""Stopping `arflow train` on request (train/stop.py), as a terminal's Ctrl-C and a scheduler's SIGTERM do it:
the first signal checkpoints a step soon after and the rerun continues bit-identically (the demo's recorded
hashes); a second signal stops at once, with nothing of the run left running. Real signals, a real `arflow train`
process on a real local Ray; rank 0 pauses after step 10 (`faults.pause_rank_at_step`) so that the signal
lands while the run trains. Fast: the driver's handlers and the error's exit codes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from arflow_scale.cli import main
from arflow_scale.train.result import TrainingStopped
from arflow_scale.train.nonfinite import StepConsensus, step_consensus
from arflow_scale.train.stop import StopPoll, StopSignals
from test_golden import DEMO_CONFIG, assert_golden

ARFLOW = str(Path(sys.executable).with_name("arflow"))


def test_the_first_signal_is_a_request_a_second_stops_and_the_handlers_are_restored():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signals = StopSignals()
    with signals.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs in this (main) thread at its next bytecode
        assert signals.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_a_stopped_run_exits_as_a_shell_reports_its_signal_and_survives_pickling():
    import pickle

    stopped = TrainingStopped(signal.SIGTERM, 20, "s3://bucket/runs/demo/checkpoint_000000020")
    assert stopped.exit_code == 143 and TrainingStopped(signal.SIGINT, None, None).exit_code == 130
    assert "at step 20, checkpoint s3://bucket/runs/demo/checkpoint_000000020" in str(stopped)
    again = pickle.loads(pickle.dumps(stopped))  # as a Ray task (a sweep's point) hands it to the driver
    assert (again.signum, again.step, again.checkpoint, str(again)) == (stopped.signum, 20, stopped.checkpoint,
                                                                        str(stopped))


def test_rank_zero_polls_the_sink_until_it_is_asked_and_stays_asked(ray_local):
    import ray

    from arflow_scale.train.console import ConsoleSink

    sink = ConsoleSink.remote()
    rank0, rank1 = StopPoll(sink, rank=0), StopPoll(sink, rank=1)
    deadline = time.monotonic() + 60
    assert not rank0.poll()
    while rank0.query is not None:  # a later poll reads the first query's answer (no stop yet)
        assert not rank0.poll() and time.monotonic() < deadline
    ray.get(sink.request_stop.remote())
    while not rank0.poll():  # each poll returns at once; one of them reads an answer given after the request
        assert time.monotonic() < deadline, "rank 0 never learned the stop request"
    assert rank0.poll() and rank0.query is None  # asked stays asked, without another query
    assert not rank1.poll() and rank1.query is None and not StopPoll(None, rank=0).poll()


def _consensus_rank(rank: int, init_file: str, asked: bool, losses: list[float], results) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results.put((rank, step_consensus([torch.tensor(v) for v in losses], stop_asked=asked)))
    dist.destroy_process_group()


def test_every_rank_learns_rank_zeros_stop_and_any_ranks_non_finite_loss_from_one_all_reduce(tmp_path):
    import math
    import multiprocessing

    import torch

    assert step_consensus([torch.tensor(1.0)], stop_asked=True) == StepConsensus(loss_finite=True, stop=True)
    assert step_consensus([torch.tensor(math.nan)], stop_asked=False) == StepConsensus(False, False)
    context = multiprocessing.get_context("fork")
    cases = [((True, False), ([1.0, 2.0], [math.inf, 1.0]), StepConsensus(loss_finite=False, stop=True)),
             ((False, False), ([1.0], [1.0]), StepConsensus(loss_finite=True, stop=False))]
    for case, (asked, losses, expected) in enumerate(cases):  # per rank: asked to stop, losses
        results = context.Queue()
        ranks = [context.Process(target=_consensus_rank, args=(r, str(tmp_path / f"init{case}"), asked[r],
                                                               losses[r], results)) for r in range(2)]
        for p in ranks:
            p.start()
        got = dict(results.get(timeout=60) for _ in ranks)
        for p in ranks:
            p.join(30)
        assert got == {0: expected, 1: expected}


def _demo_args(tmp_path: Path, pause_seconds: int) -> list[str]:
    """The golden demo run (60 steps, log every 10, checkpoints at 30 and 60), rank 0 pausing after step 10."""
    return [ARFLOW, "train", "--config", DEMO_CONFIG, "train.steps=60", "checkpoint.every=30", "train.sample_every=0",
            "tracking.system_metrics=false", f"run.storage_path={tmp_path}/runs", f"data.manifest={tmp_path}/digits",
            "faults.pause_rank_at_step=10", f"faults.pause_seconds={pause_seconds}"]


class Driver:
    """`arflow train` in its own process group (a terminal's foreground job), its stderr read line by line."""

    def __init__(self, args: list[str], ray_tmp: str):
        env = {**os.environ, "ARFLOW_RAY_TMP": ray_tmp}
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                        start_new_session=True)
        self.stderr: list[str] = []

    def wait_for(self, text: str) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            if text in line:
                return
        raise AssertionError(f"`arflow train` ended before printing {text!r}:\n" + "".join(self.stderr[-40:]))

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        """Exit code, stdout and the whole stderr (read to its end first: stdout holds one line at most)."""
        err = self.process.stderr.read()
        out = self.process.stdout.read()
        return self.process.wait(timeout=timeout), out, "".join(self.stderr) + err


@pytest.fixture()
def ray_tmp():
    path = tempfile.mkdtemp(prefix="arflow-stop-", dir="/tmp")  # Ray's socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_status(tmp_path: Path) -> str:
    from mlflow.tracking import MlflowClient

    tracking = json.loads((tmp_path / "runs/demo/mlflow_run.json").read_text())
    return MlflowClient(tracking["tracking_uri"]).get_run(tracking["run_id"]).info.status


@pytest.mark.slow
def test_ctrl_c_checkpoints_a_step_soon_after_and_the_rerun_continues_bit_identically(ray_local, tmp_path,
                                                                                       ray_tmp, capsys):
    driver = Driver(_demo_args(tmp_path, pause_seconds=12), ray_tmp)
    driver.wait_for("step 10/60")
    os.killpg(driver.process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    code, out, err = driver.finish()
    run = tmp_path / "runs/demo"
    assert code == 130, err[-3000:]
    stopped = re.search(rf"stopped on SIGINT at step (\d+), checkpoint {run}/(checkpoint_\d+);", err)
    assert stopped and out == "", err[-3000:]
    # rank 0 learns the request in the steps after its pause (between log steps) and every rank stops with it
    step = int(stopped.group(1))
    assert 10 < step < 20 and stopped.group(2) == f"checkpoint_{step:09d}"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == [stopped.group(2)]
    assert _run_status(tmp_path) == "KILLED" and not (run / "run.lock").exists()
    plan = _dry_run(tmp_path, capsys)
    assert (plan["action"], plan["checkpoint"], plan["from_step"], plan["steps_to_train"]) == (
        "resume", f"{run}/{stopped.group(2)}", step, 60 - step)

    assert main(_demo_args(tmp_path, pause_seconds=12)[1:]) == 0  # the same command, here on the session's Ray
    printed = capsys.readouterr()
    assert f"resumed from {run}/{stopped.group(2)} at step {step}" in printed.err
    result = json.loads(printed.out.strip().splitlines()[-1])
    assert_golden(result)  # as if never stopped
    assert _run_status(tmp_path) == "FINISHED"
    plan = _dry_run(tmp_path, capsys)
    assert (plan["action"], plan["checkpoint"], plan["from_step"], plan["steps_to_train"]) == (
        "finished", result["checkpoint"], 60, 0)


def _dry_run(tmp_path: Path, capsys) -> dict:
    """`arflow train --dry-run` of the demo command: its plan, after checking that it changed no file."""
    def files() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    before = files()
    assert main([*_demo_args(tmp_path, pause_seconds=12)[1:], "--dry-run"]) == 0
    assert files() == before
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_signal_stops_at_once_leaving_nothing_running(tmp_path, ray_tmp):
    driver = Driver(_demo_args(tmp_path, pause_seconds=300), ray_tmp)
    driver.wait_for("step 10/60")
    driver.process.send_signal(signal.SIGTERM)  # as a scheduler or `ray job stop` does: the driver alone
    driver.wait_for("SIGTERM received: the workers checkpoint their next step")
    signalled = time.monotonic()
    driver.process.send_signal(signal.SIGINT)
    code, out, err = driver.finish(timeout=120)
    assert code == 143 and "stopped on SIGTERM at once (a second signal)" in err, err[-3000:]
    assert time.monotonic() - signalled < 120  # rank 0 still pauses: the workers were ended, not waited for
    run = tmp_path / "runs/demo"
    assert not list(run.glob("checkpoint_*")) and not (run / "run.lock").exists()
    assert _run_status(tmp_path) == "KILLED"
    left = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the run's Ray still running: {left}"
