"""`arflow bench sampling`: FARMER sampling with the flow's sequential inverse against the distilled one-pass
student, side by side on the same labels and the same prior draws (docs/farmer.md §7-8).

With `--checkpoint` (a distillation stage's checkpoint or run folder) it times that student and its teacher
and reports how far the student's images are from the sequential inverse's; without, a FARMER of `--size`
with fresh weights (timings do not depend on the weights). Rounds alternate between the sides; each side's
time is the median over rounds. Prints one JSON line.
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
class SampleSpeed:
    """Median seconds per batch of `images` samples on `device`, per side."""

    images: int
    device: str
    sequential_seconds: float  # prior + the flow's sequential inverse
    student_seconds: float  # prior + one student pass
    inverse_seconds: float  # the sequential inverse alone, on the same latents
    student_pass_seconds: float  # the student alone
    mean_abs_diff: float  # |student image - sequential image|, same prior draws, pixels in [-1, 1]

    @property
    def speedup(self) -> float:
        return self.sequential_seconds / self.student_seconds

    @property
    def inverse_speedup(self) -> float:
        return self.inverse_seconds / self.student_pass_seconds

    def to_json(self) -> dict:
        return {**asdict(self), "sequential_images_per_s": self.images / self.sequential_seconds,
                "student_images_per_s": self.images / self.student_seconds, "speedup": self.speedup,
                "inverse_speedup": self.inverse_speedup}


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


@torch.no_grad()
def sample_speed(model: FarmerOneStep, labels: torch.Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                 rounds: int = 3, seed: int = 0) -> SampleSpeed:
    """Time `model` (student) against its teacher's sequential inverse on `labels` (B,); every round draws the
    same prior samples for both sides (one seed)."""
    teacher, device = model.teacher, model.student.head.weight.device
    labels = labels.to(device)
    flow_labels = labels if teacher.args.flow_conditioning else None
    sides: dict[str, list[float]] = {"sequential": [], "student": [], "inverse": [], "student_pass": []}
    for _ in range(rounds):
        seconds, slow = _timed(lambda: teacher.sample(labels, cfg_scale, temperature,
                                                      torch.Generator().manual_seed(seed)), device)
        sides["sequential"].append(seconds)
        seconds, fast = _timed(lambda: model.sample(labels, cfg_scale, temperature,
                                                    torch.Generator().manual_seed(seed)), device)
        sides["student"].append(seconds)
        z = teacher.prior.sample(labels, cfg_scale, temperature, torch.Generator().manual_seed(seed))
        sides["inverse"].append(_timed(lambda: teacher.flow.inverse(z, flow_labels), device)[0])
        sides["student_pass"].append(_timed(lambda: model.student(z, flow_labels), device)[0])
    median = {side: statistics.median(times) for side, times in sides.items()}
    return SampleSpeed(images=labels.shape[0], device=str(device), sequential_seconds=median["sequential"],
                       student_seconds=median["student"], inverse_seconds=median["inverse"],
                       student_pass_seconds=median["student_pass"],
                       mean_abs_diff=float((fast.float() - slow.float()).abs().mean()))


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
    print(f"{'side':<28} {'s/batch':>10} {'img/s':>10}")
    print(f"{'prior + sequential inverse':<28} {speed.sequential_seconds:>10.4f} "
          f"{speed.images / speed.sequential_seconds:>10.1f}")
    print(f"{'prior + student':<28} {speed.student_seconds:>10.4f} {speed.images / speed.student_seconds:>10.1f}")
    print(f"speedup {speed.speedup:.2f}x (inverse alone {speed.inverse_speedup:.1f}x); "
          f"student vs sequential images: mean |diff| {speed.mean_abs_diff:.4f}")
    print(json.dumps(result), flush=True)
    return 0
