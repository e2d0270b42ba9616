"""`arflow submit [--address URL] [--follow] [--env KEY ...] -- ARFLOW_ARGS`: run arflow as a Ray job."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    parser = sub.add_parser("submit", help="submit an arflow command to a Ray cluster (Jobs API)",
                            description="Submit `arflow ARGS` to a Ray cluster through the Jobs API. The project "
                            "is uploaded as the working_dir; MLflow/S3 settings and credentials set locally "
                            "are forwarded as env vars (values never printed).")
    parser.add_argument("--address", default=None,
                        help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, "
                            "else http://127.0.0.1:8265)")
    parser.add_argument("--follow", action="store_true", help="stream the logs (stderr) and exit with the job's status")
    parser.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                        help="forward env var KEY (its local value) or set KEY=VALUE in the job; repeatable")
    parser.add_argument("--runtime-env", default=None, metavar="YAML",
                        help="runtime_env template to start from (e.g. cluster/runtime_env.yaml)")
    parser.add_argument("--working-dir", default=None, help="project folder to upload (default: this checkout)")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: Ray generates one)")
    parser.add_argument("--python", default="python", help="python executable on the cluster (default: python)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the entrypoint process")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the entrypoint process")
    parser.add_argument("arflow_args", nargs=argparse.REMAINDER, metavar="-- ARFLOW_ARGS",
                        help="the arflow command to run, after `--` (e.g. -- train --config configs/x.yaml)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from arflow_scale.cluster import jobs

    arflow_args = list(args.arflow_args)
    if arflow_args and arflow_args[0] == "--":
        arflow_args = arflow_args[1:]
    template = jobs.load_runtime_env_template(args.runtime_env) if args.runtime_env else None
    runtime_env = jobs.build_runtime_env(working_dir=args.working_dir, forward=args.env, template=template)
    address = jobs.job_address(args.address)
    submission_id = jobs.submit(arflow_args, address=address, runtime_env=runtime_env,
                                submission_id=args.submission_id, python=args.python,
                                entrypoint_num_cpus=args.num_cpus, entrypoint_num_gpus=args.num_gpus)
    result = {"submission_id": submission_id, "address": address}
    if not args.follow:
        print(json.dumps(result), flush=True)
        return 0
    print(f"arflow submit: job {submission_id} submitted to {address}; following its logs", file=sys.stderr, flush=True)
    try:
        status = jobs.follow(submission_id, address=address, out=sys.stderr)
    except KeyboardInterrupt:
        print(f"\narflow submit: stopped following; the job keeps running (arflow jobs stop {submission_id})",
              file=sys.stderr)
        return 130
    result["status"] = status
    print(json.dumps(result), flush=True)
    return 0 if status == "SUCCEEDED" else 1
