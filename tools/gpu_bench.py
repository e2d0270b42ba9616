#!/usr/bin/env python
"""GPU speed of one node, without Ray, MLflow or webdataset (only torch, DeepSpeed and this package).

Prints one JSON line per measurement (key "benchmark"):
  peak       the best rate of an 8192^3 bf16 matmul: the MFU denominator (`--peak-tflops` overrides it)
  attention  fwd+bwd time and peak memory of intra (the floor), full (dense mask), full_flex, hybrid (torch),
             hybrid_triton and hybrid_triton_sdpa at each --attention-k (`arflow bench attention`; its own lines,
             then ratios)
  train      per variant: images/s, step ms, host ms (the step's call before the wait for the GPU), model
             TFLOP/s, MFU, peak memory, first-step seconds (compilation included), losses. Variants: plain_eager,
             plain_compiled (each block compiled), plain_compiled_model (the whole forward),
             zero{2,3}_{eager,compiled} (our engine: `train.engine.build_engine`)
  sample     ms per sampling step (one image per step through the cache, CFG), eager and compiled, early and late,
             per attention backend (--sample-backends)
  profile    with --profile DIR: a torch.profiler Chrome trace of --profile-variant's steps, the GPU's busy share of
             each step, host reads and syncs per step, and the top operators
A single-rank process group (NCCL on CUDA, gloo on CPU) on 127.0.0.1 serves the DeepSpeed engines.

    python tools/gpu_bench.py --size XL/2 --image-size 32 --in-channels 4 --k 5 --batch-size 16
    python tools/gpu_bench.py --device cpu --smoke           # tiny shapes: every section runs (the test suite)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arflow_scale.bench import attention as attention_bench  # noqa: E402
from arflow_scale.bench.process_group import single_rank_group  # noqa: E402
from arflow_scale.bench.sampling_steps import sampling_step_ms  # noqa: E402
from arflow_scale.bench.steps import DEFAULT_VARIANTS, VARIANTS, bench_config, profile_steps, time_steps, \
    variant_step  # noqa: E402
from arflow_scale.model.attention import BACKENDS  # noqa: E402
from arflow_scale.tasks import task_for  # noqa: E402
from arflow_scale.train.mfu import FlopsMeter, measure_peak_tflops  # noqa: E402

SECTIONS = ("peak", "attention", "train", "sample")
SMOKE = dict(size="tiny/2", image_size=8, in_channels=1, k=3, batch_size=4, num_classes=10, steps=2, warmup=1,
             sample_batch=2, sample_steps=4, attention_k="1,2", peak_size=256)


def emit(benchmark: str, **values) -> None:
    print(json.dumps({"benchmark": benchmark, **values}), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--size", default="XL/2")
    parser.add_argument("--image-size", type=int, default=32, help="latent side (32: ImageNet 256 latents)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (x K images)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--activation-checkpointing", default="none")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", *BACKENDS))
    parser.add_argument("--overlap-comm", default="auto", choices=("auto", "on", "off"),
                        help="our engine's train.overlap_comm (auto: the trainer's choice, off on one rank): on, "
                             "DeepSpeed copies and reduces gradient buckets on a side stream while backward runs")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    parser.add_argument("--attention-k", default="1,2,5,10,20")
    parser.add_argument("--sample-batch", type=int, default=64, help="images sampled together (x2 rows with CFG)")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--sample-backends", default="auto",
                        help="attention backends of the sample section: the first sampled eager and compiled, the "
                             "others compiled (e.g. auto,torch: inductor compiling the plain-PyTorch attention whole)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured)")
    parser.add_argument("--peak-size", type=int, default=8192, help="n of the n^3 matmul that measures the peak")
    parser.add_argument("--profile", default=None, metavar="DIR", help="write a profiler trace of one variant here")
    parser.add_argument("--profile-variant", default="zero2_compiled", choices=tuple(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few steps (CPU-friendly)")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    for flag, text, known in (("--only", args.only, SECTIONS), ("--variants", args.variants, VARIANTS),
                              ("--sample-backends", args.sample_backends, ("auto", *BACKENDS))):
        unknown = [part for part in text.split(",") if part not in known]
        if unknown:
            parser.error(f"{flag}: {', '.join(unknown)} not in {', '.join(known)}")
    return args


def run_peak(args, device: torch.device) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measured = measure_peak_tflops(device, dtype, n=args.peak_size)
    emit("peak", dtype=str(dtype).removeprefix("torch."), n=args.peak_size, tflops=float(f"{measured:.4g}"),
         used_tflops=args.peak_tflops or float(f"{measured:.4g}"))
    return args.peak_tflops or measured


def run_attention(args, device: torch.device) -> None:
    parser = argparse.ArgumentParser()
    attention_bench.add_arguments(parser)
    threads = torch.get_num_threads()
    attention_bench.run(parser.parse_args(["--k", args.attention_k, "--device", str(device)]
                                          + (["--smoke"] if args.smoke else [])))
    torch.set_num_threads(threads)


def run_train(args, device: torch.device, peak: float) -> None:
    base = bench_config(args.size, args.image_size, args.in_channels, args.k, args.batch_size,
                        num_classes=args.num_classes, activation_checkpointing=args.activation_checkpointing,
                        attention_backend=args.attention_backend,
                        overlap_comm={"auto": None, "on": True, "off": False}[args.overlap_comm])
    task = task_for(base.model)
    meter = FlopsMeter.for_training(task.forward_flops(), args.batch_size, 1, peak)
    for name in args.variants.split(","):
        try:
            times = time_steps(name, variant_step(name, base, device), device, args.warmup, args.steps)
            emit("train", **times.summary(args.batch_size * task.images_per_sample, meter))
        except Exception as err:  # noqa: BLE001 - one variant failing (memory) must not hide the others
            emit("train", variant=name, error=f"{type(err).__name__}: {err}"[:500])
        gc.collect()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        trace = str(Path(args.profile) / f"engine_{args.profile_variant}.json")
        profiled = profile_steps(variant_step(args.profile_variant, base, device)(), device, trace)
        emit("profile", variant=args.profile_variant, trace=trace, **profiled.line())


def run_sample(args, device: torch.device) -> None:
    """Sampling ms per step for each --sample-backends entry, on the same weights (the same seed)."""
    for index, backend in enumerate(args.sample_backends.split(",")):
        base = bench_config(args.size, args.image_size, args.in_channels, args.k, args.batch_size,
                            num_classes=args.num_classes, attention_backend=backend)
        task = task_for(base.model)
        torch.manual_seed(0)
        model = task.build_model().to(device).eval()
        labels = torch.arange(args.sample_batch, device=device) % task.num_classes
        for compile in (False, True) if index == 0 else (True,):
            result = sampling_step_ms(model, labels, args.sample_steps, args.cfg_scale, compile)
            emit("sample", size=args.size, images=args.sample_batch, cfg_scale=args.cfg_scale,
                 attention_backend=backend, **result)
        del model
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --device cpu for a CPU run)", file=sys.stderr)
        return 2
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.set_float32_matmul_precision("high")  # train.tf32's default
    from arflow_scale.train.engine import import_deepspeed

    deepspeed = import_deepspeed()

    sections = args.only.split(",")
    emit("header", device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch=torch.__version__,
         deepspeed=deepspeed.__version__, size=args.size, image_size=args.image_size, in_channels=args.in_channels,
         k=args.k, batch_size=args.batch_size, attention_backend=args.attention_backend,
         overlap_comm=args.overlap_comm, sections=sections)
    peak = run_peak(args, device) if "peak" in sections else args.peak_tflops
    if "attention" in sections:
        run_attention(args, device)
    if "train" in sections:
        with single_rank_group(device):
            run_train(args, device, peak)
    if "sample" in sections:
        run_sample(args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
