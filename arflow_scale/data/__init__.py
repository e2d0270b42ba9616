"""Data path: sources -> class-grouped WebDataset shards + manifest -> SequenceStream of same-class sequences."""
from __future__ import annotations

from .manifest import LatentEncoding, Manifest, ShardInfo, read_manifest
from .storage import StorageError, filesystem
from .stream import SequenceStream
from .writer import write_shards

__all__ = ["SequenceStream", "write_shards", "read_manifest", "Manifest", "ShardInfo", "LatentEncoding",
           "filesystem", "StorageError"]
