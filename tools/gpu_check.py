#!/usr/bin/env python
"""Smoke-test one GPU node before a long job: the CUDA / bf16 / NCCL paths that CPU tests cannot reach.

Runs without Ray (a single-rank NCCL group on 127.0.0.1), on the first CUDA device (`--device cpu`
runs the same checks in fp32 on gloo, which is how the test suite exercises this script):
  1. attention  `hybrid_attention` and `full_attention` on CUDA (fp32, bf16) against the same call
                in fp64 on the CPU; chunk-by-chunk with its state equals the whole sequence.
     attention_triton  the fused Triton hybrid kernels (fp32, bf16; head dims 32-128; chunks of 16,
                196, 256 tokens), alone and with SDPA for the softmax part (`triton_sdpa`): output, state
                and every gradient against the fp64 CPU reference.
  2. model      ARFlow forward on CUDA: fp32 equals the CPU fp64 forward; one image at a time
                through the cache equals the full forward; bf16 autocast stays close.
  3. deepspeed  our DeepSpeed config in bf16 for ZeRO 0, 2 and 3 on NCCL: a few steps on a fixed fp32
                batch under bf16 autocast (as the trainer steps) lower the loss; the bf16 weights stay
                within rounding of the fp32 masters, and the raw weights read back from the checkpoint
                (as `arflow export` does) are those masters, as are the weights the EMA averages; a
                checkpoint saved and restored continues with the same losses as the run that went on.
  4. farmer     FARMER (tiny/2 on 16x16x3) on the device: its log-density in fp32 equals the CPU fp64
                one, the flow inverts its forward, bf16 autocast stays close, guided sampling and the
                one-step student give images in range; then its training objective under our DeepSpeed
                config at ZeRO 0, 2 and 3 (bf16 autocast on CUDA, fp32 on CPU) falls on a fixed batch.
Prints one JSON line per check and exits non-zero if any check fails.

    python tools/gpu_check.py [--size S/2] [--only attention,attention_triton,model,deepspeed,farmer] [--steps 20]
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arflow_scale.bench.process_group import single_rank_group  # noqa: E402

RESULTS: list[dict] = []
GROUP = contextlib.ExitStack()  # the one-rank process group, once a check needs it (`in_group`)


def report(name: str, ok: bool, **values) -> None:
    line = {"check": name, "ok": bool(ok), **values}
    RESULTS.append(line)
    print(json.dumps(line), flush=True)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    return max_err(a, ref) / max(float(ref.abs().max()), 1e-30)


def check_attention(device: torch.device) -> None:
    from arflow_scale.model.attention import full_attention, hybrid_attention

    g = torch.Generator().manual_seed(0)
    b, h, chunks, n, d = 2, 4, 6, 64, 64
    q, k, v = (torch.randn(b, h, chunks * n, d, generator=g, dtype=torch.float64) for _ in range(3))
    log_decay = -torch.rand(b, h, chunks * n, generator=g, dtype=torch.float64) * 0.1
    ref_h, ref_state = hybrid_attention(q, k, v, log_decay, n)
    ref_f, _ = full_attention(q, k, v, n)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        args = [t.to(device, dtype) for t in (q, k, v)]
        out_h, state = hybrid_attention(*args, log_decay.to(device, torch.float32), n)
        out_f, _ = full_attention(*args, n)
        err_h, err_f, err_s = rel_err(out_h, ref_h), rel_err(out_f, ref_f), rel_err(state, ref_state)
        report(f"attention/{str(dtype)[6:]}", max(err_h, err_f, err_s) < tol, hybrid_err=err_h, full_err=err_f,
               state_err=err_s, tol=tol)
    args = [t.to(device, torch.float32) for t in (q, k, v)]
    ld = log_decay.to(device, torch.float32)
    whole, _ = hybrid_attention(*args, ld, n)
    state, parts = None, []
    for c in range(chunks):
        piece = slice(c * n, (c + 1) * n)
        out, state = hybrid_attention(*(t[:, :, piece] for t in args), ld[:, :, piece], n, state)
        parts.append(out)
    err = rel_err(torch.cat(parts, dim=2), whole)
    report("attention/chunked_state", err < 1e-5, rel_err=err)


def check_attention_triton(device: torch.device) -> None:
    """The fused hybrid kernels (forward, all gradients) against `hybrid_attention` in fp64 on the CPU."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or (device.type != "cuda"
                                                       and os.environ.get("TRITON_INTERPRET") != "1"):
        report("attention_triton", True, skipped="needs triton on CUDA (or TRITON_INTERPRET=1 on CPU)")
        return
    from arflow_scale.model.attention import hybrid_attention
    from arflow_scale.model.attention_triton import FUSED_HYBRID

    cuda = device.type == "cuda"
    cases = [(torch.float32, 64, 256, 1e-4), (torch.bfloat16, 64, 256, 3e-2), (torch.bfloat16, 64, 196, 3e-2),
             (torch.float32, 128, 196, 1e-4), (torch.bfloat16, 32, 16, 3e-2)] if cuda else \
        [(torch.float32, 16, 20, 1e-4)]
    for (dtype, d, n, tol), backend in itertools.product(cases, FUSED_HYBRID):
        g = torch.Generator().manual_seed(d + n)
        b, h, chunks = 2, 4, 3
        qkv = torch.nn.functional.rms_norm(torch.randn(b, chunks * n, 3, h, d, generator=g, dtype=torch.float64), (d,))
        log_decay = torch.nn.functional.logsigmoid(torch.randn(b, h, chunks * n, generator=g, dtype=torch.float64)) / 16
        state = torch.randn(b, h, d, d, generator=g, dtype=torch.float64)
        grad_out = torch.randn(b, h, chunks * n, d, generator=g, dtype=torch.float64)
        results = []
        for fn, dev, dt in ((hybrid_attention, "cpu", torch.float64), (FUSED_HYBRID[backend], device, dtype)):
            wide = torch.float32 if dt != torch.float64 else dt
            packed, ld, s0 = (t.to(dev, kind).clone().requires_grad_(True)
                              for t, kind in ((qkv, dt), (log_decay, wide), (state, wide)))
            q, k, v = (t.transpose(1, 2) for t in packed.unbind(2))  # (B, H, L, D) views, the model's strides
            out, final = fn(q, k, v, ld, n, s0)
            (out * grad_out.to(dev, dt)).sum().backward()
            results.append([out, final, *packed.grad.unbind(2), ld.grad, s0.grad])
        errs = [rel_err(a.detach(), r.detach()) for a, r in zip(results[1], results[0])]
        names = ["out", "state", "dq", "dk", "dv", "dlog_decay", "dstate"]
        report(f"attention_{backend}/{str(dtype)[6:]}_d{d}_chunk{n}", max(errs) < tol, tol=tol,
               **{f"{name}_err": err for name, err in zip(names, errs)})


