"""Inception statistics of a whole image set (image folder, npz, or a shard manifest: its images, or for
latent shards their source images): the reference side of FID (`arflow fid ref`, `arflow fid images`, the
demo)."""
from __future__ import annotations

import itertools
from typing import Optional

from .images import iter_image_batches
from .inception import feature_stats, load_inception
from .stats import GaussianStats


def image_set_stats(source: str, *, num: Optional[int] = None, batch_size: int = 32,
                    inception_path: Optional[str] = None, storage_options: Optional[dict] = None,
                    progress: bool = True, image_size: Optional[int] = None) -> GaussianStats:
    """float64 feature statistics of at most `num` images of `source` (all when None); `image_size`: an
    image folder's images center-cropped to that side (ADM's crop, as the shards were made)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    options = storage_options or {}
    batches = iter_image_batches(source, batch_size, num, options, image_size)
    first = next(batches, None)  # a missing or wrong set fails here, before the Inception load
    extractor = load_inception(inception_path, storage_options=options)
    with tqdm(desc=f"features {source}", unit="img", total=num, disable=not progress) as bar:
        def counted():
            for batch in itertools.chain([] if first is None else [first], batches):
                yield batch
                bar.update(len(batch))
        stats = feature_stats(extractor, counted())
    if stats.count == 0:
        raise ValueError(f"{source}: no images")
    return stats
