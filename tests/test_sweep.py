"""Scaling sweeps: grid and IsoFLOP expansion, FLOP budgets, tokens and cost (fast), and the CPU IsoFLOP sweep
end to end with an interrupted point resumed from its checkpoint, finished points skipped and every point scored
by its held-out validation loss (slow)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arflow_scale.config import ConfigError
from arflow_scale.model import count_parameters, forward_flops, resolve
from arflow_scale.scaling.sweep import eval_flops, expand, flops_per_step, load_sweep, sweep_cost

REPO = Path(__file__).resolve().parents[1]
ARFLOW = str(Path(sys.executable).with_name("arflow"))
CPU_TINY = REPO / "configs/sweeps/cpu-tiny.yaml"
CPU_ISOFLOP = REPO / "configs/sweeps/cpu-isoflop.yaml"
IMAGENET128 = REPO / "configs/sweeps/imagenet128.yaml"


def test_cpu_tiny_expands_to_sizes_times_budgets(tmp_path):
    sweep, folder = load_sweep(CPU_TINY, [f"storage_path={tmp_path}"])
    points = expand(sweep, folder)
    assert len(points) == len(sweep.sizes) * len(sweep.budget.steps) == 6
    assert len({p.name for p in points}) == 6
    for p in points:
        cfg = p.config
        assert p.params == count_parameters(cfg.model)
        assert p.flops_per_step == 3 * forward_flops(cfg.model) * cfg.data.batch_size * cfg.cluster.num_workers \
            * cfg.train.grad_accum
        assert cfg.train.steps == p.steps and cfg.run.name == p.name
        assert cfg.run.storage_path == f"{tmp_path}/cpu-tiny/runs"
        assert Path(cfg.data.manifest).is_absolute()
    by_size = sorted({(p.coords["depth"], p.params) for p in points})
    assert [n for _, n in by_size] == sorted(n for _, n in by_size)  # deeper+wider -> more parameters


def test_flop_budgets_and_extra_keys(tmp_path):
    sweep, folder = load_sweep(CPU_TINY, [f"storage_path={tmp_path}", "budget.steps=[]", "budget.flops=[1e9,4e9]",
                                          "grid={optim.lr: [0.001, 0.0003]}"])
    points = expand(sweep, folder)
    assert len(points) == 3 * 2 * 2
    for p in points:
        assert p.steps == max(1, round(p.coords["flops"] / flops_per_step(p.config)))
        assert p.config.optim.lr == p.coords["optim.lr"]
        assert "-lr0.001" in p.name or "-lr0.0003" in p.name
    small = [p for p in points if p.coords["depth"] == 1 and p.coords["optim.lr"] == 0.001]
    assert small[1].steps == pytest.approx(4 * small[0].steps, rel=0.05)


@pytest.mark.parametrize("override,message", [
    ("budget.steps=[]", "exactly one of budget.steps or budget.flops"),
    ("sizes=[]", "at least one model size"),
    ("sizes=[{depth: 2, width: 30, heads: 4}]", "not divisible"),
    ("name=bad/name", "name"),
    ("grid={train.seed: []}", "grid.train.seed"),
    ("colour=red", "colour"),
])
def test_bad_sweep_files_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        sweep, folder = load_sweep(CPU_TINY, [override])
        expand(sweep, folder)


def test_cpu_isoflop_expands_budgets_with_their_sizes(tmp_path):
    sweep, folder = load_sweep(CPU_ISOFLOP, [f"storage_path={tmp_path}"])
    assert sweep.design == "isoflop"
    points = expand(sweep, folder)
    levels = sweep.budget_levels()
    assert [len(level.sizes) for level in levels] == [5, 5, 5] and len(points) == 30  # x 2 learning rates
    assert all(level.sizes == sweep.sizes for level in levels)  # a bare number takes the shared sizes
    for level in levels:
        at_budget = [p for p in points if p.budget == level.flops]
        assert [(p.coords["depth"], p.coords["width"], p.config.optim.lr) for p in at_budget] == \
            [(s.depth, s.width, lr) for s in level.sizes for lr in (1.6e-2, 3.2e-2)]
    for p in points:
        cfg = p.config
        sequences = cfg.data.batch_size * cfg.cluster.num_workers * cfg.train.grad_accum
        assert p.steps == cfg.train.steps == round(p.budget / flops_per_step(cfg)) >= cfg.optim.warmup_steps
        assert p.flops == p.steps * 3 * forward_flops(cfg.model) * sequences
        assert abs(p.flops - p.budget) <= 0.5 * p.flops_per_step  # the nearest whole number of steps
        assert p.images == sequences * cfg.model.k * p.steps
        assert p.tokens == p.images * (cfg.model.image_size // cfg.model.patch_size) ** 2
        assert p.coords["flops"] == p.budget and p.name.endswith(f"-f{p.budget:g}-lr{p.config.optim.lr:g}"
                                                                 .replace("+", ""))
    smallest = [p for p in points if p.coords["depth"] == 1 and p.coords["width"] == 8]
    assert [p.steps for p in smallest] == pytest.approx([p.budget / smallest[0].flops_per_step for p in smallest],
                                                        abs=0.5)


def test_a_budget_with_sizes_of_its_own_trains_only_those(tmp_path):
    sweep, folder = load_sweep(CPU_ISOFLOP, [f"storage_path={tmp_path}",
                                             "budgets=[1e10, {flops: 3e10, sizes: [{depth: 2, width: 48, heads: 2}]}]"])
    points = expand(sweep, folder)
    assert [len(level.sizes) for level in sweep.budget_levels()] == [5, 1]
    assert {(p.coords["depth"], p.coords["width"]) for p in points if p.budget == 3e10} == {(2, 48)}
    assert len(points) == 6 * 2  # x 2 learning rates


def test_seeds_repeat_every_point_as_runs_of_one_setting(tmp_path):
    """`seeds` repeats each point (every grid value) with that `train.seed`: the seeds of a setting are neighbours,
    share its size, steps and FLOPs, and are named `<setting>-seed<n>`; a sweep without seeds keeps its names."""
    overrides = [f"storage_path={tmp_path}", "budgets=[1e10]"]
    plain = expand(*load_sweep(CPU_ISOFLOP, overrides))
    seeded = expand(*load_sweep(CPU_ISOFLOP, [*overrides, "seeds=[3, 0]"]))
    assert all(p.setting == p.name for p in plain) and len(seeded) == 2 * len(plain) == 20
    for point, (three, zero) in zip(plain, zip(seeded[::2], seeded[1::2])):
        assert three.setting == zero.setting == point.name
        assert (three.name, zero.name) == (f"{point.name}-seed3", f"{point.name}-seed0")
        assert (three.config.train.seed, zero.config.train.seed) == (3, 0)
        assert three.coords == {**point.coords, "train.seed": 3}
        assert three.steps == zero.steps == point.steps and three.flops == point.flops
        assert three.config.run.name == three.name and three.config.optim.lr == point.config.optim.lr
    assert sweep_cost(seeded).train_flops == 2 * sweep_cost(plain).train_flops


def _records(points, losses) -> list[dict]:
    """Finished-point records (the fields run_point writes that the fits read) of `points` with `losses`."""
    return [{"name": p.name, "params": p.params, "flops": p.flops, "tokens": p.tokens, "images": p.images,
             "budget": p.budget, "setting": p.setting, "steps": p.steps, "loss": loss} for p, loss in zip(points, losses)]


def _cell_losses(points, close: str) -> list[float]:
    """Losses of a sweep's points in cells of 2 rates x 2 seeds: the cell of size `close` a close call (a gap of
    0.01, 0.7 standard errors), every other cell's rates 0.2 apart (over 280 standard errors)."""
    return [loss for i in range(0, len(points), 4)
            for loss in ([1.00, 1.02, 1.01, 1.03] if points[i].coords["width"] == close else [1.0, 1.001, 1.2, 1.201])]


