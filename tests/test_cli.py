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
