#!/usr/bin/env python
"""One short GPU session, unattended: the README's "GPU speed" checks and benchmarks in order of importance, each in
its own process under its own timeout, within one time budget, every output kept.

    python3 tools/gpu_session.py --out "$OUT"                # on the device machine, from the repository root
    python3 tools/gpu_session.py --dry-run                   # the plan and what a budget leaves out
    python3 tools/gpu_session.py --device cpu --smoke        # every step tiny on CPU

A step starts only if its timeout still fits in what is left of `--budget-s`, so a slow step cannot eat the
session; a step that overruns is killed and the next one starts. DeepSpeed is installed from the working tree's
`.whl/` folder first when the machine lacks it (README "GPU speed"; name `.whl` in the device call's carry).
Three files, as few as the device machine sends back: `<out>/results.jsonl` every step's JSON lines, each with the
step's name under "step", `<out>/logs.txt` the steps' other output, `<out>/session.json` what ran, for how long
and how it ended; each is written as the steps go. The profiler's Chrome traces stay on the machine (too large to
send back); the profile step's JSON lines carry its summary. Exit code 1 when any step that ran failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
XL = ["--size", "XL/2", "--image-size", "32", "--in-channels", "4", "--k", "5", "--batch-size", "16"]
TRAIN = ["--only", "peak,train", "--variants", "plain_compiled,zero2_compiled", *XL]


@dataclass(frozen=True)
class Step:
    """One tool run: its name (its lines' "step" in results.jsonl), the tool and its arguments, at most `timeout_s`."""

    name: str
    tool: str
    args: tuple[str, ...]
    timeout_s: float


# In order of importance: correctness of the fused kernels on the card, the attention against its floor, the
# training step's MFU beside plain compiled PyTorch (then with SDPA's softmax and with overlapped communication),
# where the engine's step goes, and the sampler.
PLAN = (
    Step("check_attention_triton", "gpu_check.py", ("--only", "attention_triton"), 150),
    Step("attention", "gpu_bench.py", ("--only", "peak,attention"), 150),
    Step("train", "gpu_bench.py", tuple(TRAIN), 240),
    Step("train_triton_sdpa", "gpu_bench.py", (*TRAIN, "--attention-backend", "triton_sdpa"), 200),
    Step("profile", "gpu_bench.py", ("--only", "train", "--variants", "zero2_compiled", "--profile", "{traces}",
                                     *XL), 200),
    Step("sample", "gpu_bench.py", ("--only", "sample", "--sample-steps", "20", "--sample-backends",
                                    "auto,torch,triton_sdpa"), 200),
    Step("train_overlap_comm", "gpu_bench.py", ("--only", "train", "--variants", "zero2_compiled", "--overlap-comm",
                                                "on", *XL), 200),
)
SMOKE_TIMEOUT_S = 300  # a step's timeout with --smoke (tiny shapes on CPU; compilation dominates)


@dataclass
class Outcome:
    """How one step ended: ran (exit code, seconds, killed at its timeout) or skipped (why)."""

    name: str
    argv: Optional[list[str]] = None
    returncode: Optional[int] = None
    seconds: Optional[float] = None
    timed_out: bool = False
    skipped: Optional[str] = None
    json_lines: int = 0


def tool_argv(step: Step, traces: Path, device: str, smoke: bool) -> list[str]:
    """The step's command: this Python, the tool, its arguments ({traces} filled in) and the device options
    (gpu_bench's --smoke replaces the shapes; gpu_check's smallest model is tiny/2)."""
    args = [a.replace("{traces}", str(traces)) for a in step.args] + ["--device", device]
    if smoke:
        args += ["--smoke"] if step.tool == "gpu_bench.py" else ["--size", "tiny/2"]
    return [sys.executable, str(REPO / "tools" / step.tool), *args]


def run_step(name: str, argv: list[str], timeout_s: float, out: Path, env: dict[str, str]) -> Outcome:
    """Run one step; append its JSON lines, tagged with the step, to results.jsonl and the rest to logs.txt."""
    start = time.monotonic()
    with open(out / "logs.txt", "a") as log:
        log.write(f"== {name}: {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the tool and any compile workers it started
            stdout, _ = proc.communicate()
            timed_out = True
        results, other = [], []
        for line in stdout.splitlines():
            try:
                results.append({"step": name, **json.loads(line)})
            except (ValueError, TypeError):  # not a JSON object: output for the log
                other.append(line)
        log.write("".join(f"{line}\n" for line in other))
    with open(out / "results.jsonl", "a") as jsonl:
        jsonl.write("".join(json.dumps(line) + "\n" for line in results))
    return Outcome(name, argv, proc.returncode, round(time.monotonic() - start, 1), timed_out,
                   json_lines=len(results))


def run_plan(steps: Sequence[tuple[str, list[str], float]], budget_s: float, out: Path, env: dict[str, str],
             header: Optional[dict] = None) -> list[Outcome]:
    """Each (name, argv, timeout) in order if its timeout fits in what is left of the budget, the others skipped;
    session.json (`header` and the outcomes so far) rewritten after each step."""
    start, outcomes = time.monotonic(), []
    for name, argv, timeout_s in steps:
        left = budget_s - (time.monotonic() - start)
        if timeout_s > left:
            outcomes.append(Outcome(name, argv, skipped=f"its timeout {timeout_s:.0f} s exceeds the {left:.0f} s left"))
        else:
            outcomes.append(run_step(name, argv, timeout_s, out, env))
        print(json.dumps({"step": name, **{k: v for k, v in asdict(outcomes[-1]).items() if k != "argv"}}),
              flush=True)
        session = {**(header or {}), "steps": [asdict(o) for o in outcomes]}
        (out / "session.json").write_text(json.dumps(session, indent=1))
    return outcomes


def deepspeed_env() -> tuple[dict[str, str], Optional[str]]:
    """The steps' environment: as this one with the repository on PYTHONPATH, and when DeepSpeed is missing the
    `.whl/` wheels installed into a temporary folder put before it (not under the output folder, which travels
    back). Returns it and what was done."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], env=env, capture_output=True)
    if probe.returncode == 0:
        return env, None
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    if not wheels:
        return env, f"DeepSpeed is not importable and {WHEELS} holds no wheels (README \"GPU speed\")"
    site = Path(tempfile.gettempdir()) / "arflow_gpu_session_site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--upgrade", "--target", str(site), *wheels],
                         capture_output=True, text=True)
    if pip.returncode != 0:  # the steps still run: those that need DeepSpeed fail and say so
        return env, f"installing the wheels of {WHEELS} failed: {pip.stderr.strip().splitlines()[-1:]}"
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env, f"installed {len(wheels)} wheels from {WHEELS} into {site}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_session", help="output folder ($OUT there)")
    parser.add_argument("--budget-s", type=float, default=540, help="seconds for all steps together")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (with --device cpu: the test suite)")
    parser.add_argument("--only", help=f"comma-separated steps, of {', '.join(s.name for s in PLAN)}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args(argv)
    names = [s.name for s in PLAN]
    chosen = args.only.split(",") if args.only else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--only: unknown step(s) {', '.join(unknown)}; known: {', '.join(names)}")
    out = Path(args.out).resolve()
    traces = Path(tempfile.gettempdir()) / "arflow_gpu_session_traces"
    steps = [(s.name, tool_argv(s, traces, args.device, args.smoke), SMOKE_TIMEOUT_S if args.smoke else s.timeout_s)
             for s in PLAN if s.name in chosen]
    if args.dry_run:
        total = 0.0
        for name, command, timeout_s in steps:
            total += timeout_s
            fits = "" if total <= args.budget_s else "  (past the budget: runs only if earlier steps end early)"
            print(f"{name:24s} at most {timeout_s:4.0f} s  {' '.join(command[1:])}{fits}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.jsonl", "logs.txt"):  # a session of its own, also in a folder used before
        (out / name).write_text("")
    env, install = deepspeed_env()
    header = {"budget_s": args.budget_s, "device": args.device, "deepspeed": install}
    outcomes = run_plan(steps, args.budget_s, out, env, header)
    failed = [o.name for o in outcomes if o.skipped is None and (o.returncode != 0 or o.timed_out)]
    print(json.dumps({"session": str(out / "session.json"), "ran": sum(o.skipped is None for o in outcomes),
                      "skipped": [o.name for o in outcomes if o.skipped], "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
