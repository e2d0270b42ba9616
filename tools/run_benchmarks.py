#!/usr/bin/env python
"""Run every `arflow bench` benchmark in turn and collect their JSON result lines into one file.

    python tools/run_benchmarks.py --out bench.jsonl [--only attention,data]

Each benchmark prints its own side-by-side table and ratios; this keeps the last JSON line of each.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arflow_scale.cli.bench import BENCHMARKS  # noqa: E402  (the CLI's list: one source of truth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench.jsonl")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    failed = []
    with open(args.out, "w") as out:
        for name in names:
            print(f"== arflow bench {name}", flush=True)
            proc = subprocess.run([sys.executable, "-m", "arflow_scale.cli", "bench", name],
                                  stdout=subprocess.PIPE, text=True)
            sys.stdout.write(proc.stdout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode != 0 or not lines:
                failed.append(name)
                continue
            out.write(json.dumps({"benchmark": name, **json.loads(lines[-1])}) + "\n")
    print(f"results: {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
