"""FARMER model code (docs/farmer.md): exact invertibility and log-determinant, normalised densities,
causality, cached sampling against teacher forcing, resampling guidance, a digits training run,
the one-step inverse student, and the analytic parameter / FLOP formulas."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from arflow_scale.model.causal_transformer import Transformer
from arflow_scale.model.farmer import (BIN_WIDTH, FARMER, bits_per_dim_from_log_density, dequantize,
                                       drop_labels)
from arflow_scale.model.farmer_distill import FarmerInverseStudent, distill_loss
from arflow_scale.model.farmer_flops import (count_parameters, count_student_parameters, forward_flops,
                                             student_forward_flops)
from arflow_scale.model.farmer_flow import FarmerFlow, patchify, unpatchify
from arflow_scale.model.farmer_prior import FarmerPrior
from arflow_scale.model.farmer_sizes import FARMER_SIZES, FarmerArgs, farmer_args, parse_farmer_size
from arflow_scale.model.mixture import DiagonalMixture, guided_resample

from conftest import randomized

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(**overrides) -> FarmerArgs:
    base = dict(image_size=8, in_channels=1, num_classes=10)
    return farmer_args("tiny/2", **{**base, **overrides})


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- args, registry, formulas (§9)

def test_registry_names_and_derived_geometry():
    assert parse_farmer_size("XL/16") == ("XL", 16)
    assert set(FARMER_SIZES) == {"tiny", "S", "B", "L", "XL"}
    args = farmer_args("B/8", image_size=64, in_channels=3)
    assert (args.patch, args.grid, args.num_tokens, args.token_dim) == (8, 8, 64, 192)
    assert args.informative_channels == 32 and args.redundant_channels == 160  # token_dim // 6
    assert args.student_depth == args.flow_blocks * args.flow_depth
    assert farmer_args("tiny/2", image_size=8, in_channels=1).informative_channels == 1  # at least one
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.patch = 4


@pytest.mark.parametrize("size, overrides, match", [
    ("XXL/16", {}, "size: 'XXL/16'"),
    ("tiny", {}, "size"),
    ("tiny/2", {"image_size": 9}, "image_size: 9 not a multiple of patch=2"),
    ("tiny/2", {"flow_width": 100, "flow_heads": 3}, "flow_width: 100 not divisible by flow_heads=3"),
    ("tiny/2", {"prior_width": 36, "prior_heads": 5}, "prior_width: 36 not divisible by prior_heads=5"),
    ("tiny/2", {"flow_width": 30, "flow_heads": 2}, "flow_width: 30 not a multiple of 4"),
    ("tiny/2", {"informative_channels": 13}, r"informative_channels: 13 not in \[1, token_dim=12\]"),
    ("tiny/2", {"flow_blocks": 0}, "flow_blocks: must be a positive integer"),
    ("tiny/2", {"class_dropout": 1.0}, "class_dropout"),
    ("tiny/2", {"noise_std": -0.1}, "noise_std"),
    ("tiny/2", {"patch": 4}, "patch: comes from the size name"),
    ("tiny/2", {"colour": 3}, "colour: not a FarmerArgs field"),
])
def test_bad_args_name_the_field(size, overrides, match):
    with pytest.raises(ValueError, match=match):
        farmer_args(size, **{"image_size": 8, "in_channels": 3, **overrides})


@pytest.mark.parametrize("size, overrides", [
    ("tiny/2", {"image_size": 8, "in_channels": 1, "num_classes": 10}),
    ("tiny/4", {"image_size": 8, "in_channels": 3, "num_classes": 5, "flow_conditioning": True}),
    ("tiny/1", {"image_size": 2, "in_channels": 1, "num_classes": 3}),  # no redundant group
    ("S/4", {"image_size": 32, "in_channels": 3}),
    ("B/8", {"image_size": 64, "in_channels": 3, "flow_conditioning": True}),
    ("L/8", {"image_size": 256, "in_channels": 3}),
    ("XL/16", {"image_size": 256, "in_channels": 3, "student_depth": 12}),
])
def test_parameter_formulas_equal_built_modules(size, overrides):
    args = farmer_args(size, **overrides)
    with torch.device("meta"):  # no memory for the large sizes
        model, student = FARMER(args), FarmerInverseStudent(args)
    assert count_parameters(args) == numel(model)
    assert count_student_parameters(args) == numel(student)


@pytest.mark.parametrize("overrides", [
    {},
    {"in_channels": 3, "flow_conditioning": True, "informative_channels": 5},
    {"informative_channels": 4},  # no redundant group: the prior reads N - 1 tokens
])
def test_flop_formulas_equal_torch_flop_counter(overrides):
    args = tiny_args(**overrides)
    model, student = FARMER(args), FarmerInverseStudent(args)
    x = torch.rand(1, args.in_channels, 8, 8) * 2 - 1
    y = torch.tensor([3])
    # The math SDPA backend decomposes into matmuls that the counter sees (CPU fused SDPA has no formula).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.log_density(x, y)
    assert forward_flops(args) == counter.get_total_flops()
    z = torch.randn(1, args.num_tokens, args.token_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        student(z, y if args.flow_conditioning else None)
    assert student_forward_flops(args) == counter.get_total_flops()


# ---------------------------------------------------------------- the flow (§1, §2)

def test_patchify_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    assert torch.equal(tokens[0, 1, :3], x[0, :, 0, 2])  # token 1 = top-right patch, (p1 p2 c) layout
    assert torch.equal(unpatchify(tokens, 2, 3), x)


@pytest.mark.parametrize("conditioning", [False, True])
def test_flow_inverse_of_forward_is_identity_fp64(conditioning):
    args = tiny_args(in_channels=3, flow_blocks=3, flow_depth=2, flow_conditioning=conditioning)
    flow = randomized(FarmerFlow(args).double(), std=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([1, 7]) if conditioning else None
    z, logdet = flow(x, y)
    assert z.shape == (2, 16, 12) and logdet.shape == (2,)
    assert (z - patchify(x, 2)).abs().max() > 1e-2  # a non-trivial map
    assert (flow.inverse(z, y) - x).abs().max() < 1e-10
    if conditioning:  # the label moves the latent
        assert (flow(x, torch.tensor([2, 7]))[0][0] - z[0]).abs().max() > 1e-3


@pytest.mark.parametrize("patch", [1, 2])
def test_logdet_equals_slogdet_of_autograd_jacobian(patch):
    args = farmer_args(f"tiny/{patch}", image_size=4, in_channels=1, num_classes=3, flow_blocks=3)
    flow = randomized(FarmerFlow(args).double(), std=0.2)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.reshape(1, 1, 4, 4))[0].reshape(-1),
                                                  x.reshape(-1))
    sign, logabsdet = torch.linalg.slogdet(jacobian)
    logdet = flow(x)[1]
    assert sign != 0 and abs(logabsdet.item()) > 1e-2
    assert abs(logdet.item() - logabsdet.item()) < 1e-8


@pytest.mark.parametrize("block_index", [0, 1])
def test_each_flow_block_is_causal_in_its_own_order(block_index):
    args = tiny_args(in_channels=1)
    block = randomized(FarmerFlow(args).double(), std=0.1).blocks[block_index]
    assert block.reverse == (block_index == 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1])
    order = torch.arange(16).flip(0) if block.reverse else torch.arange(16)  # block position -> image token
    base = block(x, y)[0][:, order]
    for i in (0, 5, 15):
        moved = x.clone()
        moved[:, order[i]] += torch.randn(2, 4, generator=g, dtype=torch.float64)
        z = block(moved, y)[0][:, order]
        assert torch.equal(z[:, :i], base[:, :i]), f"token {i} reached earlier latents"
        assert (z[:, i] - base[:, i]).abs().min() > 0
        if i < 15:
            assert (z[:, i + 1:] - base[:, i + 1:]).abs().max() > 1e-6  # and does reach later ones


# ---------------------------------------------------------------- the mixture and guidance (§3, §7)

def random_mixture(batch: tuple[int, ...], components: int, dim: int, seed: int) -> DiagonalMixture:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(*batch, DiagonalMixture.num_params(components, dim), generator=g, dtype=torch.float64)
    mix = DiagonalMixture.from_params(raw, components, dim)
    return DiagonalMixture(mix.logits, 2 * mix.means, 0.5 * mix.log_scales)  # scales in about [0.2, 5]


def test_mixture_density_integrates_to_one_in_1d():
    mix = random_mixture((3,), components=4, dim=1, seed=0)  # three mixtures at once
    grid = torch.linspace(-25, 25, 40001, dtype=torch.float64)
    density = mix.log_prob(grid.reshape(-1, 1, 1)).exp()  # (points, 3)
    assert torch.allclose(torch.trapezoid(density, grid, dim=0), torch.ones(3, dtype=torch.float64), atol=1e-7)


def test_mixture_density_integrates_to_one_on_2d_slices():
    mix = random_mixture((2,), components=3, dim=2, seed=1)
    axis = torch.linspace(-25, 25, 1201, dtype=torch.float64)
    points = torch.cartesian_prod(axis, axis)  # (P, 2)
    density = mix.log_prob(points.reshape(-1, 1, 2)).exp().reshape(1201, 1201, 2)
    total = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis, dim=0)
    assert torch.allclose(total, torch.ones(2, dtype=torch.float64), atol=1e-6)


def test_mixture_log_prob_matches_a_direct_sum_of_gaussians():
    mix = random_mixture((), components=3, dim=2, seed=2)
    x = torch.tensor([0.3, -1.2], dtype=torch.float64)
    weights = torch.softmax(mix.logits, dim=0)
    direct = sum(weights[k] * torch.distributions.Normal(mix.means[k], mix.log_scales[k].exp()).log_prob(x).sum().exp()
                 for k in range(3))
    assert torch.allclose(mix.log_prob(x), direct.log(), atol=1e-12)


def test_mixture_temperature_scales_the_spread():
    mix = DiagonalMixture(torch.zeros(1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64),
                          torch.full((1, 1), math.log(3.0), dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    for temperature in (1.0, 0.5):
        draws = mix.sample(g, temperature, num_samples=40000)
        assert abs(draws.mean().item() - 2.0) < 0.05 * 3 * temperature
        assert abs(draws.std().item() / (3.0 * temperature) - 1.0) < 0.03
    two = random_mixture((5,), components=3, dim=2, seed=4)
    cold = two.sample(g, temperature=0.0)  # every draw is the mean of some component
    assert ((cold.unsqueeze(1) - two.means).abs().amax(-1).amin(-1) == 0).all()


def test_resampling_guidance_scale_one_is_an_exact_unguided_draw():
    cond, uncond = random_mixture((4, 6), 3, 2, seed=5), random_mixture((4, 6), 3, 2, seed=6)
    guided = guided_resample(cond, uncond, 1.0, 16, torch.Generator().manual_seed(7), temperature=0.8)
    plain = cond.sample(torch.Generator().manual_seed(7), temperature=0.8)
    assert torch.equal(guided, plain)


def test_resampling_guidance_targets_the_tilted_density():
    """p_c = N(1, 1), p_u = N(0, 1), scale 2: p_c^2 / p_u is N(2, 1); SIR with 64 candidates gets close."""
    def normal(mean):
        return DiagonalMixture(torch.zeros(20000, 1, dtype=torch.float64),
                               torch.full((20000, 1, 1), mean, dtype=torch.float64),
                               torch.zeros(20000, 1, 1, dtype=torch.float64))
    draws = guided_resample(normal(1.0), normal(0.0), 2.0, 64, torch.Generator().manual_seed(8))
    assert abs(draws.mean().item() - 2.0) < 0.06 and abs(draws.std().item() - 1.0) < 0.06
    toward_uncond = guided_resample(normal(1.0), normal(0.0), 0.0, 64, torch.Generator().manual_seed(9))
    assert abs(toward_uncond.mean().item()) < 0.06  # scale 0 -> the unconditional N(0, 1)


# ---------------------------------------------------------------- the prior (§3, §4, §7)

def test_kv_cache_steps_equal_the_full_causal_pass():
    net = randomized(Transformer(16, 2, 2, 32, causal=True).double(), std=0.2)
    h = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    whole = net(h)
    for split in ([1] * 7, [3, 1, 3], [2, 5]):
        cache, parts, start = net.new_cache(), [], 0
        for n in split:
            parts.append(net(h[:, start:start + n], cache))
            start += n
        assert cache.length == 7
        assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-12, rtol=0)


def test_prior_is_causal_and_the_redundant_channels_feed_nothing():
    args = tiny_args(in_channels=3, informative_channels=5)  # D = 12: 5 informative, 7 redundant
    prior = randomized(FarmerPrior(args).double(), std=0.1)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 16, 12, generator=g, dtype=torch.float64)
    y = torch.tensor([2, 9])
    base = prior.mixtures(z, y)
    assert base.tokens.means.shape == (2, 16, 4, 5) and base.redundant.means.shape == (2, 1, 4, 7)
    for i in (0, 6, 15):
        moved = z.clone()
        moved[:, i, :5] += 1.0
        out = prior.mixtures(moved, y)
        assert torch.equal(out.tokens.means[:, :i + 1], base.tokens.means[:, :i + 1]), f"token {i} leaked"
        if i < 15:
            assert (out.tokens.means[:, i + 1] - base.tokens.means[:, i + 1]).abs().max() > 1e-6
        assert (out.redundant.means - base.redundant.means).abs().max() > 1e-6  # sees every informative token
    moved = z.clone()
    moved[:, :, 5:] += 1.0
    out = prior.mixtures(moved, y)
    assert torch.equal(out.tokens.means, base.tokens.means) and torch.equal(out.redundant.means, base.redundant.means)
    other_class = prior.mixtures(z, torch.tensor([3, 9]))
    assert (other_class.tokens.means[0, 0] - base.tokens.means[0, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_prior_sampling_uses_the_teacher_forced_mixtures(cfg_scale):
    """At temperature 0 every sampled token is a component mean of the mixture that a parallel
    (teacher-forced) pass computes for it, so the KV-cached sampler conditions on the right history."""
    args = tiny_args(in_channels=3, informative_channels=5)
    prior = randomized(FarmerPrior(args).double(), std=0.1)
    labels = torch.tensor([0, 4, 9])
    z = prior.sample(labels, cfg_scale, temperature=0.0, generator=torch.Generator().manual_seed(12))
    assert z.shape == (3, 16, 12)
    mix = prior.mixtures(z, labels)
    gap = (z[:, :, None, :5] - mix.tokens.means).abs().amax(-1).amin(-1)  # (B, N): nearest component
    assert gap.max() < 1e-12
    gap = (z[:, :, None, 5:] - mix.redundant.means).abs().amax(-1).amin(-1)
    assert gap.max() < 1e-12


# ---------------------------------------------------------------- the whole model (§5, §6)

def test_model_density_integrates_to_one_over_a_2x2_image():
    """Flow (3 blocks) + prior over a 2x2 one-channel image: a 4-D trapezoid integral (17^4 points)."""
    args = farmer_args("tiny/1", image_size=2, in_channels=1, num_classes=3, flow_blocks=3, flow_width=8,
                       prior_width=8, mixture_components=2)
    assert args.redundant_channels == 0
    model = randomized(FARMER(args).double(), std=0.15)
    axis = torch.linspace(-8, 8, 17, dtype=torch.float64)
    points = torch.cartesian_prod(axis, axis, axis, axis).reshape(-1, 1, 2, 2)
    with torch.no_grad():
        assert model.flow(points[:8])[1].abs().min() > 0.05  # a non-trivial log-determinant everywhere
        density = model.log_density(points, torch.ones(len(points), dtype=torch.long)).exp()
    total = density.reshape(17, 17, 17, 17)
    for _ in range(4):
        total = torch.trapezoid(total, axis, dim=0)
    assert abs(total.item() - 1.0) < 1e-4


def test_model_density_with_the_channel_split_integrates_to_one():
    """One token of two channels: informative mixture times the shared redundant mixture, 2-D grid."""
    args = farmer_args("tiny/1", image_size=1, in_channels=2, num_classes=3, informative_channels=1)
    model = randomized(FARMER(args).double(), std=0.2)
    axis = torch.linspace(-18, 18, 241, dtype=torch.float64)
    points = torch.cartesian_prod(axis, axis).reshape(-1, 2, 1, 1)
    with torch.no_grad():
        density = model.log_density(points, torch.full((len(points),), 2)).exp().reshape(241, 241)
    total = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis, dim=0)
    assert abs(total.item() - 1.0) < 1e-8


def test_bits_per_dim_constant_and_the_loss():
    # A density uniform over the 256 pixel bins of [-1, 1]^D: log p = -D log(256 * BIN_WIDTH) -> exactly 8.
    for num_dims in (1, 64, 3 * 256 * 256):
        log_uniform = torch.tensor(-num_dims * math.log(256 * BIN_WIDTH), dtype=torch.float64)
        assert abs(bits_per_dim_from_log_density(log_uniform, num_dims).item() - 8.0) < 1e-12
    args = tiny_args(class_dropout=0.0)
    model = randomized(FARMER(args), std=0.05)
    x = (torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(13)) / 127.5 - 1)
    y = torch.tensor([0, 1, 2, 3])
    x_tilde = dequantize(x, torch.Generator().manual_seed(14))
    assert ((x_tilde - x).abs() <= BIN_WIDTH / 2).all()
    log_prob = model.log_prob(x, y, torch.Generator().manual_seed(14))
    assert torch.allclose(log_prob, model.log_density(x_tilde, y) + 64 * math.log(BIN_WIDTH))
    bpd = model.bits_per_dim(x, y, torch.Generator().manual_seed(14))
    assert torch.allclose(bpd, -log_prob.mean() / (64 * math.log(2)))
    loss = model.loss(x, y, torch.Generator().manual_seed(14))  # no extra noise, no dropout: same number
    assert torch.allclose(loss, bpd)
    loss.backward()
    for part in (model.flow, model.prior):
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0
    noisy = model.loss(x, y, torch.Generator().manual_seed(14), noise_std=0.1)
    assert not torch.allclose(noisy, bpd)


def test_label_dropout_uses_the_null_class_at_the_rate():
    y = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(15))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(y, 0.0, 10, None), y)


def test_bad_inputs_name_the_problem():
    model = FARMER(tiny_args())
    x, y = torch.zeros(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"x must be \(B, 1, 8, 8\)"):
        model.log_prob(torch.zeros(2, 3, 8, 8), y)
    with pytest.raises(ValueError, match="y must be an integer tensor of shape"):
        model.log_prob(x, y.float())
    with pytest.raises(ValueError, match=r"z must be \(B, 16, 4\)"):
        model.flow.inverse(torch.zeros(2, 16, 3))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        model.sample(torch.tensor([11]))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(torch.tensor([1]), temperature=-1.0)
    with pytest.raises(ValueError, match="x_or_z must be"):
        distill_loss(FarmerInverseStudent(tiny_args()), model.flow, torch.zeros(3), None)


def test_bf16_autocast_loss_is_finite_and_close():
    model = randomized(FARMER(tiny_args()), std=0.05)
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    ref = model.loss(x, y, torch.Generator().manual_seed(16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.loss(x, y, torch.Generator().manual_seed(16))
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(low.item() - ref.item()) < 0.05 * abs(ref.item())


# ---------------------------------------------------------------- training on digits, sampling, distillation (§6-§8)

def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits (8x8, 17 levels) as our shards hold them: uint8, then v / 127.5 - 1."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.round(data.images * 255 / 16).astype(np.uint8)
    return torch.from_numpy(pixels).float().div(127.5).sub(1).unsqueeze(1), torch.from_numpy(data.target).long()


@pytest.fixture(scope="module")
def trained_digits():
    """A tiny FARMER after 300 AdamW steps on 1500 digits (about 10 s on one core)."""
    torch.set_num_threads(1)
    images, labels = digits()
    torch.manual_seed(0)
    model = FARMER(tiny_args())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        index = torch.randint(0, 1500, (128,), generator=g)
        loss = model.loss(images[index], labels[index], g)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), images, labels, losses


def test_training_on_digits_lowers_bits_per_dim_well_below_uniform(trained_digits):
    model, images, labels, losses = trained_digits
    with torch.no_grad():
        held_out = model.bits_per_dim(images[1500:], labels[1500:], torch.Generator().manual_seed(17)).item()
    assert np.mean(losses[:10]) > 8.0  # starts above the uniform 8 bits/dim
    assert held_out < 7.0, f"held-out bits/dim {held_out:.3f}"


def test_guided_and_unguided_samples_have_the_image_shape_and_range(trained_digits):
    model = trained_digits[0]
    labels = torch.arange(10)
    plain = model.sample(labels, generator=torch.Generator().manual_seed(18))
    again = model.sample(labels, cfg_scale=1.0, temperature=1.0, generator=torch.Generator().manual_seed(18))
    guided = model.sample(labels, cfg_scale=3.0, temperature=0.9, generator=torch.Generator().manual_seed(18))
    for images in (plain, guided):
        assert images.shape == (10, 1, 8, 8) and torch.isfinite(images).all()
        assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(plain, again) and not torch.equal(plain, guided)
    noisy = FARMER(tiny_args(noise_std=0.05))  # the score-based denoising step runs
    out = noisy.sample(torch.tensor([1, 2]), cfg_scale=2.0, generator=torch.Generator().manual_seed(19))
    assert out.shape == (2, 1, 8, 8) and out.min() >= -1 and out.max() <= 1


def test_distilled_student_reproduces_the_flow_inverse_on_held_out_latents(trained_digits):
    """300 steps on (F(x~), x~) pairs; on held-out digits' latents the one-pass student matches the
    sequential inverse to a mean absolute error under 0.08 (pixels in [-1, 1]) and 4x below the identity's."""
    model, images, labels, _ = trained_digits
    flow = model.flow
    torch.manual_seed(1)
    student = FarmerInverseStudent(flow.args)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(20)
    for _ in range(300):
        index = torch.randint(0, 1500, (128,), generator=g)
        loss = distill_loss(student, flow, images[index], labels[index], g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        z, _ = flow(dequantize(images[1500:], torch.Generator().manual_seed(21)))
        target = flow.inverse(z)
        error = (student(z) - target).abs().mean().item()
        identity_error = (unpatchify(z, 2, 1) - target).abs().mean().item()
        latent_loss = distill_loss(student, flow, z[:32], None)  # latent input: the sequential inverse is the target
    assert error < 0.08 and error < identity_error / 4, (error, identity_error)
    assert torch.allclose(latent_loss, ((student(z[:32]) - target[:32]) ** 2).mean())
    fast = model.sample(torch.arange(10), student=student, generator=torch.Generator().manual_seed(22))
    assert fast.shape == (10, 1, 8, 8) and fast.min() >= -1 and fast.max() <= 1


def test_farmer_modules_do_not_import_the_config_package():
    """The model package moves below config: FARMER's modules import none of it (directly)."""
    import ast
    from pathlib import Path

    model_dir = Path(__file__).resolve().parents[1] / "arflow_scale" / "model"
    files = sorted(model_dir.glob("farmer*.py")) + [model_dir / name for name in
                                                    ("mixture.py", "rng.py", "causal_transformer.py", "embeddings.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert "config" not in module and module not in (".arflow", ".sizes", ".flops"), (path.name, module)
            elif isinstance(node, ast.Import):
                assert not any("config" in alias.name for alias in node.names), path.name
