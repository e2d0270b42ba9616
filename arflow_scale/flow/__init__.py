"""Flow matching over causal image sequences: the training objective and the samplers."""
from .objective import (draw_noise_levels, drop_labels, flow_matching_loss, interpolate, sequence_losses,
                        unwrap_model)
from .samplers import sample

__all__ = ["flow_matching_loss", "sequence_losses", "sample", "draw_noise_levels", "drop_labels", "interpolate", "unwrap_model"]
