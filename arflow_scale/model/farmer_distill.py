"""One-step distillation of the flow's inverse (docs/farmer.md §8).

`FarmerInverseStudent` g(z, y) is a bidirectional transformer over the latent tokens that
predicts the image in one pass, x = unpatchify(z + head(h)); it replaces the flow's
flow_blocks * (N - 1) sequential steps at sampling time. Its training pairs come cheap from the
flow's parallel forward pass: for a dequantized image x~, (F(x~), x~) is an exact (z, F^-1(z)).
`FarmerOneStep` is the distillation stage's model: the student trains beside a frozen teacher and
samples with the teacher's prior.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .causal_transformer import Transformer
from .embeddings import LabelEmbedder, sincos_pos_embed_2d
from .farmer import FARMER, dequantize
from .farmer_flow import FarmerFlow, check_labels, unpatchify
from .farmer_sizes import FarmerArgs


class FarmerInverseStudent(nn.Module):
    """g(z (B, N, D), y (B,) or None) -> image (B, C, H, W); flow_width wide, student_depth deep."""

    def __init__(self, args: FarmerArgs):
        super().__init__()
        self.args = args
        width = args.flow_width
        self.embed = nn.Linear(args.token_dim, width)
        self.label = LabelEmbedder(args.num_classes, width) if args.flow_conditioning else None
        self.register_buffer("pos", sincos_pos_embed_2d(width, args.grid), persistent=False)
        self.transformer = Transformer(width, args.student_depth, args.flow_heads, args.flow_mlp_hidden,
                                       causal=False)
        self.head = nn.Linear(width, args.token_dim)  # zero-init: the student starts as the identity map
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        want = (self.args.num_tokens, self.args.token_dim)
        if z.dim() != 3 or tuple(z.shape[1:]) != want:
            raise ValueError(f"FarmerInverseStudent: z must be (B, {want[0]}, {want[1]}), got {tuple(z.shape)}")
        h = self.embed(z) + self.pos.to(z.dtype)
        if self.label is not None:
            if y is None:
                raise ValueError("FarmerInverseStudent: y is required when flow_conditioning is True")
            check_labels(y, z.shape[0], "FarmerInverseStudent")
            h = h + rearrange(self.label(y), "b w -> b 1 w")
        tokens = z + self.head(self.transformer(h)).to(z.dtype)
        return unpatchify(tokens, self.args.patch, self.args.in_channels)


def distill_loss(student: FarmerInverseStudent, flow: FarmerFlow, x_or_z: torch.Tensor,
                 y: Optional[torch.Tensor], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mean squared error of student(z, y) against flow.inverse(z, y), over pixels.

    x_or_z: images (B, C, H, W) in [-1, 1] -> dequantized with `generator`, z = F(x~) and the target
    is x~ itself (one parallel flow pass); or latents (B, N, D), e.g. prior samples -> the target is
    the sequential flow.inverse(z, y). The flow gets no gradient.
    """
    labels = y if flow.args.flow_conditioning else None
    with torch.no_grad():
        if x_or_z.dim() == 4:
            target = dequantize(x_or_z, generator)
            z, _ = flow(target, labels)
        elif x_or_z.dim() == 3:
            z = x_or_z
            target = flow.inverse(z, labels)
        else:
            raise ValueError(f"distill_loss: x_or_z must be images (B, C, H, W) or latents (B, N, D), "
                             f"got {tuple(x_or_z.shape)}")
    return F.mse_loss(student(z, labels), target)


class FarmerOneStep(nn.Module):
    """The distillation stage: a trainable `student` (args: the student's FarmerArgs) beside a frozen FARMER
    `teacher` (its EMA weights).

    Only the student is registered: parameters, state_dict, a DeepSpeed engine, the EMA and checkpoints see
    it alone; the teacher is held by reference (no gradient, eval mode) and follows the student's device.
    forward(x, y, generator) is `distill_loss` on exact pairs (F(x~), x~); `sample` is FARMER's sampling
    with the student in place of the sequential inverse.
    """

    def __init__(self, teacher: FARMER, args: FarmerArgs):
        super().__init__()
        self.student = FarmerInverseStudent(args)
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())  # not a submodule

    def teacher_on(self, device: torch.device) -> FARMER:
        """The frozen teacher, moved to `device` first when it is elsewhere."""
        if self.teacher.prior.pos.device != device:
            self.teacher.to(device)
        return self.teacher

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1], labels (B,) -> mean squared pixel error of the student's inverse.

        The first round(distill_prior_fraction * B) pairs are the teacher prior's samples for those labels
        (temperature 1) against the sequential inverse, the latents sampling feeds the student; the rest come
        from the images, (F(x~), x~). Draw order from `generator`: the images' dequantization, then the prior.
        """
        teacher = self.teacher_on(x.device)
        batch = x.shape[0]
        drawn = round(self.student.args.distill_prior_fraction * batch)
        if drawn == 0:
            return distill_loss(self.student, teacher.flow, x, y, generator)
        data = distill_loss(self.student, teacher.flow, x[drawn:], y[drawn:], generator) if drawn < batch else 0.0
        with torch.no_grad():
            z = teacher.prior.sample(y[:drawn], generator=generator)
        prior = distill_loss(self.student, teacher.flow, z, y[:drawn])
        return (prior * drawn + data * (batch - drawn)) / batch

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, candidates: Optional[int] = None,
               denoise: bool = True) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1]: the teacher's prior sample, then one student pass (FARMER.sample)."""
        teacher = self.teacher_on(self.student.head.weight.device)
        return teacher.sample(labels, cfg_scale, temperature, generator, candidates, student=self.student,
                              denoise=denoise)
