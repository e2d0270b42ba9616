"""FID evaluation: the standard Inception feature extractor, mergeable statistics, Frechet distance and
the Ray task graph that samples a checkpoint and measures it in parallel."""
from .frechet import MIN_SAMPLES, fid_from_stats, frechet_distance
from .graph import FidPlan, launch_fid, run_fid
from .images import iter_image_batches, load_images, save_npz
from .inception import InceptionFeatures, load_inception, locate_inception
from .reference import image_set_stats
from .stats import GaussianStats

__all__ = [
    "GaussianStats", "frechet_distance", "fid_from_stats", "MIN_SAMPLES", "InceptionFeatures", "load_inception",
    "locate_inception", "image_set_stats", "launch_fid", "run_fid", "FidPlan", "load_images", "iter_image_batches", "save_npz",
]
