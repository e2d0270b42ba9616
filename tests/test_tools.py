"""The one-off scripts in tools/ run as users call them (subprocesses), on small real inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tool_module


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_prepare_imagenet_writes_class_grouped_shards(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("n01440764", "n01443537"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{cls}_{i}.JPEG")
    out = tmp_path / "shards"
    proc = run_tool("prepare_imagenet.py", "--root", str(tmp_path / "train"), "--out", str(out),
                    "--image-size", "16", "--samples-per-shard", "2", "--min-shards-per-class", "1", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["classes"] == 2 and result["shards"] == 4  # 3 images per class, 2 per shard
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["class_names"]) == ["n01440764", "n01443537"]
    assert manifest["sample_shape"] == [3, 16, 16]  # ADM center crop + resize to --image-size
    assert all(s["count"] in (1, 2) for s in manifest["shards"])


def test_prepare_imagenet_encodes_with_a_vae_and_flip_copies(tmp_path):
    """--vae with --flip-copy: latents of each image and of its mirror image, the VAE in the manifest."""
    from test_vae import save_tiny_vae

    for cls in ("n01", "n02"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((20, 24, 3), 60 * i + 10, np.uint8)).save(tmp_path / "train" / cls / f"{i}.JPEG")
    vae = save_tiny_vae(tmp_path / "vae")
    out = tmp_path / "latents"
    proc = run_tool("prepare_imagenet.py", "--root", str(tmp_path / "train"), "--out", str(out), "--image-size", "16",
                    "--min-shards-per-class", "1", "--workers", "1", "--vae", str(vae), "--flip-copy")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sample_shape"] == [2, 4, 4, 4] and manifest["latents"]["flip_copy"] is True
    assert manifest["latents"]["vae"]["source"] == str(vae.resolve()) and manifest["latents"]["latent_shape"] == [4, 4, 4]


def test_scaling_report_fits_a_csv(tmp_path):
    params = np.logspace(6, 9, 8)
    flops = params * 6e9
    loss = 8.0 * params ** -0.3
    csv = tmp_path / "points.csv"
    csv.write_text("params,flops,loss\n" + "".join(f"{p},{c},{l}\n" for p, c, l in zip(params, flops, loss)))
    proc = run_tool("scaling_report.py", "--csv", str(csv), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    fits = json.loads(proc.stdout.strip().splitlines()[-1])["fits"]
    assert abs(fits["loss_vs_params"]["alpha"] - 0.3) < 1e-6
    assert (tmp_path / "report" / "scaling.md").is_file()


def test_run_benchmarks_rejects_unknown_names(tmp_path):
    proc = run_tool("run_benchmarks.py", "--only", "attention,nope", "--out", str(tmp_path / "b.jsonl"))
    assert proc.returncode != 0 and "nope" in proc.stderr


def test_gpu_check_cpu_variant_bf16_deepspeed():
    """tools/gpu_check.py's checks run on CPU too; in bf16 every ZeRO stage (0 included) hands back its
    fp32 master weights, live and from the checkpoint, its EMA averages them, and a restored
    checkpoint continues with the same losses."""
    proc = run_tool("gpu_check.py", "--device", "cpu", "--size", "tiny/2", "--precision", "bf16", "--steps", "6")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = {line["check"]: line for line in lines if "check" in line}
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    assert {"deepspeed/zero0_bf16", "deepspeed/zero2_bf16", "deepspeed/zero3_bf16", "model/cache_vs_full",
            "attention/float32", "farmer/log_density_fp32_vs_cpu_fp64", "farmer/deepspeed_zero3_fp32"} <= set(checks)
    if os.environ.get("TRITON_INTERPRET") == "1":  # both hybrid kernel paths, in the interpreter on CPU
        assert {"attention_triton/float32_d16_chunk20", "attention_triton_sdpa/float32_d16_chunk20"} <= set(checks)
    for stage in (0, 2, 3):
        check = checks[f"deepspeed/zero{stage}_bf16"]
        assert 0 < check["bf16_weights_vs_master_rel"] <= 2 ** -8  # bf16 weights = rounded fp32 masters
        assert check["export_vs_master"] == 0  # the checkpoint's raw weights are the masters, not the bf16 copy
        assert check["ema_source_vs_master"] == 0  # the EMA averages the fp32 masters, also after a restore


def test_gpu_check_refuses_a_deepspeed_check_without_steps():
    proc = run_tool("gpu_check.py", "--device", "cpu", "--only", "deepspeed", "--steps", "0")
    assert proc.returncode == 2 and "--steps: needs at least one step, got 0" in proc.stderr


def test_floor_constraints_pin_the_checked_floors_which_this_environment_meets(tmp_path):
    from importlib.metadata import version

    from packaging.version import Version

    sys.path.insert(0, str(REPO / "tools"))
    try:
        from floor_constraints import CHECKED, floor_constraints
    finally:
        sys.path.remove(str(REPO / "tools"))
    proc = run_tool("floor_constraints.py")
    assert proc.returncode == 0, proc.stderr
    pins = dict(line.split("==") for line in proc.stdout.split())
    assert list(pins) == list(CHECKED)
    for name, floor in pins.items():
        assert Version(version(name)) >= Version(floor), (name, version(name), floor)
    without_tomllib = subprocess.run(  # as on Python 3.10, which has no tomllib
        [sys.executable, "-c", "import runpy, sys; sys.modules['tomllib'] = None; "
         "runpy.run_path('tools/floor_constraints.py', run_name='__main__')"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert (without_tomllib.returncode, without_tomllib.stdout) == (0, proc.stdout), without_tomllib.stderr

    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\ndependencies = ["ray[train]>=2.59,<3", "deepspeed>=0.18", "mlflow>=2.22"]\n')
    with pytest.raises(ValueError, match=r"pyproject.toml: project.dependencies 'ray\[train\]>=2.59,<3': "):
        floor_constraints(bad)
    bad.write_text('[project]\ndependencies = ["ray>=2.59", "mlflow>=2.22"]\n')
    with pytest.raises(ValueError, match="has no floor for deepspeed"):
        floor_constraints(bad)
    assert floor_constraints(bad, ("ray", "mlflow")) == ["ray==2.59", "mlflow==2.22"]


def test_gpu_session_runs_steps_in_order_kills_an_overrun_and_skips_what_the_budget_cannot_hold(tmp_path):
    session = tool_module("gpu_session")
    py = sys.executable
    steps = [("ok", [py, "-c", "print('{\"x\": 1}'); print('text')"], 60),
             ("overrun", [py, "-c", "import time; print('{\"started\": 1}', flush=True); time.sleep(120)"], 3),
             ("failing", [py, "-c", "import sys; sys.exit(4)"], 60),
             ("late", [py, "-c", "print(1)"], 10_000)]
    outcomes = {o.name: o for o in session.run_plan(steps, 300, tmp_path, dict(os.environ))}
    assert list(outcomes) == ["ok", "overrun", "failing", "late"]
    ok, overrun = outcomes["ok"], outcomes["overrun"]
    assert (ok.returncode, ok.timed_out, ok.json_lines) == (0, False, 1)
    assert overrun.timed_out and overrun.seconds < 60 and overrun.returncode != 0
    assert outcomes["failing"].returncode == 4
    assert outcomes["late"].returncode is None and "timeout 10000 s exceeds the" in outcomes["late"].skipped
    # the killed step's line printed before its timeout is kept; every line says its step
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert results == [{"step": "ok", "x": 1}, {"step": "overrun", "started": 1}]
    logs = (tmp_path / "logs.txt").read_text()
    assert logs.index("== ok: ") < logs.index("text") < logs.index("== overrun: ") < logs.index("== failing: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.txt", "results.jsonl", "session.json"]
    steps = json.loads((tmp_path / "session.json").read_text())["steps"]
    assert [(s["name"], s["returncode"], s["skipped"] is None) for s in steps] == \
        [("ok", 0, True), ("overrun", overrun.returncode, True), ("failing", 4, True), ("late", None, False)]


def test_gpu_session_plan_is_accepted_by_its_tools_and_runs_on_cpu(tmp_path, capsys):
    session, bench = tool_module("gpu_session"), tool_module("gpu_bench")
    for step in session.PLAN:
        for smoke in (False, True):
            argv = session.tool_argv(step, tmp_path, "cpu" if smoke else "cuda", smoke)
            assert argv[1] == str(REPO / "tools" / step.tool) and "{traces}" not in " ".join(argv)
            if step.tool == "gpu_bench.py":
                bench.parse_args(argv[2:])  # a parser error exits (SystemExit)
            else:
                assert step.tool == "gpu_check.py" and argv[2:4] == ["--only", "attention_triton"]
    assert session.main(["--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in plan] == [s.name for s in session.PLAN]
    assert "past the budget" not in plan[0] and "past the budget" in plan[-1]
    with pytest.raises(SystemExit, match="2"):
        session.main(["--only", "attention,bogus"])
    assert "unknown step(s) bogus" in capsys.readouterr().err
    assert session.main(["--device", "cpu", "--smoke", "--only", "check_attention_triton", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "session.json").read_text())
    assert [(s["name"], s["returncode"]) for s in summary["steps"]] == [("check_attention_triton", 0)]
    assert summary["deepspeed"] is None  # importable here: nothing installed
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert results[-1]["step"] == "check_attention_triton" and results[-1]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.txt", "results.jsonl", "session.json"]


@pytest.mark.parametrize("argv, comm, kind", [
    (["ray::RayTrainWorker.run_train_fn"], "ray::RayTrainW", "ray::RayTrainWorker"),
    (["ray::IDLE"], "ray::IDLE", "ray::IDLE"),
    (["/venv/bin/python", "-u", "-m", "pytest", "-q"], "python", "python -m pytest"),
    (["/venv/bin/python3.11", "/repo/tools/gpu_bench.py", "--smoke"], "python3.11", "python gpu_bench.py"),
    (["python", "-c", "import sys"], "python", "python -c"),
    (["/usr/lib/gcc/x86_64-linux-gnu/12/cc1plus", "-quiet"], "cc1plus", "cc1plus"),
    (["/venv/bin/python -u /venv/ray/_private/log_monitor.py --logs-dir=/tmp"], "python", "python log_monitor.py"),
    ([], "kworker/1:0H", "[kworker/1:0H]"),
])
def test_cpu_by_process_names_processes_by_the_job_they_do(argv, comm, kind):
    assert tool_module("cpu_by_process").process_kind(argv, comm) == kind


def test_cpu_by_process_counts_a_childs_cpu_once_under_its_kind_and_passes_the_exit_code(tmp_path, capsys):
    """The command idles while its child burns 0.6 s of CPU, then sleeps (so a sample sees all of it): the child's
    kind holds that CPU, counted once (the parent does not add its child's time), and the exit code is the
    command's. Scripts of unique names: the tool counts every process on the machine, the suite's others too."""
    import uuid

    tool = tool_module("cpu_by_process")
    child, parent = tmp_path / f"burn_{uuid.uuid4().hex}.py", tmp_path / f"parent_{uuid.uuid4().hex}.py"
    child.write_text("import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
                     "time.sleep(0.5)\n")
    parent.write_text(f"import subprocess, sys\nsubprocess.run([sys.executable, {str(child)!r}])\nsys.exit(3)\n")
    assert tool.main(["--json", "--interval", "0.05", "--", sys.executable, str(parent)]) == 3
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["exit_code"] == 3 and report["wall_s"] >= 0.6
    burned = report["by_kind"][f"python {child.name}"]
    assert 0.55 <= burned["cpu_s"] <= 1.0 and burned["processes"] == 1, report
    assert report["by_kind"][f"python {parent.name}"]["cpu_s"] < 0.4 and report["cpu_s"] >= burned["cpu_s"]
    with pytest.raises(SystemExit):
        tool.main(["--json"])  # no command

