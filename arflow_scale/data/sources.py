"""Dataset sources for the shard writer: digits, fashion-mnist (IDX), imagefolder, npz.

A source exposes `class_names`, `labels` (N,) int64 and `image(i) -> uint8 (H, W, C)`, already at
the requested size. Resizing follows ADM's center crop (box-downsample while >= 2x, bicubic resize
of the short side, center crop), which for square inputs is a plain resize.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from einops import rearrange
from PIL import Image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SOURCES = ("digits", "fashion-mnist", "imagefolder", "npz")
SPLITS = ("train", "test")  # the published splits a source may offer (fashion-mnist has both)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: PIL image -> uint8 (size, size, C)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(d // 2 for d in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(d * scale) for d in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    arr = arr[top: top + size, left: left + size]
    return arr[..., None] if arr.ndim == 2 else arr


class ArraySource:
    """In-memory images uint8 (N, H, W, C) with labels (N,), optionally resized on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                 image_size: int | None = None, name: str = "arrays"):
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        labels = np.ravel(np.asarray(labels)).astype(np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(f"{name}: labels must lie in 0..{len(class_names) - 1}, "
                             f"got {labels.min()}..{labels.max()}")
        self.images, self.labels, self.class_names, self.name = images, labels, list(class_names), name
        native = images.shape[1] if images.shape[1] == images.shape[2] else None
        self.image_size = None if image_size in (None, native) else int(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        arr = self.images[index]
        if self.image_size is None:
            return arr
        mode_image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        return center_crop(mode_image, self.image_size)


class ImageFolderSource:
    """ImageNet layout `root/<class>/<image>`; classes in sorted folder order; RGB, ADM crop."""

    def __init__(self, root: str | os.PathLike, image_size: int):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"imagefolder: {root} is not a folder")
        if not image_size:
            raise ValueError("imagefolder: --image-size is required (images are center-cropped to it)")
        self.class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.class_names:
            raise ValueError(f"imagefolder: {root} has no class sub-folders")
        self.files: list[Path] = []
        labels = []
        for cls, name in enumerate(self.class_names):
            files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.files += files
            labels += [cls] * len(files)
        if not self.files:
            raise ValueError(f"imagefolder: no images under {root}/<class>/")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = int(image_size)
        self.name = f"imagefolder:{root}"

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> np.ndarray:
        with Image.open(self.files[index]) as img:
            return center_crop(img.convert("RGB"), self.image_size)


def digits_source(image_size: int | None = None) -> ArraySource:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), values 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ArraySource(images, digits.target, [str(d) for d in range(10)], image_size, name="digits")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally .gz) -> numpy array (big-endian header, uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX uint8 file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} values, header says {dims})")
    if ndim == 1:
        return data
    if ndim != 3:
        raise ValueError(f"{path}: expected a 1-d (labels) or 3-d (images) IDX file, got {ndim}-d")
    return rearrange(data, "(n h w) -> n h w", n=dims[0], h=dims[1], w=dims[2])


def fashion_mnist_source(path: str | None = None, image_size: int | None = None,
                         split: str = "train") -> ArraySource:
    """Fashion-MNIST IDX files (28x28, 10 classes) from `path` or Debian's dataset-fashion-mnist."""
    root = Path(path or FASHION_MNIST_DIR)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion-mnist: split must be one of {', '.join(SPLITS)}, got {split!r}")

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz",
                     f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(
            f"fashion-mnist: no {prefix}-{kind} IDX file in {root}; install the Debian package "
            f"`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or pass --path DIR")

    images, labels = _read_idx(find("images")), _read_idx(find("labels"))
    return ArraySource(images, labels, FASHION_MNIST_CLASSES, image_size, name=f"fashion-mnist:{split}")


def npz_source(path: str, image_size: int | None = None) -> ArraySource:
    """An .npz with `images` (N, H, W, C) uint8, `labels` (N,), optional `class_names`."""
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"npz: file not found: {path!r} (pass --path FILE.npz)")
    with np.load(path, allow_pickle=False) as data:
        for key in ("images", "labels"):
            if key not in data:
                raise ValueError(f"npz: {path} has no array {key!r} (has {sorted(data.files)})")
        images, labels = data["images"], data["labels"]
        names = [str(n) for n in data["class_names"]] if "class_names" in data else None
    if names is None:
        names = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    return ArraySource(images, labels, names, image_size, name=f"npz:{path}")


def load_source(name: str, path: str | None = None, image_size: int | None = None, split: str = "train"):
    """Source by name: digits | fashion-mnist | imagefolder | npz; `split` test only for fashion-mnist."""
    if split != "train" and name != "fashion-mnist":
        raise ValueError(f"{name}: has no {split!r} split (only fashion-mnist offers test)")
    if name == "fashion-mnist":
        return fashion_mnist_source(path, image_size, split)
    if name == "digits":
        return digits_source(image_size)
    if name == "imagefolder":
        if not path:
            raise ValueError("imagefolder: --path ROOT is required")
        return ImageFolderSource(path, image_size)
    if name == "npz":
        return npz_source(path, image_size)
    raise ValueError(f"unknown source {name!r} (known: {', '.join(SOURCES)})")
