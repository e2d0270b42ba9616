"""FID evaluation: the standard Inception feature extractor, mergeable statistics, Frechet distance, sample
grids, and the Ray task graph that samples a checkpoint and measures it in parallel (`eval.graph`; Ray and
MLflow are imported by that module only)."""
from .frechet import MIN_SAMPLES, fid_from_stats, frechet_distance
from .images import iter_image_batches, load_images, save_npz
from .inception import InceptionFeatures, load_inception, locate_inception
from .reference import image_set_stats
from .stats import GaussianStats

__all__ = [
    "GaussianStats", "frechet_distance", "fid_from_stats", "MIN_SAMPLES", "InceptionFeatures", "load_inception",
    "locate_inception", "image_set_stats", "load_images", "iter_image_batches", "save_npz",
]
