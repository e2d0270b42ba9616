"""`arflow bench attention`: the attention variants side by side, forward + backward, per K.

Variants at equal shapes (B, H, K*N, D), measured in one process: intra (softmax inside each image
only: the floor, one SDPA call), full (dense block-causal softmax with a boolean mask), full_flex
(the same on compiled flex_attention; CUDA only), hybrid (the plain-PyTorch reference), hybrid_triton
(the fused kernels) and hybrid_triton_sdpa (SDPA for the softmax inside each image, the Triton kernels
for the rest); the last two on CUDA, or in the Triton interpreter when TRITON_INTERPRET=1.
Prints one JSON line per (variant, K), one line of ratios per K (hybrid/floor, hybrid/flex, ...),
then one summary JSON line (the last line). Peak memory: on CUDA torch.cuda.max_memory_allocated;
on CPU the peak of live tensor storage, tracked by a dispatch mode. Times (`ms`) are the best of
--repeats synchronised runs alternating between variants; on CPU one thread by default, which keeps
the numbers stable on a shared machine. On CUDA `device_ms` is the GPU's busy time per fwd+bwd (its
kernels' durations summed by torch.profiler over --repeats runs): at these sizes the wall time of the
floor is mostly launch overhead, which a training step hides behind the other layers' kernels.
Imports nothing beyond torch (and triton): tools run it on bare GPU machines.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
import weakref
from typing import Optional

VARIANTS = ("intra", "full", "full_flex", "hybrid", "hybrid_triton", "hybrid_triton_sdpa")
FUSED = {"hybrid_triton": "triton", "hybrid_triton_sdpa": "triton_sdpa"}  # variant -> attention backend
FLOOR = "intra"
# numerator / denominator pairs reported per K, where both were measured
RATIOS = (("hybrid", "intra"), ("hybrid_triton", "intra"), ("hybrid_triton_sdpa", "intra"), ("hybrid", "full_flex"),
          ("hybrid_triton", "full_flex"), ("hybrid_triton_sdpa", "full_flex"), ("hybrid_triton", "hybrid"),
          ("hybrid_triton_sdpa", "hybrid_triton"), ("full", "hybrid"))
SMOKE = dict(k="1,2", batch=1, heads=2, head_dim=16, tokens=16, repeats=1, warmup=1)


def add_arguments(parser) -> None:
    parser.add_argument("--k", default="1,2,5,10,20", help="comma-separated images per sequence")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch", type=int, default=None, help="sequences (default: 1 CPU, 8 CUDA)")
    parser.add_argument("--heads", type=int, default=None, help="heads (default: 4 CPU, 16 CUDA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per image (default 256: 32x32 latents, patch 2)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (best of)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tf32", choices=("on", "off"), default="on",
                        help="CUDA: fp32 matmuls on TF32 tensor cores, as training does (train.tf32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: stable on shared machines; 0 = torch default)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)} (unavailable ones are skipped)")
    parser.add_argument("--triton-blocks", default="",
                        help="tile sizes of the fused kernels, e.g. 'fwd_m=64,bwd=32,bwd_warps=8' (HybridBlocks)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, K=1,2, one repetition: checks that every variant runs (CPU-friendly)")


def _peak_tracker():
    """A TorchDispatchMode counting bytes of live tensor storages and their peak (CPU-safe)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class PeakStorageBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, int] = {}
            self.current = 0
            self.peak = 0

        def _freed(self, key: int) -> None:
            self.current -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    key = id(storage)
                    if key not in self.live:
                        self.live[key] = storage.nbytes()
                        self.current += self.live[key]
                        weakref.finalize(storage, self._freed, key)
                        self.peak = max(self.peak, self.current)
            return out

    return PeakStorageBytes()


