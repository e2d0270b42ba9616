#!/usr/bin/env python
"""A tiny diffusers AutoencoderKL with random weights, saved as a real VAE is (save_pretrained, safetensors):
the CPU stand-in for SD-VAE in the latent walkthrough of the README. Nothing is downloaded.

    python tools/tiny_vae.py --out runs/tiny-vae            # 4x downsampling, 4 latent channels
    arflow data shards --source digits --image-size 24 --vae runs/tiny-vae --flip-copy --out runs/data/digits-latents

Its latents are not meaningful (random weights); the path through shards, training, sample grids and FID is
the one SD-VAE takes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def save_tiny_vae(folder: str | Path, *, seed: int = 0, scaling_factor: float = 0.18215, downsample: int = 4,
                  latent_channels: int = 4) -> Path:
    """Write a random AutoencoderKL (a few thousand parameters) to `folder`; returns the folder."""
    import torch
    from diffusers import AutoencoderKL

    levels = downsample.bit_length()  # one block per halving, plus the first
    if downsample < 1 or 2 ** (levels - 1) != downsample:
        raise ValueError(f"--downsample must be a power of two, got {downsample}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(4,) * levels,
                        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=2,
                        scaling_factor=scaling_factor)
    vae.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (config.json + safetensors weights)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--scaling-factor", type=float, default=0.18215, help="the config's scaling_factor")
    parser.add_argument("--downsample", type=int, default=4, help="pixels per latent along a side (power of 2)")
    parser.add_argument("--latent-channels", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        folder = save_tiny_vae(args.out, seed=args.seed, scaling_factor=args.scaling_factor,
                               downsample=args.downsample, latent_channels=args.latent_channels)
    except ValueError as err:
        print(f"tiny_vae: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(folder), "scaling_factor": args.scaling_factor, "downsample": args.downsample,
                      "latent_channels": args.latent_channels}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
