"""`arflow jobs list|logs ID|stop ID [--address URL]`: Ray jobs on a cluster (Jobs API)."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    parser = sub.add_parser("jobs", help="list, read logs of, or stop Ray jobs")
    jobs_sub = parser.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, help_text in (("list", "every job on the cluster (no runtime_env: it holds secrets)"),
                            ("logs", "a job's logs so far (or --follow them)"),
                            ("stop", "stop a running job")):
        p = jobs_sub.add_parser(name, help=help_text)
        p.add_argument("--address", default=None,
                       help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, "
                            "else http://127.0.0.1:8265)")
        if name != "list":
            p.add_argument("submission_id", help="the job's submission id")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name == "stop":
            p.add_argument("--wait", action="store_true", help="wait until the job has stopped")
        p.set_defaults(handler=globals()[f"run_{name}"])


def _known(jobs, args) -> None:
    """ValueError (exit 2) naming the id when the cluster does not know the job."""
    try:
        jobs.job_status(args.submission_id, address=args.address)
    except RuntimeError as err:
        raise ValueError(f"job {args.submission_id!r} not found at {jobs.job_address(args.address)}: {err}") from None


def run_list(args) -> int:
    from arflow_scale.cluster import jobs

    listed = jobs.list_jobs(args.address)
    for job in listed:
        print(f"{job['submission_id']}  {job['status']:<9}  {job['entrypoint']}", file=sys.stderr)
    print(json.dumps({"address": jobs.job_address(args.address), "jobs": listed}), flush=True)
    return 0


def run_logs(args) -> int:
    from arflow_scale.cluster import jobs

    _known(jobs, args)
    if args.follow:
        status = jobs.follow(args.submission_id, address=args.address, out=sys.stdout)
    else:
        sys.stdout.write(jobs.job_logs(args.submission_id, address=args.address))
        status = jobs.job_status(args.submission_id, address=args.address)
    print(json.dumps({"submission_id": args.submission_id, "status": status}), flush=True)
    return 0


def run_stop(args) -> int:
    from arflow_scale.cluster import jobs

    _known(jobs, args)
    stopped = jobs.stop_job(args.submission_id, address=args.address)
    status = jobs.wait(args.submission_id, address=args.address, timeout_s=120) if args.wait else \
        jobs.job_status(args.submission_id, address=args.address)
    print(json.dumps({"submission_id": args.submission_id, "stop_requested": stopped, "status": status}), flush=True)
    return 0
