"""Fast tests of continuing on another number of workers and of the non-finite guard's parts (no Ray): the global
batch plan, what a resume refuses, the files a rank restores, the EMA's slice of a consolidated EMA, the record,
the update gate on a real torch AdamW."""
from __future__ import annotations

import json
import math

import pytest
import torch

from arflow_scale.checkpoint import CheckpointRecord
from arflow_scale.config import ConfigError, config_from_dict


def cfg_of(*overrides: str):
    return config_from_dict({}, ["model.size=tiny/2", "model.image_size=8", "model.in_channels=1", "model.k=3",
                                 *overrides])


def test_global_batch_stays_when_the_world_size_changes():
    from arflow_scale.train.batching import BatchPlan, global_batch_size, plan_batches, with_plan

    cfg = cfg_of("data.batch_size=4", "cluster.num_workers=4", "train.grad_accum=2")
    assert global_batch_size(cfg) == 32
    assert plan_batches(cfg, 4) == BatchPlan(micro_batch=4, grad_accum=2, world_size=4)
    assert plan_batches(cfg, 2) == BatchPlan(micro_batch=4, grad_accum=4, world_size=2)
    assert plan_batches(cfg, 1).global_batch == 32
    per_rank = cfg_of("data.batch_size=4", "cluster.num_workers=4", "train.grad_accum=2",
                      "train.elastic_batch=per_rank")
    assert plan_batches(per_rank, 2) == BatchPlan(micro_batch=8, grad_accum=2, world_size=2)
    fixed = cfg_of("train.global_batch_size=24", "data.batch_size=4", "cluster.num_workers=2")
    assert plan_batches(fixed, 3) == BatchPlan(micro_batch=4, grad_accum=2, world_size=3)
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 32 sequences is not a multiple of "
                                          r"data.batch_size x workers = 4 x 3 = 12"):
        plan_batches(cfg, 3)
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 32 .* train.grad_accum x workers = 2 x 3 = 6"):
        plan_batches(per_rank, 3)
    two = with_plan(cfg, plan_batches(cfg, 2))
    assert (two.data.batch_size, two.train.grad_accum, global_batch_size(two)) == (4, 4, 32)
    assert plan_batches(two, 2) == plan_batches(cfg, 2)
    assert with_plan(cfg, plan_batches(cfg, 4)) is cfg  # the config's own world size: unchanged (bit-identical)


def test_deepspeed_gets_the_plan_of_the_actual_world_size():
    from arflow_scale.train.batching import plan_batches, with_plan
    from arflow_scale.train.deepspeed_config import build_deepspeed_config

    cfg = cfg_of("data.batch_size=4", "cluster.num_workers=2", "train.grad_accum=1")
    ds = build_deepspeed_config(with_plan(cfg, plan_batches(cfg, 1)), 1, load_universal=True)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (8, 2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["checkpoint"]["load_universal"] is True
    assert build_deepspeed_config(cfg, 2)["checkpoint"]["load_universal"] is False


@pytest.mark.parametrize("override", ["train.global_batch_size=0", "train.max_skipped_steps=-1",
                                      "train.nonfinite=ignore", "train.elastic_batch=grow",
                                      "checkpoint.upload_retries=-1", "checkpoint.upload_backoff=-1"])
def test_new_keys_validate_naming_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        config_from_dict({}, [override])


def record_of(cfg, **fields) -> CheckpointRecord:
    from arflow_scale.train.launch_plan import model_shapes

    return CheckpointRecord(step=4, world_size=2, zero_stage=cfg.train.zero_stage, param_shapes=model_shapes(cfg, {}),
                            **fields)


def test_resume_on_another_worker_count_passes_and_what_cannot_resume_is_refused(tmp_path):
    from arflow_scale.train.launch_plan import check_resume

    cfg = cfg_of("cluster.num_workers=2", "train.zero_stage=2")
    latest = record_of(cfg)
    where = str(tmp_path / "run" / "checkpoint_000000004")
    check_resume(cfg, str(tmp_path / "run"), latest, where)
    check_resume(cfg_of("cluster.num_workers=1", "train.zero_stage=2", "train.global_batch_size=16"),
                 str(tmp_path / "run"), latest, where)  # 8 sequences x 2 workers on one worker
    with pytest.raises(ConfigError, match=r"train.zero_stage: 3, but run .* written at ZeRO stage 2"):
        check_resume(cfg_of("train.zero_stage=3"), str(tmp_path / "run"), latest, where)
    with pytest.raises(ConfigError, match=r"model: this config builds parameter \S+ with shape \[.*\], but run .* "
                                          r"where it has shape"):
        check_resume(cfg_of("train.zero_stage=2", "model.size=S/2"), str(tmp_path / "run"), latest, where)
    with pytest.raises(ConfigError, match=r"model.family: 'arflow', but run .* a 'farmer' model"):
        check_resume(cfg, str(tmp_path / "run"), record_of(cfg, model_family="farmer"), where)
    with pytest.raises(ConfigError, match="train.global_batch_size: 24 sequences"):
        check_resume(cfg_of("cluster.num_workers=2", "train.global_batch_size=24", "data.batch_size=8"),
                     str(tmp_path / "run"), None, None)


def test_an_older_record_without_shapes_is_checked_against_its_config(tmp_path):
    from arflow_scale.config import dump_yaml
    from arflow_scale.train.launch_plan import check_resume

    folder = tmp_path / "run" / "checkpoint_000000004"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg_of("model.size=S/2")))
    old = CheckpointRecord(step=4, world_size=2, zero_stage=2)
    check_resume(cfg_of("model.size=S/2", "train.zero_stage=2"), str(tmp_path / "run"), old, str(folder))
    with pytest.raises(ConfigError, match="model: this config builds parameter"):
        check_resume(cfg_of("train.zero_stage=2"), str(tmp_path / "run"), old, str(folder))


