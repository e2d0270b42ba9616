"""What a user watching `arflow train` sees: the progress line's format, and the console printing to the stderr it
finds. A whole run's console, free of Ray's and the libraries' own output, is checked on `arflow demo`
(test_train_cli.py)."""
from __future__ import annotations

import sys

from arflow_scale.train.console import StepProgress, format_seconds, progress_line


def test_progress_line_and_eta_format():
    line = progress_line(StepProgress(step=120, total=1200, loss=0.41234, loss_name="loss", lr=2e-3,
                                      images_per_s=1234.4, data_wait_fraction=0.031, eta_seconds=80))
    assert line == "step 120/1200  loss 0.4123  lr 2.00e-03  1234 img/s  data 3%  eta 1m20s"
    with_mfu = StepProgress(step=1, total=2, loss=1.0, loss_name="bits_per_dim", lr=1e-4, images_per_s=9.6,
                            data_wait_fraction=0.0, eta_seconds=7300, mfu=0.4512)
    assert progress_line(with_mfu).endswith("bits_per_dim 1.0000  lr 1.00e-04  10 img/s  data 0%  mfu 45.1%  eta 2h01m")
    assert format_seconds(59.6) == "1m00s" and format_seconds(-3) == "0m00s"
    resized = StepProgress(step=5, total=9, loss=1.0, loss_name="loss", lr=1e-4, images_per_s=9.6,
                           data_wait_fraction=0.0, eta_seconds=7, world_size=3)
    assert progress_line(resized, show_world=True).endswith("eta 0m07s  workers 3")
    assert "workers" not in progress_line(resized)


def test_console_prints_to_the_stderr_it_finds_when_made(ray_local, monkeypatch):
    """Not to the stderr of the first import (a closed capture once a test or caller replaced it)."""
    import io

    from arflow_scale.train.console import Console, Notice

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    console = Console()
    console.show(Notice("checkpoint somewhere"))
    console.close()
    assert sys.stderr.getvalue() == "checkpoint somewhere\n"