def check_model(device: torch.device, size: str) -> None:
    from arflow_scale.model import build_model

    torch.manual_seed(0)
    model = build_model(size, image_size=16, in_channels=4, num_classes=10, k=4)
    for p in model.parameters():  # non-zero outputs (the zero-initialised final layer hides errors)
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 16, 16, generator=g)
    t, y = torch.rand(2, 4, generator=g), torch.tensor([1, 7])
    with torch.no_grad():
        ref = model.double()(x.double(), t.double(), y)
        gpu = model.float().to(device)
        out = gpu(x.to(device), t.to(device), y.to(device))
        cache, steps = gpu.new_cache(), []
        for i in range(4):
            steps.append(gpu(x[:, i:i + 1].to(device), t[:, i:i + 1].to(device), y.to(device), cache=cache))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = gpu(x.to(device), t.to(device), y.to(device))
    scale = float(ref.abs().max())
    err, err_cache, err_bf16 = max_err(out, ref) / scale, max_err(torch.cat(steps, 1), out) / scale, \
        max_err(low.float(), ref) / scale
    report("model/fp32_vs_cpu_fp64", err < 1e-4, rel_err=err)
    report("model/cache_vs_full", err_cache < 1e-4, rel_err=err_cache)
    report("model/bf16_autocast", err_bf16 < 5e-2, rel_err=err_bf16)


def _engine(cfg, device):
    from arflow_scale.tasks import task_for
    from arflow_scale.train.deepspeed_config import resolve_precision
    from arflow_scale.train.engine import build_engine

    torch.manual_seed(0)
    precision = resolve_precision(cfg.train.precision, device.type)
    return build_engine(cfg, task_for(cfg.model).build_model(), 1, device.type, precision).engine


def _steps(engine, ema, batch, first: int, count: int) -> list[float]:
    from arflow_scale.flow import flow_matching_loss
    from arflow_scale.train.rng import step_generator

    x, y = batch
    losses = []
    for step in range(first, first + count):  # as the trainer steps: an fp32 batch, bf16 autocast for a bf16 engine
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=engine.bfloat16_enabled()):
            loss = flow_matching_loss(engine, x, y, step_generator(0, 0, step, 0), 0.1)
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
        losses.append(loss.item())
    return losses


