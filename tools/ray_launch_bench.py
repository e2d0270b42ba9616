"""What one Ray Train launch costs, Ray Train's TorchTrainer beside ours (train/ray_trainer.py), on one local Ray.

Each round launches both trainers in turn, 2 workers running a trivial train function (a gloo barrier), and times
the launch (`fit`, wall) and the machine's busy CPU over it (/proc/stat, so run it on an otherwise idle machine).
Prints one JSON line per launch, then the medians of the rounds after the first (it starts Ray's shared actors).

    python tools/ray_launch_bench.py --rounds 7
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from arflow_scale.cluster.connect import start_local_ray
from arflow_scale.train.ray_trainer import LeanTorchTrainer

TRAINERS = {"ray": TorchTrainer, "arflow": LeanTorchTrainer}


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, not idle or waiting on I/O)."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def timed_launch(trainer_class: type, storage: str, name: str, workers: int = 2) -> dict:
    """One `fit` of `trainer_class` on the connected Ray: {"seconds", "busy_cpu_seconds"}."""
    start, cpu = time.perf_counter(), busy_cpu_seconds()
    trainer_class(barrier, scaling_config=ScalingConfig(num_workers=workers),
                  run_config=RunConfig(storage_path=storage, name=name)).fit()
    return {"seconds": round(time.perf_counter() - start, 3), "busy_cpu_seconds": round(busy_cpu_seconds() - cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="arflow-launch-"))
    start_local_ray(2, root / "ray", dashboard=False)
    launches: dict[str, list[dict]] = {name: [] for name in TRAINERS}
    try:
        for round_index in range(args.rounds):
            for name, trainer_class in TRAINERS.items():
                launch = timed_launch(trainer_class, str(root / "runs"), f"{name}-{round_index}")
                launches[name].append(launch)
                print(json.dumps({"trainer": name, "round": round_index, **launch}), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)  # Ray's session files and the runs' folders
    measured = {name: runs[1:] or runs for name, runs in launches.items()}
    print(json.dumps({"median": {name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                                 for name, runs in measured.items()}}))


if __name__ == "__main__":
    main()