def _unavailable(args, device) -> dict[str, str]:
    """{variant: why it cannot run here} for the variants this machine or these shapes rule out."""
    reasons = {}
    if device.type != "cuda":
        reasons["full_flex"] = "needs CUDA (flex_attention has no backward on CPU)"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if importlib.util.find_spec("triton") is None:
        why = "triton is not installed"
    elif device.type != "cuda" and not interpreted:
        why = "needs CUDA (or TRITON_INTERPRET=1 for the interpreter)"
    elif args.head_dim not in (16, 32, 64, 128):
        why = f"head_dim {args.head_dim} is not one of 16, 32, 64, 128"
    else:
        return reasons
    return {**reasons, **{name: why for name in FUSED}}


def _attention(name: str, blocks_text: str):
    """The variant as fn(q, k, v, log_decay, chunk) -> out (B, H, L, D)."""
    from arflow_scale.model.attention import chunk_attention

    if name in FUSED:
        from arflow_scale.model.attention_triton import FUSED_HYBRID, HybridBlocks

        blocks = HybridBlocks.parse(blocks_text) if blocks_text else None
        fused = FUSED_HYBRID[FUSED[name]]
        return lambda q, k, v, g, chunk: fused(q, k, v, g, chunk, blocks=blocks)[0]
    mode, backend = {"intra": ("intra", "torch"), "full": ("full", "torch"), "full_flex": ("full", "triton"),
                     "hybrid": ("hybrid", "torch")}[name]
    return lambda q, k, v, g, chunk: chunk_attention(mode, q, k, v, g if mode == "hybrid" else None, chunk,
                                                     backend=backend)[0]


def _make_inputs(batch, heads, length, head_dim, device, dtype, seed=0):
    """RMS-normalised q, k, v (B, H, L, D), log_decay (B, H, L) <= 0, upstream grad; all leaves."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, length, head_dim)
    q, k, v, grad = (F.rms_norm(torch.randn(shape, generator=g), (head_dim,)) for _ in range(4))
    log_decay = F.logsigmoid(torch.randn(shape[:3], generator=g)) / 16
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v, log_decay)]
    return leaves, grad.to(device=device, dtype=dtype)


def _step(fn, inputs, grad_out, chunk_size):
    """One forward + backward; gradients land on the inputs and are dropped."""
    fn(*inputs, chunk_size).backward(grad_out)
    for t in inputs:
        t.grad = None


def _timed_step(fn, inputs, grad_out, chunk_size, cuda):
    """Seconds of one fwd+bwd (synchronised on CUDA)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    _step(fn, inputs, grad_out, chunk_size)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_bytes(fn, inputs, grad_out, chunk_size, device):
    """Peak bytes allocated by one fwd+bwd on top of the inputs."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _step(fn, inputs, grad_out, chunk_size)
        return torch.cuda.max_memory_allocated(device) - base
    with _peak_tracker() as tracker:
        _step(fn, inputs, grad_out, chunk_size)
    return tracker.peak


def _device_seconds(fn, inputs, grad_out, chunk_size, repeats):
    """GPU busy seconds per fwd+bwd: the summed durations of the CUDA kernels and copies that
    torch.profiler records over `repeats` steps (one stream, so they do not overlap)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            _step(fn, inputs, grad_out, chunk_size)
        torch.cuda.synchronize()
    busy_us = sum(event.device_time_total for event in prof.events() if event.device_type == DeviceType.CUDA)
    return busy_us * 1e-6 / repeats


@dataclasses.dataclass(frozen=True)
class Measured:
    """One variant at one K: best wall seconds of a fwd+bwd, peak bytes on top of the inputs, and
    GPU busy seconds (None off CUDA)."""
    seconds: float
    peak_bytes: int
    device_seconds: Optional[float] = None


