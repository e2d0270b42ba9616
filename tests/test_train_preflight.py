"""What `arflow train` refuses before anything starts (no Ray, no run folder, no MLflow run): a missing
manifest, a K no class can fill, classes it would never train, a run folder another driver holds."""
from __future__ import annotations

import pytest

from arflow_scale.cli import main
from arflow_scale.config import config_from_dict
from arflow_scale.data import write_shards
from arflow_scale.schema import ConfigError
from arflow_scale.train.preflight import check_data
from conftest import REPO
from test_data_stream import id_source

BASE = ["model.size=tiny/2", "model.image_size=4", "model.in_channels=1", "model.num_classes=3", "model.k=3",
        "cluster.num_workers=2", "cluster.use_gpu=false", "run.name=pre", "train.steps=2"]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Class 0: 12 samples in 3 shards; class 1: none (a name in the manifest, no shard); class 2: 6 in 1."""
    url = str(tmp_path_factory.mktemp("uneven") / "shards")
    write_shards(id_source([12, 0, 6]), url, samples_per_shard=4, progress=False)
    return url


def train_cli(storage, *overrides):
    return main(["train", "--config", str(REPO / "configs" / "demo.yaml"), f"run.storage_path={storage}", "run.prepare_data=null",
                 "tracking.system_metrics=false", *BASE, *overrides])


def assert_untouched(storage) -> None:
    assert not storage.exists(), f"the refused run wrote {sorted(storage.rglob('*'))}"


def test_missing_manifest_exits_2_naming_the_key(tmp_path, capsys):
    storage = tmp_path / "runs"
    assert train_cli(storage, f"data.manifest={tmp_path}/nowhere") == 2
    err = capsys.readouterr().err
    assert f"configuration error: data.manifest: {tmp_path}/nowhere: no manifest.json there" in err
    assert train_cli(storage, "data.manifest=") == 2
    assert "data.manifest: not set" in capsys.readouterr().err
    assert_untouched(storage)


def test_k_larger_than_every_class_exits_2_naming_model_k(uneven, tmp_path, capsys):
    storage = tmp_path / "runs"
    assert train_cli(storage, f"data.manifest={uneven}", "model.k=13") == 2
    assert ("data.manifest" not in (err := capsys.readouterr().err)
            and "model.k: 13 images per sequence, but no class of" in err and "(the largest has 12)" in err)
    assert train_cli(storage, f"data.manifest={uneven}", "model.k=7", "data.num_workers=2") == 2
    assert "model.k: 7 images per sequence, but split over 4 loader workers (2 ranks x 2)" in capsys.readouterr().err
    assert_untouched(storage)


def test_classes_never_trained_are_an_error_unless_allowed(uneven, tmp_path, capsys):
    storage = tmp_path / "runs"
    """K=5 on 2 ranks: class 1 has no shard, class 2's shards of 4 and 2 give no rank 5 samples."""
    storage = tmp_path / "runs"
    assert train_cli(storage, f"data.manifest={uneven}", "model.k=5") == 2
    err = capsys.readouterr().err
    assert "data.require_all_classes: classes 1 (c1), 2 (c2) of" in err and "would never be trained" in err
    assert_untouched(storage)
    cfg = config_from_dict({}, BASE + [f"data.manifest={uneven}", "data.require_all_classes=false"])
    plan = check_data(cfg, k=5)
    assert plan.trained == (0,) and plan.left_out == (1, 2)
    assert plan.params() == {"data.classes_trained": "1", "data.classes_left_out": "c1,c2"}


def test_trained_classes_follow_the_largest_worker_count(uneven):
    """Class 2's shards of 4 and 2 samples: with 1 or 2 workers one worker holds at least K=3, 3 workers split the
    shards by sample (2 each); an elastic range is judged at its max."""
    def plan(workers):
        return check_data(config_from_dict({}, BASE + [f"data.manifest={uneven}", f"cluster.num_workers={workers}",
                                                       "data.require_all_classes=false"]), k=3)
    assert plan(1).trained == (0, 2)
    assert plan("1..2").trained == (0, 2)
    assert plan("1..3").trained == (0,)
    with pytest.raises(ConfigError, match=r"cluster.num_workers: '1\.\.2': a fixed number of workers"):
        config_from_dict({}, ["cluster.num_workers=1..2"]).cluster.fixed_workers


def test_missing_shard_is_refused_before_start(uneven, tmp_path):
    import shutil
    from pathlib import Path

    copy = Path(shutil.copytree(uneven, tmp_path / "copy"))
    next(copy.glob("shards/c0000-*.tar")).unlink()
    cfg = config_from_dict({}, BASE + [f"data.manifest={copy}", "data.require_all_classes=false"])
    with pytest.raises(ConfigError, match=r"data.manifest: .* names 1 shard\(s\) that are not there"):
        check_data(cfg, k=3)


def test_a_run_folder_in_use_is_refused_with_exit_3(uneven, tmp_path, capsys):
    from arflow_scale.train.run_lock import RunLock

    storage = tmp_path / "runs"
    with RunLock(str(storage / "pre"), heartbeat_seconds=30):
        assert train_cli(storage, f"data.manifest={uneven}", "data.require_all_classes=false") == 3
        err = capsys.readouterr().err
        assert f"arflow train: run folder {storage}/pre is in use by another `arflow train`" in err
    written = sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*"))
    assert written == ["pre", "pre/.run.lock.guard"]  # the lock's own guard only: no MLflow store, no checkpoint
