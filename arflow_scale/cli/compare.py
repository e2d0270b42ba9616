"""`arflow compare --config configs/compare/NAME.yaml [KEY=VALUE ...]`: model variants trained for the same FLOPs
on the same shards, evaluated with one FID protocol at the same fractions of the budget; resumable."""
from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("compare", help="compare arms (e.g. ARFlow vs SiT) at equal training FLOPs: FID, "
                                            "losses, a table and a plot; resumable")
    parser.add_argument("--config", required=True, help="comparison YAML, e.g. configs/compare/fashion-mnist-cpu.yaml")
    parser.add_argument("--parallel", type=int, default=None,
                        help="arms trained at once (1: one after the other in this process; 0: fit the cluster)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the arms (params, steps, FLOPs, evaluation steps) and the total cost only")
    parser.add_argument("--status", action="store_true",
                        help="where the comparison stands: each arm trained, started (its checkpoint) or not, and its "
                             "FID evaluations done; no training")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the comparison file, e.g. flops=2e13 seeds=[0,1,2]")
    parser.set_defaults(handler=run)


def _dry_run(compare, folder) -> dict:
    """Print a table of the arms and the total cost; return them as the JSON summary."""
    from arflow_scale.scaling.compare import arm_sampling_flops, compare_cost, fid_protocol, plan_arms

    arms = plan_arms(compare, folder)
    gpu = compare.gpu if compare.gpu.enabled else None
    cost = compare_cost(arms, len(compare.seeds), gpu)
    print(f"{'arm':<20} {'K':>3} {'attention':>9} {'params':>10} {'steps':>8} {'FLOPs':>10} {'vs budget':>9} "
          f"{'sampling FLOPs':>14}  evaluation steps" + (f" {'GPU-h':>8}" if gpu else ""))
    rows = []
    for arm in arms:
        model, point = arm.config.model, arm.point
        sampling = arm_sampling_flops(arm, len(compare.seeds))
        row = {"arm": arm.name, "k": model.k, "attention": model.attention, "params": point.params,
               "steps": point.steps, "flops": point.flops, "flops_per_step": point.flops_per_step,
               "images": point.images, "evaluation_steps": arm.evaluation_steps, "sampling_flops": sampling}
        line = (f"{arm.name:<20} {model.k:>3} {model.attention:>9} {point.params:>10.3g} {point.steps:>8d} "
                f"{point.flops:>10.3g} {100 * (point.flops / compare.flops - 1):>+8.2f}% {sampling:>14.3g}  "
                f"{arm.evaluation_steps}")
        if gpu:
            row["gpu_hours"] = gpu.hours(point.flops + sampling)
            line += f" {row['gpu_hours']:>8.3g}"
        rows.append(row)
        print(line)
    total = cost.to_dict()
    print(f"total: {cost.arms} arms, {cost.train_flops:.3g} training FLOPs, {cost.sampling_flops:.3g} FID sampling "
          f"FLOPs, {cost.inception_images} images through Inception"
          + (f"; {cost.gpu_hours:.4g} GPU-hours on {gpu.name or 'the assumed GPU'} at {gpu.peak_tflops:g} TFLOP/s "
             f"peak x MFU {gpu.mfu:g}" if gpu else ""))
    return {"comparison": compare.name, "budget_flops": compare.flops, "evaluations": compare.evaluations,
            "seeds": compare.seeds, "protocol": fid_protocol(arms[0]), "arms": rows, "cost": total}


def _status(compare, folder) -> dict:
    """Print each arm's training state and evaluations done; return them as the JSON summary."""
    from arflow_scale.scaling.compare import compare_url, plan_arms
    from arflow_scale.scaling.compare_eval import evaluations, pending
    from arflow_scale.scaling.progress import points_progress

    arms = plan_arms(compare, folder)
    root = compare_url(compare)
    trained = points_progress([arm.point for arm in arms], root, compare.storage_options,
                              f"comparison {compare.name}")
    left = pending(arms, compare, root)
    print(f"{'arm':<20} {'state':>12} {'step':>17} {'loss':>8} {'evaluations':>12}")
    rows = []
    for arm, progress in zip(arms, trained):
        total = len(evaluations(arm, compare.seeds))
        done = total - sum(ev.arm == arm.name for ev in left)
        loss = f"{progress.loss:.4g}" if progress.loss is not None else "-"
        print(f"{arm.name:<20} {progress.state:>12} {f'{progress.step}/{progress.steps}':>17} {loss:>8} "
              f"{f'{done}/{total}':>12}")
        rows.append({"arm": arm.name, **progress.to_dict(), "evaluations_done": done, "evaluations": total})
    print(f"{sum(p.state == 'finished' for p in trained)} of {len(arms)} arms trained, "
          f"{sum(r['evaluations_done'] for r in rows)} of {sum(r['evaluations'] for r in rows)} evaluations done")
    return {"comparison": compare.name, "arms": rows}


def run(args) -> int:
    from arflow_scale.scaling.compare import load_compare

    compare, folder = load_compare(args.config, args.overrides)
    if args.dry_run or args.status:
        print(json.dumps((_status if args.status else _dry_run)(compare, folder)), flush=True)
        return 0
    from arflow_scale.scaling.compare_run import run_compare

    summary = run_compare(compare, folder, parallel=args.parallel)
    print(summary.pop("table"), flush=True)
    print(json.dumps(summary), flush=True)
    return 0
