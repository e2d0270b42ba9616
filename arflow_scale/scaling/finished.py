"""Which points of a sweep or comparison are finished: their result records under `points/`, each checked field
by field against the config the point resolves to now, so that a changed point is refused naming its fields and
an upgrade that only adds options (at their defaults) keeps finished points finished."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import yaml

from arflow_scale.checkpoint.store import read_config
from arflow_scale.config import Config, ConfigError, load_config, to_dict
from arflow_scale.schema import changed_fields, field_values

from .state import read_json, write_json

LAUNCH_FIELDS = ("tracking.uri", "tracking.parent_run_id")  # set when the point is launched, not by its design
CONFIG_KEYS = ("config", "config_sha")  # what a record file keeps of its config (config_sha: older records)


def point_fields(cfg: Config) -> dict[str, Any]:
    """The fields a point's result record keeps of its config (`field_values`, without `LAUNCH_FIELDS`)."""
    fields = field_values(cfg)
    for key in LAUNCH_FIELDS:
        fields.pop(key, None)
    return fields


def legacy_config_sha(cfg: Config) -> str:
    """What records written before they kept their config hold instead: 16 hex digits of sha256 over the whole
    resolved config but tracking.uri (so any option added since changes it)."""
    resolved = to_dict(cfg)
    resolved["tracking"].pop("uri", None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _recorded_fields(record: dict, cfg: Config, storage_options: dict) -> Optional[dict[str, Any]]:
    """The config fields a record was finished with; for an older record (a sha only), those of the config in its
    final checkpoint, where options added since take their defaults. None when neither can be read."""
    if "config" in record:
        return record["config"]
    if record.get("config_sha") == legacy_config_sha(cfg):
        return point_fields(cfg)
    try:
        return point_fields(read_config(record["checkpoint"], storage_options))
    except (KeyError, TypeError, OSError, ConfigError, yaml.YAMLError):
        return None


def finished_points(points: list, root: str, storage_options: dict, what: str) -> tuple[dict[str, dict], list]:
    """({point name: result record} of the SweepPoints finished under `root`/points/, [the points still to run]).

    A record finished under another config is a ConfigError naming the point and the changed fields (`what`:
    the sweep or comparison). An older record that passes gains its `config` field in its file; the records
    returned leave out `CONFIG_KEYS`, as `run_point` returns them.
    """
    defaults = point_fields(load_config(None, []))
    records: dict[str, dict] = {}
    todo = []
    for point in points:
        url = f"{root}/points/{point.name}.json"
        record = read_json(url, storage_options)
        if record is None:
            todo.append(point)
            continue
        current = point_fields(point.config)
        recorded = _recorded_fields(record, point.config, storage_options)
        if recorded is None:
            raise ConfigError(f"point {point.name}: its record predates stored configs, its sha differs from the "
                              f"config {what} now gives, and its final checkpoint's config.yaml cannot be read "
                              f"({record.get('checkpoint')}); rename {what} or delete its points/ results to rerun")
        changed = changed_fields(recorded, current, defaults)
        if changed:
            raise ConfigError(f"point {point.name}: finished with a different config than {what} now gives "
                              f"({'; '.join(changed[:8])}); rename {what} or delete its points/ results to rerun")
        if "config" not in record:
            write_json(url, {**record, "config": current}, storage_options)
        records[point.name] = {key: value for key, value in record.items() if key not in CONFIG_KEYS}
    return records, todo
