"""Inception statistics of a whole image set (PNG folder, npz or shard manifest): the reference side
of FID (`arflow fid ref`, `arflow fid images`, the demo)."""
from __future__ import annotations

from typing import Optional

from .stats import GaussianStats

from .images import iter_image_batches, source_kind
from .inception import feature_stats, load_inception


def image_set_stats(source: str, *, num: Optional[int] = None, batch_size: int = 32,
                    inception_path: Optional[str] = None, storage_options: Optional[dict] = None,
                    progress: bool = True) -> GaussianStats:
    """float64 feature statistics of at most `num` images of `source` (all when None)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    options = storage_options or {}
    source_kind(source, options)  # a missing or wrong set fails before the Inception load
    extractor = load_inception(inception_path, storage_options=options)
    with tqdm(desc=f"features {source}", unit="img", total=num, disable=not progress) as bar:
        def counted():
            for batch in iter_image_batches(source, batch_size, num, options):
                yield batch
                bar.update(len(batch))
        stats = feature_stats(extractor, counted())
    if stats.count == 0:
        raise ValueError(f"{source}: no images")
    return stats
