#!/usr/bin/env python
"""Scaling-law report of a finished sweep: IsoFLOP profiles and frontier, the parametric law L(N, D),
power laws L(N), L(C), FID(C) and a held-out prediction check, with intervals; a markdown/CSV table
and PNG plots (logged to the sweep's parent MLflow run).

    python tools/scaling_report.py --parent-run RUN_ID --tracking-uri sqlite:///runs/mlflow.db --out report/
    python tools/scaling_report.py --csv points.csv --out report/

A thin wrapper over `arflow scaling fit`, kept here so a report is one command in a notebook-free setup.
"""
from __future__ import annotations

import sys

from arflow_scale.cli import main as arflow

if __name__ == "__main__":
    sys.exit(arflow(["scaling", "fit", *sys.argv[1:]]))
