"""A linear layer whose CUDA matmuls see an output width rounded up to a multiple of 8.

ARFlow's decay gate maps the width to one value per head (18 for XL/2). With 18 bf16 outputs the rows are
36 bytes apart, so cuBLAS can only use its unaligned sm80 kernels on an H200; the weight-gradient GEMM,
(18 x tokens) @ (tokens x width), then runs on a handful of SMs. A step's profile showed those kernels at
about 13% of an XL/2 training step (41 of 308 ms; README, GPU speed). Zero rows appended for the matmul and
sliced off make every operand 16-byte aligned; the parameters, the state dict and the CPU path stay nn.Linear's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ALIGN_ROWS = 8  # bf16 rows of 8 elements: 16 bytes, what Hopper's tensor-core loads need


def aligned_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   multiple: int = ALIGN_ROWS) -> torch.Tensor:
    """F.linear(x, weight, bias) computed with weight (O, I) padded by zero rows to a multiple of `multiple`:
    x (..., I) -> (..., O), a view of the padded (..., O_padded) result."""
    out_features = weight.shape[0]
    pad = -out_features % multiple
    if pad == 0:
        return F.linear(x, weight, bias)
    bias = F.pad(bias, (0, pad)) if bias is not None else None
    return F.linear(x, F.pad(weight, (0, 0, 0, pad)), bias)[..., :out_features]


class AlignedLinear(nn.Linear):
    """nn.Linear that pads its output width for the matmul on CUDA (`aligned_linear`); elsewhere nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return aligned_linear(x, self.weight, self.bias)
        return super().forward(x)
