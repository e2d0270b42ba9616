"""`arflow bench attention`: hybrid vs full (block-causal softmax) attention, forward + backward.

For each K (images per sequence) both modes run at equal shapes (B, H, K*N, D) in one process;
prints time, peak memory and full/hybrid ratios per K, then one JSON line. Peak memory: on CUDA
torch.cuda.max_memory_allocated; on CPU the peak of live tensor storage, tracked by a dispatch mode.
Times are the best of --repeats alternating runs; on CPU one thread by default, which keeps the
numbers stable on a shared machine (both modes always run under the same settings).
"""
from __future__ import annotations

import json
import time
import weakref


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


def _step(mode, inputs, grad_out, chunk_size):
    """One forward + backward of `mode` attention; gradients land on the inputs."""
    from arflow_scale.model.attention import chunk_attention

    q, k, v, log_decay = inputs
    out, _ = chunk_attention(mode, q, k, v, log_decay if mode == "hybrid" else None, chunk_size)
    out.backward(grad_out)
    for t in inputs:
        t.grad = None


def _timed_step(mode, inputs, grad_out, chunk_size, cuda):
    """Seconds of one fwd+bwd (synchronised on CUDA)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    _step(mode, inputs, grad_out, chunk_size)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_bytes(mode, inputs, grad_out, chunk_size, device):
    """Peak bytes allocated by one fwd+bwd on top of the inputs."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _step(mode, inputs, grad_out, chunk_size)
        return torch.cuda.max_memory_allocated(device) - base
    with _peak_tracker() as tracker:
        _step(mode, inputs, grad_out, chunk_size)
    return tracker.peak


def _measure(k, args, device, dtype):
    """{mode: (best seconds, peak bytes)} for hybrid and full at the same shapes.

    Repetitions alternate between the two modes so both see the same machine load; the best of
    the repetitions (as timeit does) is the least disturbed by other processes.
    """
    inputs, grad_out = _make_inputs(args.batch, args.heads, k * args.tokens, args.head_dim, device, dtype)
    modes, cuda = ("hybrid", "full"), device.type == "cuda"
    for _ in range(args.warmup):
        for mode in modes:
            _step(mode, inputs, grad_out, args.tokens)
    times = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(_timed_step(mode, inputs, grad_out, args.tokens, cuda))
    return {mode: (min(times[mode]), _peak_bytes(mode, inputs, grad_out, args.tokens, device))
            for mode in modes}


def run(args) -> int:
    import torch

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high" if args.tf32 == "on" else "highest")
    if not cuda and args.threads > 0:
        torch.set_num_threads(args.threads)
    dtypes = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
              "bfloat16": torch.bfloat16}
    if args.dtype not in dtypes:
        raise ValueError(f"--dtype {args.dtype!r} is not one of {', '.join(dtypes)}")
    dtype = dtypes[args.dtype]
    args.batch = args.batch or (8 if cuda else 1)
    args.heads = args.heads or (16 if cuda else 4)
    args.tokens = args.tokens or 256
    try:
        ks = [int(part) for part in str(args.k).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--k {args.k!r} is not a comma-separated list of integers") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k {args.k!r}: need at least one K >= 1")
    print(f"device={device} dtype={str(dtype).replace('torch.', '')} batch={args.batch} heads={args.heads} "
          f"head_dim={args.head_dim} tokens/image={args.tokens} threads={torch.get_num_threads()} "
          f"{'tf32=' + args.tf32 + ' ' if cuda else ''}"
          f"fwd+bwd best of {args.repeats}")
    print(f"{'K':>4} {'hybrid ms':>10} {'full ms':>10} {'time x':>7} {'hybrid MiB':>11} {'full MiB':>10} {'mem x':>7}")
    rows = []
    for k in ks:
        measured = _measure(k, args, device, dtype)
        (hybrid_s, hybrid_bytes), (full_s, full_bytes) = measured["hybrid"], measured["full"]
        row = {"k": k, "sequence_length": k * args.tokens,
               "hybrid_ms": round(hybrid_s * 1e3, 3), "full_ms": round(full_s * 1e3, 3),
               "time_ratio": round(full_s / hybrid_s, 3),
               "hybrid_peak_mib": round(hybrid_bytes / 2**20, 3), "full_peak_mib": round(full_bytes / 2**20, 3),
               "memory_ratio": round(full_bytes / max(hybrid_bytes, 1), 3)}
        rows.append(row)
        print(f"{k:>4} {row['hybrid_ms']:>10.2f} {row['full_ms']:>10.2f} {row['time_ratio']:>7.2f} "
              f"{row['hybrid_peak_mib']:>11.2f} {row['full_peak_mib']:>10.2f} {row['memory_ratio']:>7.2f}", flush=True)
    print(json.dumps({"benchmark": "attention", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                      "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                      "tokens_per_image": args.tokens, "results": rows}))
    return 0