def test_a_stale_ray_snapshot_is_removed_from_the_run_folder(tmp_path):
    from arflow_scale.train.driver import RAY_SNAPSHOT, drop_ray_snapshot

    (tmp_path / RAY_SNAPSHOT).write_text('{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_0000')
    drop_ray_snapshot(str(tmp_path), {})
    assert not (tmp_path / RAY_SNAPSHOT).exists()
    drop_ray_snapshot(str(tmp_path), {})  # nothing there: nothing happens


def test_a_rank_restores_the_shared_files_and_its_own():
    from arflow_scale.checkpoint.layout import files_of_rank

    files = ["meta.json", "config.yaml", "deepspeed/state/mp_rank_00_model_states.pt",
             "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt", "deepspeed/state/zero_pp_rank_10_x.pt",
             "deepspeed/state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "ema/rank_0.pt", "ema/rank_1.pt", "data/rank_1.pt", "data/rank_0.pt", "rng/rank_1.pt",
             "ranks/rank_1.json"]
    rank1 = [f for f in files if files_of_rank(1, ema_partitioned=True)(f)]
    assert rank1 == ["meta.json", "config.yaml", "deepspeed/state/mp_rank_00_model_states.pt",
                     "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                     "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema/rank_1.pt",
                     "data/rank_1.pt", "rng/rank_1.pt"]
    full_ema = [f for f in files if f.startswith("ema/") and files_of_rank(1, ema_partitioned=False)(f)]
    assert full_ema == ["ema/rank_0.pt"]


def test_ema_takes_its_slice_of_a_consolidated_ema():
    from arflow_scale.train.ema import EMA

    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.5)
    full = {name: torch.randn(t.shape) for name, t in ema.shadow.items()}
    ema.load_full_state_dict(full)
    assert all(torch.equal(ema.shadow[n], full[n]) for n in full)
    # a ZeRO-3-like layout: this rank holds elements [4, 8) of the 6-element weight, zero-padded past its end
    ema.starts["weight"], ema.shadow["weight"] = 4, torch.zeros(4)
    ema.load_full_state_dict(full)
    assert torch.equal(ema.shadow["weight"], torch.cat([full["weight"].reshape(-1)[4:], torch.zeros(2)]))
    with pytest.raises(ValueError, match="differing keys"):
        ema.load_full_state_dict({"weight": full["weight"]})
    with pytest.raises(ValueError, match="bias: 3 elements, the model has 2"):
        ema.load_full_state_dict({**full, "bias": torch.zeros(3)})


def test_record_version_3_round_trip_and_version_2_read():
    record = CheckpointRecord(step=8, world_size=1, zero_stage=2, ema_layout="fragments", last_loss=0.5,
                              micro_batch_size=4, grad_accum=2, param_shapes={"w": [3, 4]}, skipped_steps=1)
    assert CheckpointRecord.from_json(record.to_json()) == record and record.global_batch_size == 8
    v2 = json.dumps({"version": 2, "step": 8, "world_size": 2, "zero_stage": 2, "ema_layout": "fragments",
                     "last_loss": 0.5, "mlflow_run_id": None, "tracking_uri": None, "model_family": "arflow"})
    old = CheckpointRecord.from_json(v2)
    assert (old.global_batch_size, old.param_shapes, old.skipped_steps) == (None, None, 0)
    with pytest.raises(ValueError, match="unknown key 'grad_accum' in a version-2"):
        CheckpointRecord.from_json(json.dumps({**json.loads(v2), "grad_accum": 2}))
    with pytest.raises(ValueError, match="grad_accum = 0 is not a positive integer"):
        CheckpointRecord.from_json(json.dumps({**json.loads(record.to_json()), "grad_accum": 0}))


def test_update_gate_drops_a_closed_or_non_finite_update():
    from arflow_scale.train.nonfinite import UpdateGate, all_finite, weights_finite

    param = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([param], lr=0.1)
    gate = UpdateGate(adam, check_grads=True)

    def step(grad: list[float], closed: bool = False) -> torch.Tensor:
        gate.open_for_step(closed)
        param.grad = torch.tensor(grad)
        adam.step()
        return param.detach().clone()

    assert torch.equal(step([math.nan, 1.0, 1.0]), torch.ones(3)) and not gate.grads_finite and gate.dropped
    assert adam.state[param] == {}  # no moments, no AdamW step counted
    assert torch.equal(step([1.0, 1.0, 1.0], closed=True), torch.ones(3)) and gate.grads_finite
    assert torch.equal(step([math.inf, 1.0, 1.0]), torch.ones(3))
    param.grad = torch.tensor([1.0, 1.0, 1.0])  # the gate not reopened (no guard): judged on its own gradients
    adam.step()
    applied = param.detach().clone()
    assert not torch.equal(applied, torch.ones(3))
    assert not torch.equal(step([1.0, 1.0, 1.0]), applied) and not gate.dropped
    assert all_finite([torch.tensor(1.0), torch.tensor(2.0)]) and not all_finite([torch.tensor(math.inf)])
    cpu = torch.device("cpu")
    assert weights_finite([torch.ones(2), torch.empty(0)], cpu) and not weights_finite([torch.tensor([math.nan])], cpu)
