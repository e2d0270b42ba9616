"""tools/gpu_bench.py as a GPU session runs it, tiny on CPU (`--device cpu --smoke`), on a machine without Ray,
MLflow or webdataset (the import blocker of test_layering): every section prints its JSON lines, and our engine,
eager and compiled, trains on the same losses as a plain PyTorch loop."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO
from test_layering import BLOCKER

pytestmark = pytest.mark.slow  # DeepSpeed engines and CPU compilation (about a minute with a warm compile cache)
VARIANTS = "plain_eager,zero2_eager,zero2_compiled,zero3_compiled"


def test_gpu_bench_smoke_on_cpu_without_ray_mlflow_webdataset(tmp_path):
    argv = ["gpu_bench.py", "--device", "cpu", "--smoke", "--variants", VARIANTS, "--profile", str(tmp_path),
            "--profile-variant", "zero2_eager"]
    code = BLOCKER + f"import runpy; sys.argv = {argv!r}\nrunpy.run_path('tools/gpu_bench.py', run_name='__main__')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_kind: dict[str, list[dict]] = {}
    for line in lines:
        by_kind.setdefault(line["benchmark"], []).append(line)

    peak = by_kind["peak"][0]["tflops"]
    assert peak > 0
    variants = {line.get("variant") for line in by_kind["attention"]}
    assert {"intra", "full", "hybrid"} <= variants

    train = {line["variant"]: line for line in by_kind["train"]}
    assert set(train) == set(VARIANTS.split(",")), train
    reference = train["plain_eager"]["losses"]
    assert len(reference) == 3 and all(map(math.isfinite, reference))
    for name, line in train.items():
        assert 0 < line["host_ms"] <= line["step_ms"] * 1.001  # medians of the steps' parts and wholes
        assert line["images_per_s"] > 0 and line["mfu"] == pytest.approx(line["model_tflops"] / peak, rel=0.02)
        # the same weights, batch and noise: eager and compiled engines follow the plain loop (fp32 reordering)
        assert line["losses"] == pytest.approx(reference, rel=1e-4), name

    samples = {(line["attention_backend"], line["compiled"]): line for line in by_kind["sample"]}
    assert list(samples) == [("auto", False), ("auto", True)]  # --sample-backends: the first eager and compiled
    assert all(s["early_ms"] > 0 and s["late_ms"] > 0 for s in samples.values())
    assert samples["auto", True]["rows_per_call"] == 4  # 2 images, CFG: conditional + unconditional rows

    profile = by_kind["profile"][0]
    assert profile["top"] and (tmp_path / "engine_zero2_eager.json").stat().st_size > 0
    assert profile["wall_ms"] > 0 and profile["device_busy_fraction"] is None  # no device on CPU
    assert profile["host_reads_per_step"] >= 1  # DeepSpeed checks the gradient norm on the host


def test_gpu_bench_names_a_bad_list_entry_and_the_known_ones(capsys):
    """--only, --variants and --sample-backends refuse unknown entries before any work (parser error, exit 2)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(REPO / "tools"))
    for flag, value, known in (("--sample-backends", "auto,cuda", "auto, torch, triton, triton_sdpa"),
                               ("--variants", "zero4_eager", "plain_eager"), ("--only", "peak,speed", "attention")):
        with pytest.raises(SystemExit) as stop:
            gpu_bench.parse_args([flag, value])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and flag in error and value.split(",")[-1] in error and known in error
    assert gpu_bench.parse_args(["--sample-backends", "auto,torch,triton_sdpa"]).sample_backends.split(",")[2] == \
        "triton_sdpa"