def _measure(k, args, device, dtype, fns):
    """{variant: Measured} at the same shapes, repetitions alternating between variants.

    Alternating lets every variant see the same machine load; the best repetition (as timeit
    reports) is the least disturbed by other processes.
    """
    inputs, grad_out = _make_inputs(args.batch, args.heads, k * args.tokens, args.head_dim, device, dtype)
    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        for fn in fns.values():
            _step(fn, inputs, grad_out, args.tokens)
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(_timed_step(fn, inputs, grad_out, args.tokens, cuda))
    return {name: Measured(min(times[name]), _peak_bytes(fn, inputs, grad_out, args.tokens, device),
                           _device_seconds(fn, inputs, grad_out, args.tokens, args.repeats) if cuda else None)
            for name, fn in fns.items()}


def _ratios(measured: dict) -> dict[str, dict]:
    """{"time_ratios", "memory_ratios", "device_time_ratios" (CUDA)}: RATIOS whose two variants were measured."""
    ratios = {"time_ratios": {}, "memory_ratios": {}, "device_time_ratios": {}}
    for top, bottom in RATIOS:
        if top in measured and bottom in measured:
            a, b = measured[top], measured[bottom]
            name = f"{top}/{bottom}"
            ratios["time_ratios"][name] = round(a.seconds / b.seconds, 3)
            ratios["memory_ratios"][name] = round(a.peak_bytes / max(b.peak_bytes, 1), 3)
            if a.device_seconds and b.device_seconds:
                ratios["device_time_ratios"][name] = round(a.device_seconds / b.device_seconds, 3)
    if not ratios["device_time_ratios"]:
        del ratios["device_time_ratios"]
    return ratios


def _settings(args):
    """Resolve device, dtype and the CPU/CUDA shape defaults (in place on args) -> device, dtype."""
    import torch

    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high" if args.tf32 == "on" else "highest")
    if not cuda and args.threads > 0:
        torch.set_num_threads(args.threads)
    dtypes = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
              "bfloat16": torch.bfloat16}
    if args.dtype not in dtypes:
        raise ValueError(f"--dtype {args.dtype!r} is not one of {', '.join(dtypes)}")
    args.batch = args.batch or (8 if cuda else 1)
    args.heads = args.heads or (16 if cuda else 4)
    args.tokens = args.tokens or 256
    return device, dtypes[args.dtype]


def _parse_list(text: str, flag: str, known=None) -> list:
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if known is not None:
        unknown = [p for p in parts if p not in known]
        if unknown or not parts:
            raise ValueError(f"{flag} {text!r}: {', '.join(unknown) or 'empty'}; known: {', '.join(known)}")
        return parts
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: need at least one K >= 1")
    return values


def run(args) -> int:
    import torch

    device, dtype = _settings(args)
    ks = _parse_list(args.k, "--k")
    wanted = _parse_list(args.variants, "--variants", VARIANTS)
    skipped = {name: why for name, why in _unavailable(args, device).items() if name in wanted}
    fns = {name: _attention(name, args.triton_blocks) for name in wanted if name not in skipped}
    header = {"benchmark": "attention", "device": str(device), "device_name": _device_name(device),
              "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "tokens_per_image": args.tokens, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "tf32": args.tf32 if device.type == "cuda" else None}
    print(f"# {json.dumps(header)}; skipped: {json.dumps(skipped)}", flush=True)
    rows = []
    for k in ks:
        measured = _measure(k, args, device, dtype, fns)
        where = {"k": k, "sequence_length": k * args.tokens}
        row = dict(where)
        for name, result in measured.items():
            record = {"ms": round(result.seconds * 1e3, 3), "peak_mib": round(result.peak_bytes / 2**20, 3)}
            if result.device_seconds is not None:
                record["device_ms"] = round(result.device_seconds * 1e3, 3)
            print(json.dumps({"benchmark": "attention", "variant": name, **where, **record}), flush=True)
            row.update({f"{name}_{field}": value for field, value in record.items()})
        ratios = _ratios(measured)
        print(json.dumps({"benchmark": "attention", "k": k, **ratios}), flush=True)
        rows.append({**row, **ratios})
    print(json.dumps({**header, "variants": list(fns), "skipped": skipped, "results": rows}))
    return 0


def _device_name(device) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
