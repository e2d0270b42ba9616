"""Where a command's CPU goes: run it, sample every process on the machine, and sum CPU seconds by process kind.

Meant for the test suite's time (docs/architecture.md, "The suite's time"): which processes (Ray Train ranks,
controllers, compilers, the pytest workers) spend the cores. Every `--interval` seconds it reads each process's own user + system time
(/proc/PID/stat, children excluded, so nothing counts twice; read directly rather than through psutil, which took
4.0 ms a sample of 64 processes here against 2.3, and the sampling's own CPU is counted); processes already running
at the start count only what they spend after it. A process's last interval before it exits is missed, and one
that lives less than an interval may be missed whole: the totals are a floor. Run it on an otherwise idle machine
(it counts every process).

    python tools/cpu_by_process.py -- python -m pytest -q -n 2 --dist loadfile
    python tools/cpu_by_process.py --json -- arflow demo        # one JSON line instead of the table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
IDLE_RAY_WORKER = "ray::IDLE"


@dataclass
class ProcessSample:
    """One process (pid and start time: pids are reused) as last seen: its CPU seconds since the start, its kind."""

    cpu_seconds: float
    kind: str


def process_kind(argv: list[str], comm: str) -> str:
    """A short name shared by processes doing the same job: `ray::RayTrainWorker` for Ray workers (a task's or
    actor's method name dropped), `python -m pytest`, `python tools/x.py` or `python -c` for Python, else the
    executable's name; the kernel's name (`[comm]`) for a process without a command line. A title a process set
    for itself (setproctitle, as Ray's processes do) is one string: its words are the argv."""
    if len(argv) == 1:
        argv = argv[0].split()
    if not argv:
        return f"[{comm}]"
    if argv[0].startswith("ray::"):
        return argv[0].split(".")[0]
    program = Path(argv[0]).name
    if program.startswith("python"):
        rest = [arg for arg in argv[1:] if arg not in ("-u", "-B", "-E", "-s", "-I")]
        if rest[:1] == ["-m"] and len(rest) > 1:
            return f"python -m {rest[1]}"
        if rest and rest[0] == "-c":
            return "python -c"
        return f"python {Path(rest[0]).name}" if rest else "python"
    return program


def read_processes() -> dict[tuple[int, int], tuple[float, list[str], str]]:
    """{(pid, start time): (CPU seconds, argv, comm)} for every process readable now."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        cpu = (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND  # utime + stime
        argv = [arg for arg in cmdline.split("\0") if arg]
        found[(int(entry.name), int(fields[19]))] = (cpu, argv, stat[stat.index("(") + 1:stat.rindex(")")])
    return found


def measure(command: list[str], interval: float) -> tuple[int, float, dict[str, tuple[float, int]]]:
    """Run `command` to its end -> (exit code, wall seconds, {kind: (CPU seconds, processes)})."""
    baseline = {key: cpu for key, (cpu, _, _) in read_processes().items()}
    seen: dict[tuple[int, int], ProcessSample] = {}

    def sample() -> None:
        for key, (cpu, argv, comm) in read_processes().items():
            kind = process_kind(argv, comm)
            if key in seen and (not argv or (kind == IDLE_RAY_WORKER and seen[key].kind.startswith("ray::"))):
                kind = seen[key].kind  # exiting (no command line), or a Ray worker between tasks: its last job
            seen[key] = ProcessSample(cpu - baseline.get(key, 0.0), kind)

    started = time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        sample()
        time.sleep(interval)
    sample()
    wall = time.monotonic() - started
    by_kind: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for process in seen.values():
        if process.cpu_seconds > 0:
            by_kind[process.kind][0] += process.cpu_seconds
            by_kind[process.kind][1] += 1
    return child.returncode, wall, {kind: (cpu, count) for kind, (cpu, count) in by_kind.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples (default 0.1)")
    parser.add_argument("--top", type=int, default=25, help="kinds in the table (default 25)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    code, wall, by_kind = measure(command, args.interval)
    ranked = sorted(by_kind.items(), key=lambda item: -item[1][0])
    total = sum(cpu for cpu, _ in by_kind.values())
    if args.json:
        print(json.dumps({"exit_code": code, "wall_s": round(wall, 2), "cpu_s": round(total, 2),
                          "by_kind": {kind: {"cpu_s": round(cpu, 2), "processes": n} for kind, (cpu, n) in ranked}}))
    else:
        print(f"wall {wall:.1f} s, CPU {total:.1f} s over {os.cpu_count()} cores; exit code {code}", file=sys.stderr)
        for kind, (cpu, count) in ranked[:args.top]:
            print(f"{cpu:9.1f} s {cpu / max(total, 1e-9):6.1%} {count:5d}  {kind}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