def test_close_call_seeds_go_to_both_settings_of_each_close_call_and_no_other(tmp_path, capsys):
    """With seeds [0, 1], only the width-8 cell's two rates are a close call: `close_call_seeds` [2, 3] adds those two
    settings' seeds 2 and 3, named and seeded as `seeds` would; no close call adds nothing; the dry run prints the
    most they can add (both settings of every cell)."""
    from arflow_scale.cli import main
    from arflow_scale.scaling.close_seeds import close_call_bound, close_call_settings
    from arflow_scale.scaling.sweep import close_call_candidates, planned_close_call_points

    overrides = [f"storage_path={tmp_path}", "budgets=[1e10]", "seeds=[0, 1]", "close_call_seeds=[2, 3]"]
    sweep, folder = load_sweep(CPU_ISOFLOP, overrides)
    points = expand(sweep, folder)  # 5 sizes x 2 rates x seeds 0, 1
    records = _records(points, _cell_losses(points, close=8))
    settings = ["cpu-isoflop-d1w8-f1e10-lr0.016", "cpu-isoflop-d1w8-f1e10-lr0.032"]
    assert close_call_settings(records) == settings  # the best first
    extra = planned_close_call_points(sweep, folder, records)
    assert [p.name for p in extra] == [f"{setting}-seed{seed}" for setting in settings for seed in (2, 3)]
    ours = {p.name: p for p in points}
    for point in extra:
        first = ours[f"{point.setting}-seed0"]
        assert point.config.train.seed == int(point.name[-1]) and point.coords["train.seed"] == point.config.train.seed
        assert (point.steps, point.flops, point.config.optim.lr) == (first.steps, first.flops, first.config.optim.lr)
    assert planned_close_call_points(sweep, folder, _records(points, _cell_losses(points, close=0))) == []
    bound = close_call_bound(close_call_candidates(sweep, folder))
    assert len(bound) == len(points) and sweep_cost(bound).train_flops == pytest.approx(sweep_cost(points).train_flops)

    assert main(["sweep", "--config", str(CPU_ISOFLOP), "--dry-run", *overrides]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["close_call_seeds"] == {"seeds": [2, 3], "at_most": sweep_cost(bound).to_dict()}
    assert lines[-2].startswith(f"close_call_seeds [2, 3]: at most {len(points)} more points")


def test_isoflop_budgets_from_overrides_and_grid_keys(tmp_path):
    sweep, folder = load_sweep(CPU_ISOFLOP, [f"storage_path={tmp_path}", "budgets=[2e9, 8e9]",
                                             "grid={optim.lr: [0.001, 0.002]}"])
    points = expand(sweep, folder)
    assert len(points) == 2 * len(sweep.sizes) * 2 and {p.budget for p in points} == {2e9, 8e9}
    assert {p.config.optim.lr for p in points} == {0.001, 0.002}


@pytest.mark.parametrize("overrides,message", [
    (["budget.steps=[10]"], "budget: a grid setting"),
    (["budgets=[]"], "an isoflop sweep needs at least one FLOP budget"),
    (["budgets=[1e9, 1e9]"], "lists a budget twice"),
    (["budgets=[-1e9]"], r"budgets\[0\]\.flops: must be > 0, got -1000000000.0"),
    (["budgets=[1e9]", "sizes=[]"], r"budgets\[0\].sizes: no sizes"),
    (["budgets=[{flops: 1e9, colour: red}]"], r"budgets\[0\]\.colour: unknown key"),
    (["gpu={mfu: 0.4}"], "give both gpu.peak_tflops and gpu.mfu"),
    (["design=grid"], "budgets: only for design: isoflop"),
    (["design=chinchilla"], "design"),
    (["gpu={peak_tflops: 989, mfu: 1.5}"], r"gpu.mfu: must be in \(0, 1\]"),
    (["seeds=[1, 0, 1]"], r"seeds: lists a seed twice: \[1, 0, 1\]"),
    (["seeds=[-1]"], r"seeds: must all be >= 0, got \[-1\]"),
    (["grid={train.seed: [0, 1]}"], r"grid.train.seed: list training seeds under `seeds`"),
    (["close_call_seeds=[2]"], r"close_call_seeds: needs two or more `seeds`"),
    (["seeds=[0, 1]", "close_call_seeds=[2, 2]"], r"close_call_seeds: lists a seed twice: \[2, 2\]"),
    (["seeds=[0, 1]", "close_call_seeds=[3, 1]"], r"close_call_seeds: repeats seeds of `seeds`: \[1\]"),
    (["seeds=[0, 1]", "close_call_seeds=[2]", "grid={}"], r"close_call_seeds: needs a `grid` key with two or more"),
])
def test_bad_isoflop_sweep_files_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(CPU_ISOFLOP, overrides)


def test_imagenet128_is_an_isoflop_sweep_with_its_cost(capsys):
    from arflow_scale.cli import main

    assert main(["sweep", "--config", str(IMAGENET128), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    dry = json.loads(out[-1])
    assert dry["design"] == "isoflop" and len(dry["points"]) == 20
    assert "GPU-hours on H100 SXM bf16 dense at 989 TFLOP/s peak x MFU 0.35" in out[-2]
    by_budget = {}
    for p in dry["points"]:
        by_budget.setdefault(p["budget"], []).append(p)
        assert p["flops"] == pytest.approx(p["budget"], rel=1e-3)  # thousands of steps: rounding is small
        assert p["gpu_hours"] == pytest.approx(p["flops"] / (989e12 * 0.35) / 3600)
    assert sorted(by_budget) == [1e18, 3e18, 1e19, 3e19]
    for budget, points in by_budget.items():  # five sizes each, a larger window for a larger budget
        assert len(points) == 5 and len({p["params"] for p in points}) == 5
    assert min(p["params"] for p in by_budget[3e19]) > min(p["params"] for p in by_budget[1e18])
    cost = dry["cost"]
    assert cost["train_flops"] == pytest.approx(sum(p["flops"] for p in dry["points"]))
    assert cost["eval_flops"] > 0  # fid: true, 10k samples x 250 sampler steps per point
    assert cost["gpu_hours"] == pytest.approx((cost["train_flops"] + cost["eval_flops"]) / (989e12 * 0.35) / 3600)
    assert cost["assumptions"] == {"gpu": "H100 SXM bf16 dense", "peak_tflops": 989.0, "mfu": 0.35}


def test_imagenet128_points_train_the_recipe_except_what_the_sweep_names():
    """One source of truth: a point is configs/imagenet128.yaml with the sweep's overrides, its size and the keys
    every point sets (steps, name, storage, experiment, FID at the end); nothing falls back to a default."""
    from arflow_scale.config import flatten, load_config

    sweep, folder = load_sweep(IMAGENET128)
    recipe = flatten(load_config(REPO / "configs/imagenet128.yaml"), mask_secrets=False)
    named = {item.split("=", 1)[0] for item in sweep.overrides} | {
        "model.depth", "model.width", "model.heads", "train.steps", "run.name", "run.storage_path",
        "tracking.experiment", "eval.fid_at_end"}
    for point in expand(sweep, folder):
        flat = flatten(point.config, mask_secrets=False)
        changed = {key for key in recipe.keys() | flat.keys() if recipe.get(key) != flat.get(key)}
        assert changed <= named, f"{point.name}: {sorted(changed - named)} differ from the recipe unnamed"
        assert flat["train.compile"] and flat["eval.cfg_scale"] == 1.5 and flat["model.vae"] == recipe["model.vae"]


def test_a_pilot_at_one_budget_runs_exactly_the_full_sweeps_points_of_that_budget():
    """`--budgets` narrows the sweep without changing a point: same names and configs, so the full sweep later
    finds the pilot's points finished (their records match) and skips them."""
    sweep, folder = load_sweep(IMAGENET128)
    full = {p.name: p for p in expand(sweep, folder)}
    pilot = expand(sweep.only_budgets([1e18]), folder)
    assert [p.name for p in pilot] == [name for name, p in full.items() if p.budget == 1e18] and len(pilot) == 5
    assert all(p.config == full[p.name].config and p.steps == full[p.name].steps for p in pilot)
    assert [b.flops for b in sweep.only_budgets([3e19, 1e18]).budgets] == [1e18, 3e19]  # the file's order


def test_budgets_option_dry_runs_the_pilot_and_names_a_budget_the_sweep_lacks(capsys):
    from arflow_scale.cli import main

    assert main(["sweep", "--config", str(IMAGENET128), "--dry-run", "--budgets", "1e18"]) == 0
    dry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {p["budget"] for p in dry["points"]} == {1e18} and len(dry["points"]) == 5
    assert main(["sweep", "--config", str(IMAGENET128), "--dry-run", "--budgets", "1e18,2e18"]) == 2
    assert "--budgets: 2e+18 is not a budget of sweep imagenet128; its budgets are 1e+18, 3e+18, 1e+19, 3e+19" \
        in capsys.readouterr().err
    assert main(["sweep", "--config", str(CPU_TINY), "--dry-run", "--budgets", "1e9"]) == 2
    assert "--budgets: only for design: isoflop" in capsys.readouterr().err


def test_sweep_cost_and_fid_sampling_flops(tmp_path):
    sweep, folder = load_sweep(CPU_TINY, [f"storage_path={tmp_path}", "fid=true",
                                          "overrides=[cluster.num_workers=1, eval.num_samples=100, eval.steps=8]"])
    points = expand(sweep, folder)
    cfg = points[0].config
    one_image = forward_flops(dataclasses.replace(cfg.model, k=1))
    assert eval_flops(cfg, points[0].steps) == 100 * 8 * one_image  # fid_at_end: one evaluation
    guided = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, cfg_scale=1.5, fid_every=20))
    assert eval_flops(guided, 40) == (40 // 20 + 1) * 100 * 8 * 2 * one_image
    cost = sweep_cost(points)
    assert cost.points == 6 and cost.gpu_hours is None and "gpu_hours" not in cost.to_dict()
    assert cost.tokens == sum(p.images * resolve(p.config.model).tokens_per_image for p in points)


def test_imagenet128_learning_rate_pilot_as_the_readme_gives_it(capsys):
    """The README's rate pilot: the first budget's five sizes at three rates, named apart from the sweep's points.
    However a rate is written (YAML reads `1e-4` as a string), the point holds the number the config trains with."""
    from arflow_scale.cli import main

    lrs = [5.0e-5, 1.0e-4, 2.0e-4]
    assert main(["sweep", "--config", str(IMAGENET128), "--dry-run", "--budgets", "1e18",
                 "grid={optim.lr: [5.0e-5, 1e-4, 2e-04]}"]) == 0
    dry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    points = dry["points"]
    assert len(points) == 15 and {p["budget"] for p in points} == {1e18}
    assert sorted(p["optim.lr"] for p in points) == sorted(lrs * 5) and len({p["params"] for p in points}) == 5
    assert {p["name"][p["name"].rindex("-lr"):] for p in points} == {"-lr5e-05", "-lr0.0001", "-lr0.0002"}
    assert round(dry["cost"]["gpu_hours"]) == 13


def test_dry_run_of_a_grid_sweep_prints_points_without_gpu_hours(capsys, tmp_path):
    from arflow_scale.cli import main

    assert main(["sweep", "--config", str(CPU_TINY), "--dry-run", f"storage_path={tmp_path}"]) == 0
    dry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dry["design"] == "grid" and len(dry["points"]) == 6
    assert all(p["budget"] is None and p["tokens"] > 0 and "gpu_hours" not in p for p in dry["points"])
    assert "gpu_hours" not in dry["cost"]


def _sweep_file(tmp_path: Path, *extra_overrides: str) -> Path:
    """cpu-isoflop with an absolute base, one tiny budget over 3 sizes (16, 5 and 2 steps) and a second budget the
    test's runs leave out (`--budgets 6e8`, a pilot), digits with a validation split, storage and tracking under
    tmp_path."""
    data = yaml.safe_load(CPU_ISOFLOP.read_text())
    data["base"] = str((CPU_ISOFLOP.parent / data["base"]).resolve())
    data["sizes"] = [{"depth": 1, "width": 16, "heads": 1}, {"depth": 1, "width": 32, "heads": 2},
                     {"depth": 2, "width": 48, "heads": 2}]
    data["budgets"] = [6e8, {"flops": 3e9, "sizes": [{"depth": 1, "width": 8, "heads": 1}]}]
    data["grid"] = {}  # one learning rate (the demo's): three points to train, not six
    data["storage_path"] = str(tmp_path / "sweeps")
    data["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data["overrides"] = [*data["overrides"], "checkpoint.every=2", "train.log_every=1", "eval.val_sequences=20",
                         f"data.manifest={tmp_path / 'digits'}", *extra_overrides]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _arflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ARFLOW, *args], capture_output=True, text=True, timeout=600)


