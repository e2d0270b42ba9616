"""`arflow bench train`: images/s of our stack (Ray Train + DeepSpeed, 1 worker, ZeRO 0 and 2) next to a
plain single-process PyTorch loop of the same model, batch and in-memory data; prints the ratios.

Both sides use the same number of CPU threads, the same AdamW / value clipping / EMA work per step and
skip the first fifth of the steps as warm-up; throughput is images per step over the median step time
(robust to load from other processes). Goal: our stack keeps >= 0.9x of the plain loop.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from arflow_scale.bench.batches import InMemoryStreams
from arflow_scale.config import Config, config_from_dict
from arflow_scale.tasks import task_for
from arflow_scale.train.deepspeed_config import clip_grads_by_value, param_groups
from arflow_scale.train.rng import step_generator


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="tiny/2", help="model size (registry name/patch)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the plain loop and the worker")
    parser.add_argument("--stages", default="0,2", help="ZeRO stages of our stack to measure")


def bench_config(args, stage: int, storage: str) -> Config:
    return config_from_dict({}, [
        f"model.size={args.size}", f"model.image_size={args.image_size}", f"model.in_channels={args.channels}",
        f"model.k={args.k}", "model.num_classes=10", f"data.batch_size={args.batch_size}",
        f"train.steps={args.steps}", f"train.zero_stage={stage}", f"checkpoint.every={args.steps}",
        f"train.log_every={args.steps}", "train.sample_every=0", "tracking.enabled=false",
        "cluster.num_workers=1", "cluster.use_gpu=false", f"cluster.resources_per_worker={{CPU: {args.threads}}}",
        f"run.storage_path={storage}", f"run.name=bench-zero{stage}-{int(time.time())}"])


def plain_loop_images_per_s(cfg: Config, threads: int) -> float:
    """The reference: model + AdamW (decay on matrices) + value clipping + EMA, one process, no framework."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _plain_loop(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _plain_loop(cfg: Config) -> float:
    task = task_for(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = iter(InMemoryStreams()(cfg, task, 0, 1))
    warmup = max(1, cfg.train.steps // 5)
    step_times = []
    for step in range(1, cfg.train.steps + 1):
        started = time.perf_counter()
        x, y = next(data)
        loss = task.loss(model, x, y, step_generator(cfg.train.seed, 0, step, 0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grads_by_value(optimizer, cfg.optim.clip_value)
        optimizer.step()
        with torch.no_grad():
            for name, param in model.named_parameters():
                ema[name].lerp_(param, 1 - cfg.train.ema_decay)
        if step > warmup:
            step_times.append(time.perf_counter() - started)
    return cfg.data.batch_size * task.images_per_sample / statistics.median(step_times)


def run(args) -> int:
    import tempfile

    from arflow_scale.cluster.connect import ray_session  # Ray and the driver: not at parser build (arflow --help)
    from arflow_scale.train.driver import train

    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="arflow_bench_train_") as storage:
        # Ray starts first so both sides run beside the same background daemons; the plain loop runs
        # before and after every stack measurement, and each stack run is compared with the mean of
        # its two neighbours (a paired measurement, robust to load drifting during the run).
        with ray_session():
            plain = [plain_loop_images_per_s(bench_config(args, 0, storage), args.threads)]
            ours = {}
            for stage in stages:
                result = train(bench_config(args, stage, storage), stream_factory=InMemoryStreams())
                ours[stage] = result.images_per_s
                plain.append(plain_loop_images_per_s(bench_config(args, 0, storage), args.threads))
    paired = {stage: ours[stage] / statistics.mean(plain[i:i + 2]) for i, stage in enumerate(stages)}
    best = max(plain)
    print(f"model {args.size} {args.channels}x{args.image_size}x{args.image_size}, K={args.k}, "
          f"batch {args.batch_size}, {args.steps} steps, {args.threads} thread(s), in-memory data")
    print(f"{'plain PyTorch loop':34s} runs {', '.join(f'{v:.1f}' for v in plain)} images/s")
    for stage, value in ours.items():
        print(f"{'Ray Train + DeepSpeed ZeRO-' + str(stage):34s} {value:10.1f} images/s  "
              f"ratio {paired[stage]:.3f}x vs the plain runs beside it ({value / best:.3f}x vs the best)  "
              f"{'OK' if paired[stage] >= 0.9 else 'below 0.9x'}")
    print(json.dumps({"plain_runs": plain, "plain_best_images_per_s": best,
                      **{f"zero{s}_images_per_s": v for s, v in ours.items()},
                      **{f"zero{s}_ratio": paired[s] for s in stages},
                      **{f"zero{s}_ratio_vs_best": v / best for s, v in ours.items()}}), flush=True)
    return 0
