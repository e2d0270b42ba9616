"""Finished sweep and comparison points: each record keeps its config's fields and is checked field by field
against the config its point resolves to now. A changed field is refused by name; an option added since, at its
default, is not a change; credentials are neither stored nor compared; records from before records kept their
config (a sha only) are checked through their final checkpoint's config.yaml and gain the fields."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from arflow_scale.config import ConfigError, load_config, to_dict
from arflow_scale.schema import changed_fields, dump_yaml, field_values
from arflow_scale.scaling.finished import finished_points, legacy_config_sha, point_fields
from arflow_scale.scaling.state import read_json, write_json
from arflow_scale.scaling.sweep import SweepPoint

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo.yaml"
SECRETS = {"key": "AKIAEXAMPLEKEY", "secret": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:9"}


def _point(*overrides: str, name: str = "tiny-p1") -> SweepPoint:
    cfg = load_config(DEMO, ["train.steps=4", f"run.name={name}", *overrides])
    return SweepPoint(name=name, config=cfg, params=1, flops_per_step=1, steps=4, coords={})


def _record(tmp_path: Path, point: SweepPoint, **fields) -> str:
    """A finished point's result record under tmp_path/points/, as a run writes it (plus `fields`)."""
    url = str(tmp_path / "points" / f"{point.name}.json")
    write_json(url, {"name": point.name, "loss": 0.5, "config": point_fields(point.config), **fields}, {})
    return url


def _older_version_config(point: SweepPoint, missing: str) -> dict:
    """The point's resolved config as a version without the option `missing` ("section.key") resolved it."""
    tree = to_dict(point.config)
    section, key = missing.split(".")
    del tree[section][key]
    return tree


def test_field_values_stop_at_dataclass_fields_and_leave_secrets_out():
    cfg = load_config(DEMO, [f"run.storage_options={json.dumps(SECRETS)}", "tracking.uri=http://u:pw@127.0.0.1:5"])
    values = field_values(cfg)
    assert values["run.storage_options"] == {"endpoint_url": "http://127.0.0.1:9"}  # a dict field stays whole
    assert values["tracking.uri"] == "http://u:***@127.0.0.1:5"
    assert values["model.k"] == cfg.model.k and "model" not in values
    assert "s3cr3t" not in json.dumps(values) and "AKIA" not in json.dumps(values) and ":pw@" not in json.dumps(values)


def test_changed_fields_name_each_change_and_accept_options_added_at_their_default():
    defaults = {"a": 1, "b": "x", "new": False}
    assert changed_fields({"a": 1, "b": "x"}, {"a": 1, "b": "x", "new": False}, defaults) == []
    assert changed_fields({"a": 1, "b": "x", "gone": 3}, {"a": 2, "b": "x"}, defaults) == ["a: 1 -> 2"]
    assert changed_fields({"a": 1}, {"a": 1, "new": True}, defaults) == ["new: not set -> True"]
    assert changed_fields({"a": 1}, {"a": 1, "unknown": 0}, defaults) == ["unknown: not set -> 0"]


def test_a_finished_point_is_skipped_and_a_changed_one_refused_by_field(tmp_path):
    point = _point()
    _record(tmp_path, point)
    records, todo = finished_points([point, _point(name="tiny-p2")], str(tmp_path), {}, "sweep tiny")
    assert records == {"tiny-p1": {"name": "tiny-p1", "loss": 0.5}} and [p.name for p in todo] == ["tiny-p2"]
    changed = _point("optim.lr=0.5", "model.depth=3")
    with pytest.raises(ConfigError, match=r"point tiny-p1: finished with a different config than sweep tiny now "
                                          r"gives \(model\.depth: None -> 3; optim\.lr: [\d.e-]+ -> 0\.5\)"):
        finished_points([changed], str(tmp_path), {}, "sweep tiny")


def test_an_option_added_since_counts_only_when_set_away_from_its_default(tmp_path):
    point = _point()
    fields = point_fields(point.config)
    del fields["checkpoint.hash_restored"]  # a record from before the option existed
    write_json(str(tmp_path / "points/tiny-p1.json"), {"name": "tiny-p1", "config": fields}, {})
    assert list(finished_points([point], str(tmp_path), {}, "sweep tiny")[0]) == ["tiny-p1"]
    with pytest.raises(ConfigError, match=r"checkpoint\.hash_restored: not set -> True"):
        finished_points([_point("checkpoint.hash_restored=true")], str(tmp_path), {}, "sweep tiny")


def test_credentials_are_not_recorded_and_changing_them_is_not_a_change(tmp_path):
    point = _point(f"run.storage_options={json.dumps(SECRETS)}")
    url = _record(tmp_path, point)
    assert "s3cr3t" not in Path(url).read_text() and "AKIA" not in Path(url).read_text()
    rotated = _point(f"run.storage_options={json.dumps({**SECRETS, 'secret': 'rotated'})}")
    assert list(finished_points([rotated], str(tmp_path), {}, "sweep tiny")[0]) == ["tiny-p1"]


def test_records_from_before_stored_configs_are_checked_through_their_checkpoint(tmp_path):
    point = _point()
    url = str(tmp_path / "points/tiny-p1.json")
    # same sha as now: finished, and the record gains its fields
    write_json(url, {"name": "tiny-p1", "config_sha": legacy_config_sha(point.config), "checkpoint": None}, {})
    assert list(finished_points([point], str(tmp_path), {}, "sweep tiny")[0]) == ["tiny-p1"]
    assert read_json(url, {})["config"] == point_fields(point.config)

    # written by a version without checkpoint.hash_restored: the sha differs, the final checkpoint tells
    older = _older_version_config(point, "checkpoint.hash_restored")
    older_sha = hashlib.sha256(json.dumps({**older, "tracking": {k: v for k, v in older["tracking"].items()
                                                                 if k != "uri"}},
                                          sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert older_sha != legacy_config_sha(point.config)
    checkpoint = tmp_path / "runs/tiny-p1/checkpoint_000000004"
    checkpoint.mkdir(parents=True)
    launched = {**older, "tracking": {**older["tracking"], "uri": "sqlite:///x.db", "parent_run_id": "abc"}}
    (checkpoint / "config.yaml").write_text(dump_yaml(launched, mask_secrets=True))
    write_json(url, {"name": "tiny-p1", "config_sha": older_sha, "checkpoint": str(checkpoint)}, {})
    assert list(finished_points([point], str(tmp_path), {}, "sweep tiny")[0]) == ["tiny-p1"]
    assert read_json(url, {})["config"] == point_fields(point.config)

    # the same older record against a changed point: refused by field
    write_json(url, {"name": "tiny-p1", "config_sha": older_sha, "checkpoint": str(checkpoint)}, {})
    with pytest.raises(ConfigError, match=r"optim\.lr: [\d.e-]+ -> 0\.5"):
        finished_points([_point("optim.lr=0.5")], str(tmp_path), {}, "sweep tiny")
    assert "config" not in read_json(url, {})  # nothing rewritten for a refused point

    # and without its checkpoint it cannot be checked: refused, saying why
    (checkpoint / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="config.yaml cannot be read"):
        finished_points([point], str(tmp_path), {}, "sweep tiny")
    assert read_json(url, {}) == {"name": "tiny-p1", "config_sha": older_sha, "checkpoint": str(checkpoint)}
