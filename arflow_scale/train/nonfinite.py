"""Non-finite losses and gradients: caught every step, never applied, never checkpointed.

Every step the ranks agree (one all-reduce, `StepConsensus`) on whether any micro-batch loss was non-finite;
the same all-reduce carries rank 0's stop request (train/stop.py). A non-finite
gradient is caught where it would be applied: DeepSpeed's ZeRO 1-3 optimizers skip a step whose global
gradient norm is not finite (its `was_step_applied()` is then False), and under ZeRO-0 the `UpdateGate`, a
step pre-hook on the torch optimizer inside DeepSpeed, checks the (already all-reduced) gradients. A step with
a non-finite loss is closed at the same gate: the torch optimizer sees no gradients and changes nothing.
So a bad step never touches the weights, the AdamW moments or the EMA; its batch is consumed and the
learning-rate schedule advances, as for any step.

Then `train.nonfinite=stop` ends the run with a NonFiniteError naming the step (the last checkpoint stays the
newest); `skip` goes on, and more than `train.max_skipped_steps` skipped steps in a run end it the same way.
Before any checkpoint the trainer also checks that the weights and the EMA it would save are finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from arflow_scale.config import TrainConfig


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the message names the step."""


class UpdateGate:
    """A step pre-hook on a torch optimizer: when closed, or (with `check_grads`) when a gradient it is about to
    apply is not finite, it drops the gradients, so the step changes no parameter and no optimizer state."""

    def __init__(self, optimizer: torch.optim.Optimizer, check_grads: bool):
        self.check_grads = check_grads
        self.closed = False  # set by the trainer for a step whose loss was not finite
        self.grads_finite = True  # of the last step the hook saw
        self.dropped = False
        optimizer.register_step_pre_hook(self._hook)

    def open_for_step(self, closed: bool) -> None:
        """Before the optimizer step of a new training step."""
        self.closed, self.grads_finite, self.dropped = closed, True, False

    def _hook(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = True
        if self.check_grads and params:
            finite = bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all())
            self.grads_finite = self.grads_finite and finite
        if self.closed or not finite:
            for param in params:
                param.grad = None
            self.dropped = True


@dataclass(frozen=True)
class StepHealth:
    """Whether a step's losses (on every rank) and its gradients were finite."""

    loss_finite: bool
    grads_finite: bool

    @property
    def ok(self) -> bool:
        return self.loss_finite and self.grads_finite

    def describe(self, local_loss: float) -> str:
        what = ["a non-finite loss"] if not self.loss_finite else []
        what += [] if self.grads_finite else ["a non-finite gradient"]
        return f"{' and '.join(what)} (mean loss on this rank: {local_loss:.6g})"


@dataclass(frozen=True)
class StepConsensus:
    """What every rank knows the same way after a step's last backward, from one all-reduce."""

    loss_finite: bool  # every micro-batch loss on every rank was finite
    stop: bool  # the driver asked the run to stop (rank 0 polled it): all ranks checkpoint this step and return


def _min_over_ranks(flags: torch.Tensor) -> list[bool]:
    """Element-wise minimum of 0/1 flags (1-D, one device) over ranks (a collective when distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [bool(v) for v in flags.tolist()]


def _finite_flag(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.detach().float().reshape(()) for v in values]).isfinite().all().float().reshape(1)


def all_finite(values: list[torch.Tensor]) -> bool:
    """Whether every value (scalars, on one device) is finite on every rank (a collective when distributed)."""
    return _min_over_ranks(_finite_flag(values))[0]


def step_consensus(losses: list[torch.Tensor], stop_asked: bool) -> StepConsensus:
    """One all-reduce (the one every step makes anyway): the losses' finiteness over all ranks, and
    `stop_asked` of any rank (only rank 0 is ever asked). losses: scalars on the training device."""
    not_asked = torch.tensor([0.0 if stop_asked else 1.0], device=losses[0].device)
    finite, keep_going = _min_over_ranks(torch.cat([_finite_flag(losses), not_asked]))
    return StepConsensus(loss_finite=finite, stop=not keep_going)


class NonFiniteGuard:
    """Applies `train.nonfinite` around each optimizer step; counts skipped steps over the run."""

    def __init__(self, cfg: TrainConfig, gate: UpdateGate, skipped: int = 0):
        self.mode, self.limit = cfg.nonfinite, cfg.max_skipped_steps
        self.gate = gate
        self.skipped = skipped

    def before_update(self, losses: list[torch.Tensor], stop_asked: bool = False) -> StepConsensus:
        """Call after the last backward of a step, before its optimizer step, on every rank: the ranks' consensus
        (`step_consensus`); the gate is closed for this step unless every loss was finite on every rank."""
        consensus = step_consensus(losses, stop_asked)
        self.gate.open_for_step(closed=not consensus.loss_finite)
        return consensus

    def after_update(self, step: int, engine, loss_finite: bool, losses: list[torch.Tensor]) -> bool:
        """Call after the optimizer step: True when the update was applied. A bad step raises NonFiniteError
        (stop, or skip past its bound); when skipped, the learning-rate schedule still advances."""
        health = StepHealth(loss_finite=loss_finite,
                            grads_finite=self.gate.grads_finite and engine.was_step_applied())
        if health.ok:
            return True
        loss = float(torch.stack([v.detach().float() for v in losses]).mean())
        if self.mode == "stop":
            raise NonFiniteError(f"step {step}: {health.describe(loss)}; training stopped (train.nonfinite=stop), "
                                 f"nothing of this step was applied or saved")
        self.skipped += 1
        if not engine.was_step_applied():  # DeepSpeed skipped it without stepping the schedule
            engine.lr_scheduler.step()
        if self.skipped > self.limit:
            raise NonFiniteError(f"step {step}: {health.describe(loss)}; {self.skipped} non-finite steps skipped, "
                                 f"more than train.max_skipped_steps={self.limit}")
        return False


def weights_finite(pieces: list[torch.Tensor], device: torch.device) -> bool:
    """Whether the tensors every rank holds are all finite (a collective when distributed)."""
    flags = [torch.isfinite(t).all().to(device) for t in pieces if t.numel()]
    local = torch.stack(flags).all() if flags else torch.tensor(True, device=device)
    return all_finite([torch.where(local, 0.0, math.nan)])