def _status(sweep_file: Path, capsys) -> dict:
    """`arflow sweep --status` (storage only, no training) -> {point name: its progress}."""
    from arflow_scale.cli import main

    assert main(["sweep", "--config", str(sweep_file), "--status"]) == 0
    return {p["name"]: p for p in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["points"]}


@pytest.mark.slow
def test_cpu_isoflop_sweep_resumes_skips_and_scores_points_by_validation_loss(ray_local, tmp_path, capsys):
    import ray.train
    from mlflow.tracking import MlflowClient

    from arflow_scale.scaling.sweep import run_sweep

    # 1: a pilot at the first budget; its first point crashes after its step-2 checkpoint (an interrupted sweep;
    # in-process on the session's Ray). The parent run is the whole sweep's: both budgets in its params.
    with pytest.raises(ray.train.TrainingFailedError, match="faults.crash_rank_at_step=2: injected crash"):
        run_sweep(*load_sweep(_sweep_file(tmp_path, "faults.crash_rank_at_step=2")), budgets=[6e8])
    state = json.loads((tmp_path / "sweeps/cpu-isoflop/sweep.json").read_text())
    first = sorted((tmp_path / "sweeps/cpu-isoflop/runs").iterdir())
    assert [p.name for p in first] == ["cpu-isoflop-d1w16-f6e08"]
    assert not (tmp_path / "sweeps/cpu-isoflop/points").exists()
    interrupted_run = json.loads((first[0] / "mlflow_run.json").read_text())["run_id"]
    sweep_file = _sweep_file(tmp_path)  # the same sweep, fault removed
    assert {name: (p["state"], p["step"]) for name, p in _status(sweep_file, capsys).items()} == {
        "cpu-isoflop-d1w16-f6e08": ("started", 2), "cpu-isoflop-d1w32-f6e08": ("not started", 0),
        "cpu-isoflop-d2w48-f6e08": ("not started", 0), "cpu-isoflop-d1w8-f3e09": ("not started", 0)}

    # 2: rerun (fault removed): the interrupted point resumes, the other two run as 2 concurrent Ray tasks.
    resumed = _arflow("sweep", "--config", str(sweep_file), "--parallel", "2", "--budgets", "6e8")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["parent_run_id"] == state["parent_run_id"]
    assert len(summary["ran"]) == 3 and summary["skipped"] == []
    by_name = {p["name"]: p for p in summary["points"]}
    assert by_name["cpu-isoflop-d1w16-f6e08"]["run_id"] == interrupted_run  # same run, continued
    standing = _status(sweep_file, capsys)
    assert [(p["state"], p["step"], p["loss"]) for p in standing.values()] == [
        ("finished", p["steps"], p["loss"]) for p in summary["points"]] + [("not started", 0, None)]
    sweep, folder = load_sweep(sweep_file)
    assert [p["steps"] for p in summary["points"]] == [p.steps for p in expand(sweep.only_budgets([6e8]), folder)]
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    for point in summary["points"]:
        assert point["budget"] == 6e8 and point["tokens"] > 0
        assert (tmp_path / "sweeps/cpu-isoflop/points" / f"{point['name']}.json").is_file()
        record = json.loads((tmp_path / "sweeps/cpu-isoflop/points" / f"{point['name']}.json").read_text())
        assert record["setting"] == point["name"]  # no seeds: each point is a setting of its own
        assert record["loss_source"] == "val_loss"  # each point is scored by its held-out loss ...
        val = client.get_metric_history(point["run_id"], "val_loss")  # ... the one its run logged at its end
        assert [(m.step, m.value) for m in val] == [(point["steps"], pytest.approx(point["loss"]))]

    history = client.get_metric_history(interrupted_run, "loss")
    steps = by_name["cpu-isoflop-d1w16-f6e08"]["steps"]
    assert {m.step for m in history} == set(range(1, steps + 1))  # steps 1-2 before the crash, the rest after
    children = client.search_runs([client.get_run(state["parent_run_id"]).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    assert {r.info.run_name for r in children} == set(by_name)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert all(f"'flops': {flops!r}" in parent.data.params["budgets"] for flops in (6e8, 3e9))
    assert {"scaling/scaling.md", "scaling/loss_vs_params.png", "scaling/isoflop.png"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id, "scaling")}
    assert set(summary["fits"]) >= {"loss_vs_params"}
    assert any("no frontier" in note for note in summary["notes"])  # one budget: the fit says why, and
    assert all(f"arflow sweep: {note}" in resumed.stderr for note in summary["notes"])  # the user sees it

    # 3: everything finished (in-process): nothing is trained again, and the fit
    # reads the same points back from MLflow. One record is made as an older version wrote it (a sha of a
    # config without today's options): its final checkpoint's config says it is finished, and it gains its fields.
    from arflow_scale.scaling.points import points_from_mlflow
    from arflow_scale.scaling.report import write_report

    older = tmp_path / "sweeps/cpu-isoflop/points/cpu-isoflop-d1w16-f6e08.json"
    record = json.loads(older.read_text())
    fields = record.pop("config")
    older.write_text(json.dumps({**record, "config_sha": "0123456789abcdef"}))
    rerun = run_sweep(sweep, folder, budgets=[6e8])
    assert rerun["ran"] == [] and len(rerun["skipped"]) == 3
    assert json.loads(older.read_text()) == {**record, "config_sha": "0123456789abcdef", "config": fields}
    assert [{key: p[key] for key in s} for p, s in zip(rerun["points"], summary["points"])] == summary["points"]
    assert not any({"config", "config_sha"} & set(p) for p in rerun["points"])  # results only, no config fields
    points = points_from_mlflow(parent_run_id=state["parent_run_id"], tracking_uri=summary["tracking_uri"])
    assert sorted(p.loss for p in points) == pytest.approx(sorted(p["loss"] for p in summary["points"]))
    assert sorted(p.tokens for p in points) == sorted(p["tokens"] for p in summary["points"])
    assert sorted(p.setting for p in points) == sorted(by_name)  # the runs' setting tags
    fitted = write_report(points, tmp_path / "fit")
    assert fitted["n_points"] == 3
    _a_failed_report_keeps_the_points(tmp_path, sweep_file, state["parent_run_id"], capsys)


def _a_failed_report_keeps_the_points(tmp_path: Path, sweep_file: Path, parent_run_id: str, capsys) -> None:
    """4: the report cannot be written (a file where its folder goes): the CLI keeps the trained points, exits 1
    and says how to fit them again."""
    from arflow_scale.cli import main

    report = tmp_path / "sweeps/cpu-isoflop/report"
    report.rename(tmp_path / "report-before")
    report.write_text("")
    capsys.readouterr()
    assert main(["sweep", "--config", str(sweep_file), "--budgets", "6e8"]) == 1
    printed = capsys.readouterr()
    assert "every point is trained and recorded, but the report failed (FileExistsError" in printed.err
    assert f"arflow scaling fit --parent-run {parent_run_id} --tracking-uri " in printed.err
    assert len(json.loads(printed.out.strip().splitlines()[-1])["points"]) == 3


def test_auto_parallel_fits_points_to_cluster_cpus(ray_local, tmp_path):
    from arflow_scale.scaling.sweep import auto_parallel

    sweep, folder = load_sweep(CPU_TINY, [f"storage_path={tmp_path}"])
    point = expand(sweep, folder)[0]
    assert point.config.cluster.num_workers == 1
    assert auto_parallel(point) == 2  # the fixture's Ray has 2 CPUs, a point needs 1
    sweep, folder = load_sweep(CPU_TINY, [f"storage_path={tmp_path}", "overrides=[cluster.num_workers=2]"])
    assert auto_parallel(expand(sweep, folder)[0]) == 1


def test_sweep_state_on_s3_and_parent_run_reuse(s3_endpoint, make_bucket, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from arflow_scale.scaling.state import (ensure_parent_run, masked_overrides, read_json,
                                            resolve_tracking_uri, write_json)

    bucket = make_bucket("sweep")
    url = f"s3://{bucket}/sweeps/x/points/p.json"
    assert read_json(url, {}) is None
    write_json(url, {"loss": 0.5}, {})
    assert read_json(url, {}) == {"loss": 0.5}
    write_json(str(tmp_path / "a/b.json"), {"n": 1}, {})
    assert read_json(str(tmp_path / "a/b.json"), {}) == {"n": 1} and not list((tmp_path / "a").glob("*.tmp-*"))

    assert masked_overrides(["run.storage_options.secret=abc", "optim.lr=1e-3"]) == \
        ["run.storage_options.secret=***", "optim.lr=1e-3"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep, _ = load_sweep(CPU_TINY, [f"storage_path=s3://{bucket}/sweeps",
                                     "overrides=[data.storage_options.secret=hunter2]"])
    monkeypatch.chdir(tmp_path)  # an s3:// sweep keeps its embedded store under ./runs/sweeps/NAME
    uri = resolve_tracking_uri(sweep)
    assert uri == f"sqlite:///{tmp_path}/runs/sweeps/cpu-tiny/mlflow.db"
    parent = ensure_parent_run(sweep, uri)
    assert read_json(f"s3://{bucket}/sweeps/cpu-tiny/sweep.json", {})["parent_run_id"] == parent
    assert ensure_parent_run(sweep, uri) == parent  # a rerun finds the same parent run
    params = MlflowClient(uri).get_run(parent).data.params
    assert "hunter2" not in json.dumps(params) and params["name"] == "cpu-tiny"


@pytest.mark.slow
def test_close_call_seeds_train_only_the_close_settings_then_the_fits_average_them(ray_local, tmp_path, capsys):
    """The sweep's own 12 points (3 sizes x 2 rates x seeds 0, 1) are finished with recorded losses in which only the
    width-48 cell is a close call: `arflow sweep` trains seed 2 of its two settings and nothing else, nests them under
    the parent run, and fits every setting's mean (the close cell's of 3 seeds); `--status` lists them; a rerun
    trains nothing."""
    from mlflow.tracking import MlflowClient

    from arflow_scale.cli import main
    from arflow_scale.scaling.finished import point_fields

    data = yaml.safe_load(_sweep_file(tmp_path).read_text())
    data.update(budgets=[6e8], grid={"optim.lr": [1.6e-2, 3.2e-2]}, seeds=[0, 1], close_call_seeds=[2])
    sweep_file = tmp_path / "close.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    sweep, folder = load_sweep(sweep_file)
    points = expand(sweep, folder)
    for record, point in zip(_records(points, _cell_losses(points, close=48)), points):
        path = tmp_path / f"sweeps/cpu-isoflop/points/{point.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, "run_id": None, "config": point_fields(point.config)}))
    settings = ["cpu-isoflop-d2w48-f6e08-lr0.016", "cpu-isoflop-d2w48-f6e08-lr0.032"]

    assert main(["sweep", "--config", str(sweep_file)]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ran"] == [f"{setting}-seed2" for setting in settings]
    assert summary["skipped"] == [p.name for p in points] and len(summary["points"]) == 14
    for name in summary["ran"]:
        record = json.loads((tmp_path / f"sweeps/cpu-isoflop/points/{name}.json").read_text())
        assert record["config"]["train.seed"] == 2 and record["loss_source"] == "val_loss"
        assert record["setting"] == name.removesuffix("-seed2")
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    children = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert sorted(r.info.run_name for r in children) == summary["ran"]
    assert "14 of 14 runs are seeds of 6 setting(s)" in err  # the close cell's settings average 3 seeds each
    fits = json.loads((tmp_path / "sweeps/cpu-isoflop/report/fits.json").read_text())
    assert fits["close_calls"]["judged"] == 3

    assert main(["sweep", "--config", str(sweep_file), "--status"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["close_call_seeds"] == {"decided": True, "points": summary["ran"]}
    assert [(p["name"], p["state"]) for p in status["points"][-2:]] == [(n, "finished") for n in summary["ran"]]
    assert main(["sweep", "--config", str(sweep_file), "--no-report"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ran"] == []
