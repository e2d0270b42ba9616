"""`arflow bench kernels`: the fused attention kernels compiled for a CUDA architecture, on any machine.

Triton compiles ahead of time with the ptxas it bundles, so no GPU is needed. Every launch of one
forward + backward is specialised as Triton's JIT specialises its arguments: integers equal to 1
become constants; multiples of 16 and 16-byte-aligned pointers get divisibility hints, which decide
the vectorised and asynchronous (pipelined) loads. `cuobjdump -res-usage`, also bundled, then reads
each cubin's registers and stack frame (spilled registers). Prints one JSON line per kernel, then a
summary line: registers, spilled bytes, shared memory, loads pipelined into shared memory, and how
many programs fit on one SM. A slowdown a GPU timing would show often starts as one of these.
Imports nothing beyond torch and triton.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import tempfile
from pathlib import Path

# per-SM limits by compute capability: registers, shared memory bytes, threads (CUDA programming guide)
SM_LIMITS = {80: (65536, 167936, 2048), 86: (65536, 102400, 1536), 89: (65536, 102400, 1536),
             90: (65536, 233472, 2048), 100: (65536, 233472, 2048)}
SHARED_RESERVED_PER_BLOCK = 1024  # bytes the driver keeps per resident program (sm_80 and later)
LAYOUTS = ("model", "contiguous")
SOFTMAX = ("fused", "sdpa")


def add_arguments(parser) -> None:
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability to compile for (90: H100/H200)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--k", type=int, default=5, help="images (chunks) per sequence")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per image (the chunk size)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--layout", default="model", choices=LAYOUTS,
                        help="model: q, k, v are views of one (B, L, 3, H, D) projection; contiguous: (B, H, L, D)")
    parser.add_argument("--with-state", action="store_true", help="an incoming state, as sampling passes")
    parser.add_argument("--softmax", default="fused", choices=SOFTMAX,
                        help="fused: the kernels of model.attention_backend=triton; sdpa: those of triton_sdpa "
                             "(the softmax inside each image left to SDPA, which is not compiled here)")
    parser.add_argument("--triton-blocks", default="", help="tile sizes, e.g. 'fwd_m=64,bwd_warps=8' (HybridBlocks)")
    parser.add_argument("--tf32", choices=("on", "off"), default="on",
                        help="fp32 dots (the inter-image read and the state gradients) on TF32 tensor cores, as "
                             "training sets them (train.tf32); off: 3xTF32, what train.tf32=false gives the kernels")


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """One compiled launch: its grid and tiles, and what the cubin needs of an SM."""
    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    tiles: dict[str, int]
    registers: int  # per thread
    spilled_bytes: int  # the stack frame per thread: registers spilled to local memory
    shared_bytes: int
    async_loads: int  # loads Triton pipelined into shared memory (cp.async or TMA)
    programs_per_sm: int

    def record(self) -> dict:
        return {"benchmark": "kernels", **dataclasses.asdict(self)}


def programs_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Programs of this kernel one SM holds at once: the least of its register, shared-memory and thread limits.

    Registers are allocated per warp in units of 256."""
    sm_registers, sm_shared, sm_threads = SM_LIMITS[arch]
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = sm_registers // (per_warp * num_warps)
    by_shared = sm_shared // (shared_bytes + SHARED_RESERVED_PER_BLOCK)
    return min(by_registers, by_shared, sm_threads // (32 * num_warps))


def attention_launches(batch: int, heads: int, k: int, tokens: int, head_dim: int, dtype, layout: str = "model",
                       with_state: bool = False, blocks=None, softmax: str = "fused") -> list:
    """Every `Launch` of one fused forward + backward at these shapes, with CPU buffers (nothing runs);
    softmax "sdpa": the launches of `hybrid_attention_sdpa_triton` (the softmax part given, as SDPA leaves it)."""
    import torch

    from arflow_scale.model.attention_triton import HybridBlocks, backward_launches, forward_launches

    length = k * tokens
    if layout == "model":
        qkv = torch.empty(batch, length, 3, heads, head_dim, dtype=dtype)
        q, key, value = (t.transpose(1, 2) for t in qkv.unbind(2))
    else:
        q, key, value = (torch.empty(batch, heads, length, head_dim, dtype=dtype) for _ in range(3))
    log_decay = torch.empty(batch, heads, length)
    state = torch.empty(batch, heads, head_dim, head_dim) if with_state else None
    blocks = (blocks or HybridBlocks.for_head_dim(head_dim)).fitted(tokens)
    intra = torch.empty(batch, heads, length, head_dim, dtype=dtype) if softmax == "sdpa" else None
    forward, out, _, saved = forward_launches(q, key, value, log_decay, tokens, state, blocks, intra)
    d_out = torch.empty_like(out)
    backward, _ = backward_launches(q, key, value, out if intra is None else None, d_out, None, saved, tokens,
                                    blocks, with_state, with_state)
    return forward + backward


def _specialised(launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton's ASTSource, as the JIT specialises these arguments on a GPU."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    names = launch.kernel.arg_names
    for index, (name, value) in enumerate(zip(names, launch.args)):
        # (value, is_const, specialize, align) -> (type, hint): "D" = divisible by 16 / 16-byte aligned
        kind, hint = ("constexpr", None) if value is None else native_specialize_impl(BaseBackend, value, False,
                                                                                        True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = hint
        elif hint == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    for name, value in launch.meta.items():
        if name in names:
            signature[name] = "constexpr"
            constexprs[name] = False if name == "INTERPRET" else value  # compiled for the GPU, not the interpreter
    return signature, constexprs, attrs


def _cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise RuntimeError(f"arflow bench kernels: {path} is missing; this triton build does not bundle the CUDA "
                           f"binary tools it needs")
    return path


def compile_launch(launch, arch: int = 90) -> KernelResources:
    """Compile one launch for compute capability `arch` and read the cubin's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialised(launch)
    options = {name: launch.meta[name] for name in ("num_warps", "num_stages", "maxnreg") if name in launch.meta}
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(_cuobjdump()), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    ttgir = compiled.asm["ttgir"]
    num_warps = compiled.metadata.num_warps
    return KernelResources(
        kernel=launch.kernel.__name__, grid=tuple(launch.grid), num_warps=num_warps,
        num_stages=compiled.metadata.num_stages,
        tiles={name: value for name, value in constexprs.items() if name.startswith("BLOCK")},
        registers=registers, spilled_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)),
        shared_bytes=compiled.metadata.shared,
        async_loads=ttgir.count("ttg.async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local"),
        programs_per_sm=programs_per_sm(arch, registers, num_warps, compiled.metadata.shared))


def _check_shape(args) -> None:
    """Shapes the fused kernels take; a ValueError names the flag."""
    from arflow_scale.model.attention import FUSED_HEAD_DIMS

    if args.head_dim not in FUSED_HEAD_DIMS:
        raise ValueError(f"--head-dim {args.head_dim} is not one of {', '.join(map(str, FUSED_HEAD_DIMS))}")
    for flag in ("batch", "heads", "k", "tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)} must be at least 1")


def run(args) -> int:
    import torch
    import triton

    from arflow_scale.model.attention_triton import HybridBlocks, interpreting

    _check_shape(args)
    if interpreting():
        raise ValueError("arflow bench kernels: TRITON_INTERPRET=1 turns the kernels into interpreter functions, "
                         "which cannot be compiled; run it without TRITON_INTERPRET")
    blocks = HybridBlocks.parse(args.triton_blocks) if args.triton_blocks else None
    torch.set_float32_matmul_precision("high" if args.tf32 == "on" else "highest")  # the kernels' PRECISION
    launches = attention_launches(args.batch, args.heads, args.k, args.tokens, args.head_dim,
                                  getattr(torch, args.dtype), args.layout, args.with_state, blocks, args.softmax)
    results = [compile_launch(launch, args.arch) for launch in launches]
    for result in results:
        print(json.dumps(result.record()), flush=True)
    print(json.dumps({"benchmark": "kernels", "arch": args.arch, "triton": triton.__version__,
                      "shape": {"batch": args.batch, "heads": args.heads, "k": args.k, "tokens": args.tokens,
                                "head_dim": args.head_dim, "dtype": args.dtype, "layout": args.layout,
                                "tf32": args.tf32, "softmax": args.softmax},
                      "spilling": [r.kernel for r in results if r.spilled_bytes],
                      "kernels": [r.kernel for r in results]}))
    return 0
