"""`arflow bench sampling`: FARMER sampling with the flow's sequential inverse against the distilled one-pass
student, side by side on the same labels and the same prior draws (docs/farmer.md §7-8).

With `--checkpoint` (a distillation stage's checkpoint or run folder) it times that student and its teacher
and reports how far the student's images are from the sequential inverse's; without, a FARMER of `--size`
with fresh weights (timings do not depend on the weights). Rounds alternate between the sides; each side's
time is the median over rounds, by wall clock and by this process's CPU time. Prints one JSON line.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from arflow_scale.model.farmer import FARMER
from arflow_scale.model.farmer_distill import FarmerOneStep
from arflow_scale.model.farmer_sizes import farmer_args


@dataclass(frozen=True)
class SideSeconds:
    """Median seconds per batch of each side."""

    sequential: float  # prior + the flow's sequential inverse
    student: float  # prior + one student pass
    inverse: float  # the sequential inverse alone, on the same latents
    student_pass: float  # the student alone

    @property
    def speedup(self) -> float:
        return self.sequential / self.student

    @property
    def inverse_speedup(self) -> float:
        return self.inverse / self.student_pass


@dataclass(frozen=True)
class SampleSpeed:
    """Both sides on `images` samples on `device`: wall-clock seconds, and this process's CPU seconds (all
    threads; steadier than the wall clock on a shared machine)."""

    images: int
    device: str
    wall: SideSeconds
    cpu: SideSeconds
    mean_abs_diff: float  # |student image - sequential image|, same prior draws, pixels in [-1, 1]

    def to_json(self) -> dict:
        return {**asdict(self), "sequential_images_per_s": self.images / self.wall.sequential,
                "student_images_per_s": self.images / self.wall.student, "speedup": self.wall.speedup,
                "inverse_speedup": self.wall.inverse_speedup, "cpu_speedup": self.cpu.speedup,
                "cpu_inverse_speedup": self.cpu.inverse_speedup}


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, process CPU seconds, output) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


@torch.no_grad()
def sample_speed(model: FarmerOneStep, labels: torch.Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                 rounds: int = 3, seed: int = 0) -> SampleSpeed:
    """Time `model` (student) against its teacher's sequential inverse on `labels` (B,); every round draws the
    same prior samples for both sides (one seed)."""
    teacher, device = model.teacher, model.student.head.weight.device
    labels = labels.to(device)
    flow_labels = labels if teacher.args.flow_conditioning else None

    def prior_draw():
        return teacher.prior.sample(labels, cfg_scale, temperature, torch.Generator().manual_seed(seed))

    sides = {
        "sequential": lambda: teacher.sample(labels, cfg_scale, temperature, torch.Generator().manual_seed(seed)),
        "student": lambda: model.sample(labels, cfg_scale, temperature, torch.Generator().manual_seed(seed)),
    }
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        z = prior_draw()
        sides["inverse"] = lambda: teacher.flow.inverse(z, flow_labels)
        sides["student_pass"] = lambda: model.student(z, flow_labels)
        for side, fn in sides.items():
            wall, cpu, outputs[side] = _timed(fn, device)
            walls.setdefault(side, []).append(wall)
            cpus.setdefault(side, []).append(cpu)
    diff = (outputs["student"].float() - outputs["sequential"].float()).abs().mean()
    return SampleSpeed(images=labels.shape[0], device=str(device),
                       wall=SideSeconds(**{side: statistics.median(t) for side, t in walls.items()}),
                       cpu=SideSeconds(**{side: statistics.median(t) for side, t in cpus.items()}),
                       mean_abs_diff=float(diff))


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="a FARMER distillation stage's checkpoint or run folder (default: fresh weights)")
    parser.add_argument("--size", default="tiny/2", help="FARMER size without --checkpoint")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="images per sampling call")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (median)")
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")


def _model(args, device: torch.device) -> FarmerOneStep:
    if args.checkpoint is None:
        fargs = farmer_args(args.size, image_size=args.image_size, in_channels=args.in_channels,
                            num_classes=args.num_classes)
        torch.manual_seed(0)
        return FarmerOneStep(FARMER(fargs), fargs).to(device).eval()
    from arflow_scale.checkpoint import load_ema_weights, run_task  # the read side of checkpoints, when asked

    cfg, ema = load_ema_weights(args.checkpoint)
    model = run_task(cfg).model_from_weights(ema, device)
    if not isinstance(model, FarmerOneStep):
        raise ValueError(f"--checkpoint {args.checkpoint}: a model.family {cfg.model.family} run without "
                         f"distill.teacher; give a FARMER distillation stage")
    return model


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads > 0 and device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = _model(args, device)
    labels = torch.arange(args.batch) % model.teacher.args.num_classes
    speed = sample_speed(model, labels, cfg_scale=args.cfg_scale, temperature=args.temperature, rounds=args.rounds)
    result = {"checkpoint": args.checkpoint, "size": None if args.checkpoint else args.size,
              "threads": torch.get_num_threads(), **speed.to_json()}
    print(f"{'side':<28} {'wall s/batch':>12} {'img/s':>10} {'CPU s/batch':>12}")
    for side, name in (("sequential", "prior + sequential inverse"), ("student", "prior + student"),
                       ("inverse", "sequential inverse alone"), ("student_pass", "student alone")):
        wall, cpu = getattr(speed.wall, side), getattr(speed.cpu, side)
        print(f"{name:<28} {wall:>12.4f} {speed.images / wall:>10.1f} {cpu:>12.4f}")
    print(f"speedup {speed.wall.speedup:.2f}x wall, {speed.cpu.speedup:.2f}x CPU (inverse alone "
          f"{speed.wall.inverse_speedup:.1f}x, {speed.cpu.inverse_speedup:.1f}x); student vs sequential images: "
          f"mean |diff| {speed.mean_abs_diff:.4f}")
    print(json.dumps(result), flush=True)
    return 0
