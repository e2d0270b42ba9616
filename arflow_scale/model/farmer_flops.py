"""Analytic parameter counts and forward FLOPs of FARMER (docs/farmer.md §9).

FLOPs count matrix products only, 2 per multiply-add (torch's FlopCounterMode convention, as
model/flops.py); causal attention is counted dense (4 L^2 W per layer, what a math/masked
kernel computes). `forward_flops` is one image through `FARMER.log_density` (flow + prior);
training FLOPs per image ~= 3 * forward_flops.
"""
from __future__ import annotations

from .farmer_sizes import FarmerArgs
from .mixture import DiagonalMixture


def _transformer_params(width: int, depth: int, mlp_hidden: int) -> int:
    """causal_transformer.Transformer: per layer 2 LayerNorms, qkv, proj, MLP; then a final LayerNorm."""
    layer = 2 * (2 * width) + (3 * width * width + 3 * width) + (width * width + width)
    layer += (width * mlp_hidden + mlp_hidden) + (mlp_hidden * width + width)
    return depth * layer + 2 * width


def _transformer_flops(length: int, width: int, depth: int, mlp_hidden: int) -> int:
    """One pass over `length` tokens: projections, MLP and dense attention scores/values."""
    per_layer = 2 * length * width * 4 * width + 2 * length * width * mlp_hidden * 2 + 4 * length * length * width
    return depth * per_layer


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def flow_parameters(args: FarmerArgs) -> int:
    """Parameters of FarmerFlow(args)."""
    w, d = args.flow_width, args.token_dim
    block = _linear(d, w) + _transformer_params(w, args.flow_depth, args.flow_mlp_hidden) + _linear(w, 2 * d)
    if args.flow_conditioning:
        block += (args.num_classes + 1) * w
    return args.flow_blocks * block


def prior_parameters(args: FarmerArgs) -> int:
    """Parameters of FarmerPrior(args)."""
    w, k = args.prior_width, args.mixture_components
    total = (args.num_classes + 1) * w + _linear(args.informative_channels, w)
    total += _transformer_params(w, args.prior_depth, args.prior_mlp_hidden)
    total += _linear(w, DiagonalMixture.num_params(k, args.informative_channels))
    if args.redundant_channels > 0:
        total += _linear(w, DiagonalMixture.num_params(k, args.redundant_channels))
    return total


def count_parameters(args: FarmerArgs) -> int:
    """Trainable parameters of FARMER(args) (flow + prior; the student is counted apart)."""
    return flow_parameters(args) + prior_parameters(args)


def count_student_parameters(args: FarmerArgs) -> int:
    """Trainable parameters of FarmerInverseStudent(args)."""
    w, d = args.flow_width, args.token_dim
    total = _linear(d, w) + _transformer_params(w, args.student_depth, args.flow_mlp_hidden) + _linear(w, d)
    if args.flow_conditioning:
        total += (args.num_classes + 1) * w
    return total


def flow_forward_flops(args: FarmerArgs) -> int:
    """One image through FarmerFlow.forward (every block sees all N tokens in one pass)."""
    n, w, d = args.num_tokens, args.flow_width, args.token_dim
    block = 2 * n * d * w + _transformer_flops(n, w, args.flow_depth, args.flow_mlp_hidden) + 2 * n * w * 2 * d
    return args.flow_blocks * block


def prior_forward_flops(args: FarmerArgs) -> int:
    """One image through FarmerPrior.log_prob (teacher forcing: class token + informative tokens)."""
    n, w, k = args.num_tokens, args.prior_width, args.mixture_components
    fed = n if args.redundant_channels > 0 else n - 1
    flops = 2 * fed * args.informative_channels * w
    flops += _transformer_flops(fed + 1, w, args.prior_depth, args.prior_mlp_hidden)
    flops += 2 * n * w * DiagonalMixture.num_params(k, args.informative_channels)
    if args.redundant_channels > 0:
        flops += 2 * w * DiagonalMixture.num_params(k, args.redundant_channels)
    return flops


def forward_flops(args: FarmerArgs) -> int:
    """Forward FLOPs of one image's exact log-likelihood (flow + prior)."""
    return flow_forward_flops(args) + prior_forward_flops(args)


def student_forward_flops(args: FarmerArgs) -> int:
    """One latent (B = 1) through FarmerInverseStudent: the one-pass replacement of the flow's inverse."""
    n, w, d = args.num_tokens, args.flow_width, args.token_dim
    return 2 * n * d * w + _transformer_flops(n, w, args.student_depth, args.flow_mlp_hidden) + 2 * n * w * d