def in_group(device: torch.device, check, *args) -> None:
    """Run a check that builds DeepSpeed engines in the one-rank process group, joined on first use and kept until
    `main` returns (DeepSpeed keeps its communicator for the process; a later entry reuses the group)."""
    GROUP.enter_context(single_rank_group(device))
    check(device, *args)


CONTINUED = 5  # deepspeed check: steps after its checkpoint, live and restored (their losses must agree)


def check_deepspeed(device: torch.device, size: str, precision: str, steps: int) -> None:
    """`steps` steps before the checkpoint; the run that goes on and the restored one then take CONTINUED more each."""
    from arflow_scale.bench.batches import InMemoryBatches
    from arflow_scale.checkpoint import CheckpointRecord, load_raw_weights
    from arflow_scale.config import config_from_dict
    from arflow_scale.train.ema import EMA
    from arflow_scale.train.engine import full_fp32_params, wrapper_masters
    from arflow_scale.train.state import restore_state, save_state

    for stage in (0, 2, 3):
        cfg = config_from_dict({
            "model": {"size": size, "image_size": 16, "in_channels": 4, "num_classes": 10, "k": 4,
                      "activation_checkpointing": "all"},
            "data": {"batch_size": 8}, "optim": {"lr": 1e-3, "warmup_steps": 0},
            "train": {"steps": steps + CONTINUED, "zero_stage": stage, "precision": precision, "ema_decay": 0.9},
            "cluster": {"use_gpu": device.type == "cuda"}})
        batches = InMemoryBatches(8, 4, (4, 16, 16), 10, seed=0)
        x, y = next(iter(batches))
        batch = (x.to(device), y.to(device))
        engine = _engine(cfg, device)
        ema = EMA(engine.module, cfg.train.ema_decay, masters=wrapper_masters(engine.optimizer))
        start = time.perf_counter()
        losses = _steps(engine, ema, batch, 0, steps)
        seconds = time.perf_counter() - start
        master = full_fp32_params(engine, bf16=precision == "bf16")
        ema_full = ema.full_state_dict()
        module = full_fp32_params(engine, bf16=False)  # the bf16 weights the forward sees
        rounding = max(max_err(module[n], master[n]) / max(float(master[n].abs().max()), 1e-12) for n in master)
        # A fresh EMA starts from what it averages: the fp32 masters themselves, at every stage.
        ema_source = EMA(engine.module, 0.0, masters=wrapper_masters(engine.optimizer)).full_state_dict()
        ema_source_err = max(max_err(ema_source[n], master[n]) for n in master)
        with tempfile.TemporaryDirectory() as folder:
            record = CheckpointRecord(step=steps, world_size=1, zero_stage=stage, ema_layout=ema.layout)
            save_state(folder, engine=engine, ema=ema, stream=batches, rank=0, record=record, config_yaml="")
            exported = load_raw_weights(folder)  # what `arflow export` reads: the fp32 masters
            export_err = max(max_err(exported[n], master[n]) for n in master)
            went_on = _steps(engine, ema, batch, steps, CONTINUED)
            engine2 = _engine(cfg, device)
            ema2 = EMA(engine2.module, cfg.train.ema_decay, masters=wrapper_masters(engine2.optimizer))
            follower = EMA(engine2.module, 0.0, masters=wrapper_masters(engine2.optimizer))  # made before the restore
            restore_state(folder, engine=engine2, ema=ema2, stream=InMemoryBatches(8, 4, (4, 16, 16), 10, 0), rank=0)
            resumed = _steps(engine2, ema2, batch, steps, CONTINUED)
            follower.update(engine2.module)  # decay 0: what the EMA averages, still the live masters?
            master2, followed = full_fp32_params(engine2, bf16=precision == "bf16"), follower.full_state_dict()
            ema_source_err = max(ema_source_err, max(max_err(followed[n], master2[n]) for n in master2))
        diff = max(abs(a - b) for a, b in zip(went_on, resumed))
        # bf16: the module's weights are the fp32 masters rounded (0 < error <= 2^-8 relative); fp32: the same.
        masters_ok = 0 < rounding <= 2.0 ** -8 if precision == "bf16" else rounding == 0
        masters_ok = masters_ok and ema_source_err == 0
        ok = (losses[-1] < losses[0] and all(map(math.isfinite, losses)) and diff < 1e-2 and masters_ok
              and export_err == 0)
        report(f"deepspeed/zero{stage}_{precision}", ok, first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
               steps_per_s=round(steps / seconds, 1), bf16_weights_vs_master_rel=rounding, resume_loss_diff=diff,
               export_vs_master=export_err, ema_source_vs_master=ema_source_err,
               ema_dtype=str(next(iter(ema_full.values())).dtype))
        del engine, engine2
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_farmer(device: torch.device, precision: str) -> None:
    from arflow_scale.config import config_from_dict
    from arflow_scale.model.farmer import FARMER
    from arflow_scale.model.farmer_distill import FarmerOneStep
    from arflow_scale.tasks import task_for
    from arflow_scale.train.rng import step_generator

    model_keys = {"family": "farmer", "size": "tiny/2", "image_size": 16, "in_channels": 3, "num_classes": 10, "k": 1}
    task = task_for(config_from_dict({"model": model_keys}).model)
    torch.manual_seed(0)
    model = FARMER(task.args)
    for p in model.parameters():  # non-zero flow heads: the zero-initialised blocks would hide errors
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.tensor([0, 3, 5, 10])  # 10: the null class
    with torch.no_grad():
        ref = model.double().log_density(x.double(), y)
        gpu = model.float().to(device)
        out = gpu.log_density(x.to(device), y.to(device))
        z, _ = gpu.flow(x.to(device))
        back = gpu.flow.inverse(z)
        labels = y[:3].to(device)
        images = gpu.sample(labels, cfg_scale=2.0, temperature=0.9, generator=torch.Generator().manual_seed(2))
        fast = FarmerOneStep(gpu, task.args).to(device).sample(labels, generator=torch.Generator().manual_seed(2))
    loss32 = gpu.loss(x.to(device), y.to(device), torch.Generator().manual_seed(3))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss16 = gpu.loss(x.to(device), y.to(device), torch.Generator().manual_seed(3))
    report("farmer/log_density_fp32_vs_cpu_fp64", rel_err(out, ref) < 1e-4, rel_err=rel_err(out, ref))
    report("farmer/inverse_of_forward", max_err(back, x) < 1e-4, max_err=max_err(back, x))
    report("farmer/bf16_autocast_loss", abs(float(loss16 - loss32)) < 5e-2 * abs(float(loss32)),
           fp32=float(loss32), bf16=float(loss16))
    in_range = all(bool(torch.isfinite(t).all()) and float(t.abs().max()) <= 1 for t in (images, fast))
    report("farmer/guided_and_one_step_samples", in_range and images.shape == fast.shape == (3, 3, 16, 16))
    # As the trainer: fp32 images under bf16 autocast. CPU autocast leaves layer_norm to its kernel, which
    # refuses the fp32 activations with bf16 weights, so the CPU variant trains FARMER in fp32.
    precision = precision if device.type == "cuda" else "fp32"
    for stage in (0, 2, 3):
        cfg = config_from_dict({"model": model_keys, "data": {"batch_size": 8},
                                "optim": {"lr": 2e-3, "warmup_steps": 0, "clip": "norm", "clip_value": 1.0},
                                "train": {"steps": 30, "zero_stage": stage, "precision": precision},
                                "cluster": {"use_gpu": device.type == "cuda"}})
        engine = _engine(cfg, device)
        batch = (torch.rand(8, 1, 3, 16, 16, generator=g) * 2 - 1).to(device), (torch.arange(8) % 10).to(device)
        losses = []
        for step in range(15):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = task.loss(engine, *batch, step_generator(0, 0, step, 0))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        ok = losses[-1] < losses[0] and all(map(math.isfinite, losses))
        report(f"farmer/deepspeed_zero{stage}_{precision}", ok, first_bits_per_dim=round(losses[0], 4),
               last_bits_per_dim=round(losses[-1], 4))
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="S/2", help="model size for the model and deepspeed checks")
    parser.add_argument("--only", default="attention,attention_triton,model,deepspeed,farmer")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="deepspeed check: auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=20,
                        help="deepspeed check: steps before its checkpoint (the loss must fall over them)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: needs at least one step, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu for the CPU variant)", file=sys.stderr)
        return 2
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__}), flush=True)
    checks = {"attention": lambda: check_attention(device), "attention_triton": lambda: check_attention_triton(device),
              "model": lambda: check_model(device, args.size),
              "deepspeed": lambda: in_group(device, check_deepspeed, args.size, precision, args.steps),
              "farmer": lambda: in_group(device, check_farmer, precision)}
    with GROUP:
        for name in args.only.split(","):
            try:
                checks[name]()
            except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
                report(name, False, error=f"{type(err).__name__}: {err}")
    return 0 if all(r["ok"] for r in RESULTS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
