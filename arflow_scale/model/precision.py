"""The fp32 matmul precision the model runs under on a GPU: one setting for training and for sampling."""
from __future__ import annotations

import torch


def use_tf32(enabled: bool, device: str | torch.device) -> None:
    """On CUDA, fp32 matmuls and the fused attention's fp32 dots (the inter-image read and the state) run on
    TF32 tensor cores when `enabled` (`train.tf32`), in exact fp32 otherwise. CPU matmuls are left alone.

    Sampling outside the trainer (`arflow sample`, FID tasks) applies the run's setting too, so that it
    computes as the trainer's sample grids did."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
