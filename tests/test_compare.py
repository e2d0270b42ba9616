"""Comparisons at equal compute: the arms' steps and FLOPs, one FID protocol across arms, bad files naming their
key, the GPU plan's cost, the table and plot (fast); a tiny comparison of two arms end to end with an
interrupted arm resumed on one Ray, finished arms and evaluations skipped and a redone evaluation reproduced
(slow)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import yaml

from arflow_scale.config import ConfigError
from arflow_scale.model import forward_flops
from arflow_scale.scaling.compare import compare_cost, fid_protocol, load_compare, plan_arms
from arflow_scale.scaling.compare_report import CompareRow, plot_fid_vs_flops, table_markdown
from arflow_scale.scaling.sweep import sequences_per_step

REPO = Path(__file__).resolve().parents[1]
ARFLOW = str(Path(sys.executable).with_name("arflow"))
CPU = REPO / "configs/compare/fashion-mnist-cpu.yaml"
GPU = REPO / "configs/compare/imagenet128-gpu.yaml"


def test_cpu_arms_spend_equal_flops_with_checkpoints_on_the_evaluation_steps(tmp_path):
    compare, folder = load_compare(CPU, [f"storage_path={tmp_path}"])
    arms = plan_arms(compare, folder)
    assert [a.name for a in arms] == ["arflow-k5", "sit", "arflow-k5-full"]
    flops = [a.point.flops for a in arms]
    assert max(flops) / min(flops) - 1 < 0.02 and all(abs(f / compare.flops - 1) < 0.02 for f in flops)
    for arm in arms:
        cfg = arm.config
        assert arm.point.flops_per_step == 3 * forward_flops(cfg.model) * sequences_per_step(cfg)
        assert cfg.train.steps == arm.point.steps and cfg.run.name == f"fashion-mnist-cpu-{arm.name}"
        assert arm.evaluation_steps == [arm.point.steps // 2, arm.point.steps]
        assert all(step % cfg.checkpoint.every == 0 for step in arm.evaluation_steps)  # a checkpoint at each
        assert cfg.checkpoint.keep_last >= arm.point.steps // cfg.checkpoint.every  # and none deleted
        assert all(step % cfg.eval.val_every == 0 for step in arm.evaluation_steps)  # a held-out loss at each
        assert cfg.eval.fid_every == 0 and not cfg.eval.fid_at_end  # FID after training, from the checkpoints
        assert Path(cfg.eval.ref_stats).is_absolute() and Path(cfg.data.manifest).is_absolute()
        assert sequences_per_step(cfg) * cfg.model.k == 80  # every arm sees 80 images per step
    by_name = {a.name: a.config.model for a in arms}
    assert (by_name["sit"].k, by_name["sit"].attention) == (1, "intra")
    assert (by_name["arflow-k5"].k, by_name["arflow-k5"].attention) == (5, "hybrid")
    assert (by_name["arflow-k5-full"].k, by_name["arflow-k5-full"].attention) == (5, "full")
    assert len({a.config.data.manifest for a in arms}) == 1


def test_every_arm_resolves_to_one_fid_protocol(tmp_path):
    compare, folder = load_compare(CPU, [f"storage_path={tmp_path}"])
    arms = plan_arms(compare, folder)
    protocols = [fid_protocol(arm) for arm in arms]
    assert all(p == protocols[0] for p in protocols)
    assert protocols[0]["num_samples"] * len(compare.seeds) >= 5000  # FID from at least 5,000 samples per arm
    for seed in compare.seeds:
        plans = [arm.fid_plan(seed) for arm in arms]
        assert all(plan == plans[0] for plan in plans) and plans[0].eval.seed == seed
        assert len({plan.sample_settings for plan in plans}) == 1
    assert arms[0].fid_plan(0) != arms[0].fid_plan(1)
    # an arm that would be sampled differently, or trained on other shards, is refused naming the key and arms
    with pytest.raises(ConfigError, match=r"eval\.cfg_scale: arm sit has 1\.5, arm arflow-k5 1\.0"):
        plan_arms(*load_compare(_cpu_with_sit_overrides(tmp_path, "eval.cfg_scale=1.5")))
    with pytest.raises(ConfigError, match=r"eval\.steps: arm sit has 50, arm arflow-k5 20"):
        plan_arms(*load_compare(_cpu_with_sit_overrides(tmp_path, "eval.steps=50")))
    with pytest.raises(ConfigError, match=r"data\.manifest: arm sit trains on '.*elsewhere', arm arflow-k5 on"):
        plan_arms(*load_compare(_cpu_with_sit_overrides(tmp_path, "data.manifest=elsewhere")))


def _cpu_with_sit_overrides(tmp_path: Path, *extra: str) -> Path:
    """The CPU comparison with more overrides on its SiT arm, storage under tmp_path."""
    data = yaml.safe_load(CPU.read_text())
    data["base"] = str((CPU.parent / data["base"]).resolve())
    data["storage_path"] = str(tmp_path)
    data["arms"][1]["overrides"] += list(extra)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("override, message", [
    ("seeds=[0]", "seeds: needs at least two distinct sampling seeds"),
    ("evaluations=[0.5, 0.5]", "evaluations: must increase strictly"),
    ("evaluations=[0.5, 1.5]", r"evaluations: fractions must lie in \(0, 1\]"),
    ("baseline=dit", "baseline: 'dit' is not an arm"),
    ("arms=[{name: solo}]", "arms: a comparison needs at least two arms"),
    ("arms=[{name: a}, {name: a}]", "arms: arm names must be distinct"),
    ("arms=[{name: a, overrides: [train.steps=5]}, {name: b}]", r"arms\[0\]\.overrides: 'train.steps=5': the "
                                                                "comparison sets train.steps"),
    ("arms=[{name: a, overrides: [checkpoint.every=5]}, {name: b}]", "sets checkpoint for every arm"),
    ("reference.source=cifar", "reference.source: 'cifar' is not one of"),
    ("evaluations=[0.001, 1.0]", "checkpoints_per_interval: 1000 checkpoints per arm"),
    ("flops=-1", "flops: must be > 0"),
    ("name=a/b", "name"),
    ("colour=red", "colour: unknown key"),
])
def test_bad_comparison_files_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_compare(CPU, [override])


def test_a_budget_too_small_for_equal_flops_is_refused(tmp_path):
    compare, folder = load_compare(CPU, [f"storage_path={tmp_path}", "flops=1e11"])  # a few steps per arm
    with pytest.raises(ConfigError, match=r"flops: the arms' training FLOPs differ by \d+\.\d%"):
        plan_arms(compare, folder)


def test_cpu_dry_run_counts_the_fid_work(capsys, tmp_path):
    from arflow_scale.cli import main

    assert main(["compare", "--config", str(CPU), "--dry-run", f"storage_path={tmp_path}"]) == 0
    dry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [a["arm"] for a in dry["arms"]] == ["arflow-k5", "sit", "arflow-k5-full"]
    cost = dry["cost"]
    assert cost["inception_images"] == 3 * 2 * 2 * 2500 and "gpu_hours" not in cost
    assert cost["train_flops"] == pytest.approx(sum(a["flops"] for a in dry["arms"]))
    sampling = {a["arm"]: a["sampling_flops"] for a in dry["arms"]}
    assert sampling["arflow-k5-full"] > sampling["arflow-k5"]  # the dense cache grows with every sampler step


def test_imagenet128_gpu_plan_and_cost(capsys):
    from arflow_scale.cli import main

    assert main(["compare", "--config", str(GPU), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    dry = json.loads(out[-1])
    arms = {a["arm"]: a for a in dry["arms"]}
    assert {"arflow-k5", "sit", "arflow-k5-full"} <= set(arms)
    assert (arms["sit"]["k"], arms["sit"]["attention"]) == (1, "intra")
    flops = [a["flops"] for a in dry["arms"]]
    assert max(flops) / min(flops) - 1 < 0.02
    protocol = dry["protocol"]
    assert protocol["cfg_scale"] == 1.5 and protocol["sampler"] == "sde" and protocol["steps"] == 250
    assert protocol["num_samples"] * len(dry["seeds"]) == 50000  # pooled: FID-50k, as the paper reports
    assert "GPU-hours on H100" in out[-2] and dry["cost"]["gpu_hours"] > 0
    assert dry["cost"]["gpu_hours"] == pytest.approx(
        (dry["cost"]["train_flops"] + dry["cost"]["sampling_flops"]) / (989e12 * 0.35) / 3600)
    compare, folder = load_compare(GPU)
    assert compare_cost(plan_arms(compare, folder), len(compare.seeds)).inception_images == \
        len(dry["arms"]) * len(dry["evaluations"]) * 50000


def _rows() -> list[CompareRow]:
    return [CompareRow("arflow", "ARFlow", 0.5, 10, 1e12, fid=30.0, n=200, fid_seeds={0: 31.0, 1: 32.5},
                       train_loss=0.5, val_loss=0.52, val_loss_ema=0.51, fid_vs_baseline=-5.0),
            CompareRow("arflow", "ARFlow", 1.0, 20, 2e12, fid=20.0, n=200, fid_seeds={0: 21.0, 1: 22.0}),
            CompareRow("sit", "SiT", 0.5, 12, 1.01e12, fid=35.0, n=200, fid_seeds={0: 36.0, 1: 36.5},
                       fid_vs_baseline=0.0),
            CompareRow("sit", "SiT", 1.0, 24, 2.02e12)]  # not evaluated yet


def test_table_has_one_line_per_arm_and_budget_with_seed_spread(tmp_path):
    compare, _ = load_compare(CPU, ["baseline=sit"])
    table = table_markdown(_rows(), compare, seeds_n=100)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 4 and "FID - sit" in lines[0] and "FID per seed (n = 100 each)" in lines[0]
    assert "| ARFlow | 0.5 | 10 | 1e+12 | 30 (200) | 31, 32.5 | 1.5 | -5 | 0.5 | 0.52 | 0.51 |" == lines[2]
    assert lines[-1].startswith("| SiT | 1 | 24 |") and lines[-1].count("| - ") == 7
    path = plot_fid_vs_flops(_rows(), tmp_path / "fid.png", "title")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.filterwarnings("ignore:FID from only")
def test_pooled_fid_merges_the_seeds_and_is_redone_only_when_a_seed_changes(tmp_path):
    import numpy as np

    from arflow_scale.eval.frechet import fid_from_stats
    from arflow_scale.eval.stats import GaussianStats
    from arflow_scale.scaling.compare_eval import Evaluation, pooled_fid
    from arflow_scale.scaling.state import write_json

    rng, root = np.random.default_rng(0), str(tmp_path)
    reference = GaussianStats.from_features(rng.normal(size=(50, 4)))
    parts = {seed: GaussianStats.from_features(rng.normal(0.5, 1.0, size=(40, 4))) for seed in (0, 1)}
    loads = []

    def load_reference():
        loads.append(1)
        return reference

    assert pooled_fid("a", 10, [0, 1], root, {}, load_reference) is None  # no seed evaluated yet
    for seed, stats in parts.items():
        ev = Evaluation("a", 10, seed)
        stats.save(ev.url(root, ".npz"))
        write_json(ev.url(root, ".json"), {"seed": seed, "fid": fid_from_stats(stats, reference, 2)}, {})
    pooled = pooled_fid("a", 10, [0, 1], root, {}, load_reference)
    merged = GaussianStats.merge_all(list(parts.values()))
    assert pooled["n"] == 80 and pooled["fid"] == fid_from_stats(merged, reference, 2)
    assert pooled["fid_seeds"] == {str(seed): fid_from_stats(stats, reference, 2) for seed, stats in parts.items()}
    assert pooled_fid("a", 10, [0, 1], root, {}, load_reference) == pooled and len(loads) == 1  # kept, not redone
    write_json(Evaluation("a", 10, 1).url(root, ".json"), {"seed": 1, "fid": 0.5}, {})  # seed 1 evaluated again
    assert pooled_fid("a", 10, [0, 1], root, {}, load_reference)["fid_seeds"]["1"] == 0.5 and len(loads) == 2


def test_an_evaluation_made_under_another_protocol_is_refused(tmp_path):
    from arflow_scale.scaling.compare_eval import evaluations, pending
    from arflow_scale.scaling.state import write_json

    compare, folder = load_compare(CPU, [f"storage_path={tmp_path}"])
    arms = plan_arms(compare, folder)
    root = str(tmp_path / "root")
    first = evaluations(arms[0], compare.seeds)[0]
    assert len(pending(arms, compare, root)) == 3 * 2 * 2
    record = {"protocol": fid_protocol(arms[0]), "flops_per_step": arms[0].point.flops_per_step}
    write_json(first.url(root, ".json"), record, {})
    assert first not in pending(arms, compare, root) and len(pending(arms, compare, root)) == 11
    write_json(first.url(root, ".json"), {**record, "protocol": {**record["protocol"], "steps": 50}}, {})
    with pytest.raises(ConfigError, match="evaluated under another FID protocol"):
        pending(arms, compare, root)


def _comparison_file(tmp_path: Path, *extra: str) -> Path:
    """Two arms (ARFlow K=3 hybrid, SiT K=1 intra) of a tiny digits model, a few steps each, FID of 2 seeds x 6
    samples at 1/2 and all of the budget against 24 reference digits; storage and tracking under tmp_path."""
    data = {
        "name": "tiny", "base": str(REPO / "configs/demo.yaml"), "flops": 1.66e8, "evaluations": [0.5, 1.0],
        "seeds": [0, 1], "baseline": "sit", "checkpoints_per_interval": 2, "flops_tolerance": 0.25,
        "arms": [{"name": "arflow", "overrides": ["model.k=3"]},
                 {"name": "sit", "overrides": ["model.k=1", "model.attention=intra", "data.batch_size=12",
                                               "eval.val_sequences=60"]}],
        "overrides": ["model.size=custom/2", "model.depth=1", "model.width=32", "model.heads=1",
                      f"data.manifest={tmp_path / 'digits'}", "run.prepare_val_per_class=8", "data.batch_size=4",
                      "cluster.num_workers=1", "cluster.local_num_cpus=2", "train.zero_stage=1",
                      "train.log_every=1", "train.sample_every=0", "train.sample_steps=2", "optim.warmup_steps=0",
                      "tracking.system_metrics=false", "run.max_failures=0", "eval.val_sequences=20",
                      f"eval.ref_stats={tmp_path / 'ref.npz'}", "eval.num_samples=6", "eval.steps=2",
                      "eval.tasks=1", "eval.feature_batch_size=6", *extra],
        "reference": {"data": str(tmp_path / "reference"), "source": "digits", "split": "train", "num": 24,
                      "samples_per_shard": 200},
        "storage_path": str(tmp_path / "compare"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _arflow(*args: str, ray_tmp: Optional[str] = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ARFLOW_RAY_TMP": ray_tmp} if ray_tmp else None
    return subprocess.run([ARFLOW, *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:FID from only")
def test_tiny_comparison_end_to_end_resumes_and_skips_finished_work(ray_local, tmp_path, capsys):
    """Steps 1, 3 and 4 run in-process on the session's Ray; step 2 is `arflow compare` on a Ray of its own."""
    import ray.train
    from mlflow.tracking import MlflowClient

    from arflow_scale.cli import main
    from arflow_scale.scaling.compare_run import run_compare

    def status() -> dict:  # `arflow compare --status`: storage only, no training
        assert main(["compare", "--config", str(_comparison_file(tmp_path)), "--status"]) == 0
        arms = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arms"]
        return {a["arm"]: (a["state"], a["step"], a["evaluations_done"], a["evaluations"]) for a in arms}

    root = tmp_path / "compare/tiny"
    # 1: the first arm crashes after its step-2 checkpoint (an interrupted comparison).
    with pytest.raises(ray.train.TrainingFailedError, match="faults.crash_rank_at_step=2: injected crash"):
        run_compare(*load_compare(_comparison_file(tmp_path, "faults.crash_rank_at_step=2")))
    parent_run_id = json.loads((root / "compare.json").read_text())["parent_run_id"]
    assert (tmp_path / "ref.npz").is_file()  # the reference statistics, made first and kept
    assert [p.name for p in (root / "runs").iterdir()] == ["tiny-arflow"] and not (root / "points").exists()
    interrupted_run = json.loads((root / "runs/tiny-arflow/mlflow_run.json").read_text())["run_id"]
    assert status() == {"arflow": ("started", 2, 0, 4), "sit": ("not started", 0, 0, 4)}

    # 2: rerun without the fault: the first arm resumes, the second trains, every arm is evaluated, a report;
    # all of it on one local Ray, started once (a Ray session folder per start).
    ray_tmp = tempfile.mkdtemp(prefix="arflow-cmp-", dir="/tmp")  # Ray's socket paths must stay short
    try:
        resumed = _arflow("compare", "--config", str(_comparison_file(tmp_path)), ray_tmp=ray_tmp)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert len(list(Path(ray_tmp).glob("session_2*"))) == 1
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["parent_run_id"] == parent_run_id and summary["trained"] == ["arflow", "sit"]
    assert len(summary["evaluated"]) == 2 * 2 * 2  # arms x evaluation steps x seeds
    compare, folder = load_compare(_comparison_file(tmp_path))
    arms = {a.name: a for a in plan_arms(compare, folder)}
    rows = summary["rows"]
    assert [(r["arm"], r["step"]) for r in rows] == [(name, step) for name, arm in arms.items()
                                                     for step in arm.evaluation_steps]
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    for row in rows:
        assert row["n"] == 12 and len(row["fid_seeds"]) == 2 and row["fid"] > 0
        assert row["flops"] == arms[row["arm"]].flops_at(row["step"])
        assert row["val_loss"] > 0 and row["val_loss_ema"] > 0 and row["train_loss"] > 0
        record = json.loads((root / "points" / f"tiny-{row['arm']}.json").read_text())
        fids = client.get_metric_history(record["run_id"], "fid")
        assert [m.value for m in fids if m.step == row["step"]] == [pytest.approx(row["fid"])]
        seeds = [m.value for s in (0, 1) for m in client.get_metric_history(record["run_id"], f"fid_seed_{s}")
                 if m.step == row["step"]]
        assert sorted(seeds) == pytest.approx(sorted(row["fid_seeds"].values()))
    assert {r["fid_vs_baseline"] for r in rows if r["arm"] == "sit"} == {0.0}
    protocols = [json.loads(p.read_text())["protocol"] for p in (root / "evals").rglob("*_seed_*.json")]
    assert len(protocols) == 8 and all(p == protocols[0] for p in protocols)
    arflow_run = json.loads((root / "points/tiny-arflow.json").read_text())["run_id"]
    assert arflow_run == interrupted_run  # the same run, continued from its step-2 checkpoint
    steps = arms["arflow"].point.steps
    assert {m.step for m in client.get_metric_history(arflow_run, "loss")} == set(range(1, steps + 1))
    children = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    assert {r.info.run_name for r in children} == {"tiny-arflow", "tiny-sit"}
    parent = client.get_run(parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["arflow.compare"] == "tiny"
    artifacts = {a.path for a in client.list_artifacts(parent_run_id, "compare")}
    assert {"compare/table.md", "compare/results.csv", "compare/results.json", "compare/fid_vs_flops.png"} <= artifacts
    assert (root / "report/fid_vs_flops.png").is_file() and "| sit |" in (root / "report/table.md").read_text()

    # 3: a lost evaluation is redone alone, with the same samples (seeded), so the same FID; nothing retrains.
    lost = root / "evals/sit" / f"step_{arms['sit'].evaluation_steps[0]:09d}_seed_1.json"
    lost.unlink()
    assert status() == {"arflow": ("finished", arms["arflow"].point.steps, 4, 4),
                        "sit": ("finished", arms["sit"].point.steps, 3, 4)}
    again = run_compare(compare, folder)
    assert again["trained"] == [] and again["skipped"] == ["arflow", "sit"]
    assert again["evaluated"] == [f"sit@{arms['sit'].evaluation_steps[0]}/seed1"]
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in rows]
    assert json.loads(lost.read_text())["fid"] == rows[2]["fid_seeds"]["1"]
    # 4: everything finished: no training, no evaluation, the same table.
    final = run_compare(compare, folder)
    assert final["trained"] == [] and final["evaluated"] == [] and final["table"] == again["table"]
