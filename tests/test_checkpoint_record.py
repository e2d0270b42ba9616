"""The typed checkpoint record: today's and older meta.json read, strict JSON written, newer versions refused;
the tracking store a checkpoint records is the one `arflow fid model` logs to."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from arflow_scale.checkpoint import CheckpointRecord, CheckpointVersionError

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_reads_a_meta_json_written_before_the_record_was_typed():
    """tests/fixtures/meta_v1_zero2.json was written by a ZeRO-2 demo run of the code before this record."""
    record = CheckpointRecord.from_json((FIXTURES / "meta_v1_zero2.json").read_text())
    assert (record.step, record.world_size, record.zero_stage) == (60, 2, 2)
    assert record.ema_layout == "fragments" and record.ema_partitioned
    assert record.last_loss == pytest.approx(0.9167394042015076) and record.mlflow_run_id is None
    assert record.model_family == "arflow"


@pytest.mark.parametrize("stage, partitioned, layout", [(0, False, "full"), (2, False, "full"),
                                                        (1, True, "fragments"), (3, True, "zero3")])
def test_version_1_ema_flag_maps_to_a_layout(stage, partitioned, layout):
    text = json.dumps({"step": 4, "world_size": 2, "zero_stage": stage, "ema_partitioned": partitioned})
    assert CheckpointRecord.from_json(text).ema_layout == layout


def test_round_trip_and_strict_json():
    record = CheckpointRecord(step=7, world_size=4, zero_stage=3, ema_layout="zero3", last_loss=0.25,
                              mlflow_run_id="abc", tracking_uri="sqlite:///x.db")
    assert CheckpointRecord.from_json(record.to_json()) == record
    diverged = CheckpointRecord(step=7, world_size=1, last_loss=math.nan)
    text = diverged.to_json()
    assert json.loads(text)["last_loss"] is None and "NaN" not in text
    assert CheckpointRecord.from_json(text).last_loss is None


def test_a_final_record_keeps_its_state_and_older_versions_do_not_know_it():
    final = CheckpointRecord(step=6, world_size=2, last_loss=0.5, params_sha256="ab" * 32, ema_sha256="cd" * 32,
                             val_loss=0.75, val_loss_ema=math.inf)
    text = final.to_json()
    assert json.loads(text)["val_loss_ema"] is None and "Infinity" not in text  # strict JSON
    read = CheckpointRecord.from_json(text)
    assert read.hashed and (read.params_sha256, read.val_loss, read.val_loss_ema) == ("ab" * 32, 0.75, None)
    assert not CheckpointRecord(step=4, world_size=2).hashed  # a checkpoint before the last step
    v3 = {key: value for key, value in json.loads(text).items() if key not in ("params_sha256", "ema_sha256",
                                                                             "val_loss", "val_loss_ema")}
    assert not CheckpointRecord.from_json(json.dumps({**v3, "version": 3})).hashed
    with pytest.raises(ValueError, match="unknown key 'params_sha256' in a version-3"):
        CheckpointRecord.from_json(json.dumps({**v3, "version": 3, "params_sha256": "ab"}))
    with pytest.raises(ValueError, match="ema_sha256 = 7 is not a sha256"):
        CheckpointRecord.from_json(json.dumps({**v3, "ema_sha256": 7}))


def test_newer_version_and_bad_records_are_refused_naming_the_file():
    newer = json.dumps({"version": 99, "step": 1, "world_size": 1})
    with pytest.raises(CheckpointVersionError, match=r"run/checkpoint_1/meta.json: .*version 99.*newer"):
        CheckpointRecord.from_json(newer, "run/checkpoint_1/meta.json")
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        CheckpointRecord.from_json(json.dumps({"version": 2, "step": 1, "world_size": 1, "colour": 3}))
    with pytest.raises(ValueError, match="world_size = 0"):
        CheckpointRecord.from_json(json.dumps({"step": 1, "world_size": 0}))
    with pytest.raises(ValueError, match="not valid JSON"):
        CheckpointRecord.from_json("{", "m.json")


def write_checkpoint(folder: Path, record: CheckpointRecord, config_overrides: list[str]) -> str:
    """A complete checkpoint folder holding only its record and config (enough to read where it logs)."""
    from arflow_scale.config import config_from_dict, dump_yaml

    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(record.to_json())
    (folder / "config.yaml").write_text(dump_yaml(config_from_dict({}, config_overrides), mask_secrets=True))
    files = {name: (folder / name).stat().st_size for name in ("meta.json", "config.yaml")}
    (folder / "ranks").mkdir()
    (folder / "ranks" / "rank_0.json").write_text(json.dumps({"rank": 0, "files": files}))
    return str(folder)


def test_fid_model_logs_to_the_store_the_checkpoint_recorded(tmp_path, monkeypatch):
    """A run that logged to a store given by MLFLOW_TRACKING_URI (not in its config): `arflow fid model` must
    find that store from the checkpoint, not fall back to a fresh sqlite file in the run folder (the bug:
    the record was written as `tracking_uri` and read as `mlflow_tracking_uri`)."""
    from arflow_scale.cli.fid import checkpoint_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    record = CheckpointRecord(step=12, world_size=1, mlflow_run_id="run-1", tracking_uri=store)
    checkpoint = write_checkpoint(tmp_path / "run" / "checkpoint_000000012", record, ["run.name=run"])
    target, step = checkpoint_run(checkpoint, {})
    assert (target.uri, target.run_id, step) == (store, "run-1", 12)
    # a recorded URI whose password was masked is not used: the environment supplies the store
    masked = CheckpointRecord(step=12, world_size=1, mlflow_run_id="run-1",
                              tracking_uri="https://bob:***@mlflow.internal")
    checkpoint = write_checkpoint(tmp_path / "run2" / "checkpoint_000000012", masked, ["run.name=run2"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:secret@mlflow.internal")
    assert checkpoint_run(checkpoint, {})[0].uri == "https://bob:secret@mlflow.internal"


def test_train_result_is_strict_json():
    from arflow_scale.train.driver import TrainResult

    result = TrainResult(final_step=3, final_loss=math.nan, params_sha256="a", ema_sha256="b", checkpoint="c",
                         mlflow_run_id=None, mlflow_tracking_uri=None, images_per_s=1.0)
    text = json.dumps(result.to_json(), allow_nan=False)
    assert json.loads(text)["final_loss"] is None and "fid" not in json.loads(text)
