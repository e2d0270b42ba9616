"""The `arflow` command's parser: the light commands start without torch or Ray, a benchmark's arguments arrive
when it is chosen, and shared options parse and fail naming the item."""
from __future__ import annotations

import subprocess
import sys

import pytest

from arflow_scale.cli import build_parser
from arflow_scale.cli.bench import BENCHMARKS
from arflow_scale.cli.options import parse_storage_options

LIGHT = """
import sys
from arflow_scale.cli import build_parser
parser = build_parser()
for argv in (["jobs", "list"], ["jobs", "logs", "raysubmit_x", "--follow"], ["submit", "--", "echo"]):
    parser.parse_args(argv)
print(sorted(name for name in ("torch", "ray", "deepspeed", "mlflow") if name in sys.modules))
"""


def test_jobs_and_submit_parse_without_torch_or_ray():
    proc = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_benchmark_gets_its_arguments_and_handler_when_chosen(capsys):
    from arflow_scale.bench import attention

    args = build_parser().parse_args(["bench", "attention", "--k", "1,2", "--device", "cpu"])
    assert (args.benchmark, args.k, args.device, args.handler) == ("attention", "1,2", "cpu", attention.run)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "attention", "--help"])
    assert "--triton-blocks" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in BENCHMARKS)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "nope"])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_storage_options_parse_and_a_malformed_item_is_named():
    assert parse_storage_options(["endpoint_url=http://127.0.0.1:9000", " key =a=b"]) == {
        "endpoint_url": "http://127.0.0.1:9000", "key": "a=b"}
    assert parse_storage_options(None) == {}
    for bad in ("novalue", "=x"):
        with pytest.raises(ValueError, match=rf"--storage-option '{bad}': expected key=value"):
            parse_storage_options([bad])


@pytest.mark.parametrize("command", [["sweep", "--config", "configs/sweeps/imagenet128.yaml", "--status",
                                      "--budgets", "1e18"],
                                     ["train", "--config", "configs/imagenet128.yaml", "--dry-run"]],
                         ids=["sweep-status", "train-dry-run"])
def test_s3_storage_without_credentials_fails_in_one_line_naming_what_to_set(tmp_path, command):
    """`arflow sweep --status` of the ImageNet sweep (its storage on s3://) and `arflow train --dry-run` of its
    recipe (shards on s3://) where no credentials exist: one clear error line and exit 2, not botocore's traceback,
    and at once: missing credentials are not an outage to retry (the recipe's data.retries is 8)."""
    import os
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    arflow = str(Path(sys.executable).with_name("arflow"))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([arflow, *command], capture_output=True, text=True, timeout=120, env=env, cwd=repo)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"arflow {command[0]}: error: no credentials for S3 storage (Unable to locate credentials): set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance role), or the storage_options of "
        "the config"]
