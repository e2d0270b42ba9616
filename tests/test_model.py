"""The ARFlow transformer: causality, cache == full forward, checkpointing, zero-init, config errors."""
from __future__ import annotations

import pytest
import torch

from arflow_scale.config import ConfigError, ModelConfig
from arflow_scale.model import SIZES, build_model, parse_size, resolve

from conftest import randomized

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ["hybrid", "full", "intra"]


def tiny(mode="hybrid", k=4, **kw):
    return build_model("tiny/2", image_size=8, in_channels=3, num_classes=5, k=k, attention=mode, **kw)


def inputs(batch=2, k=4, channels=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, channels, size, size, generator=g)
    t = torch.rand(batch, k, generator=g).sort(dim=1).values
    y = torch.randint(0, 5, (batch,), generator=g)
    return x, t, y


def test_output_shape_and_zero_init_output():
    model = tiny()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0
    assert model.null_class == 5
    out.sum().backward()  # zero-init still lets gradients reach the final layer
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_causality_through_the_model(mode):
    model = randomized(tiny(mode)).eval()
    x, t, y = inputs()
    base = model(x, t, y)
    for j in (1, 2, 3):
        x2, t2 = x.clone(), t.clone()
        x2[:, j] += torch.randn_like(x2[:, j])
        t2[:, j] = (t2[:, j] + 0.3) % 1.0
        out = model(x2, t2, y)
        assert torch.allclose(out[:, :j], base[:, :j], atol=1e-6), f"image {j} leaked backwards"
        assert (out[:, j] - base[:, j]).abs().max() > 1e-3
    if mode != "intra":  # history reaches later images
        x2 = x.clone()
        x2[:, 0] += 1.0
        assert (model(x2, t, y)[:, 3] - base[:, 3]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", [[1, 1, 1, 1], [2, 1, 1]])
def test_one_image_at_a_time_with_cache_equals_full_forward(mode, split):
    model = randomized(tiny(mode)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        whole = model(x, t, y)
        cache, parts, start = model.new_cache(), [], 0
        for n in split:
            parts.append(model(x[:, start:start + n], t[:, start:start + n], y, cache=cache))
            start += n
    assert cache.num_images == 4
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=0)
    cache.reset()
    assert cache.num_images == 0 and all(s is None for s in cache.states)


def test_cache_grows_past_training_length():
    """Sampling runs more steps than K: the hybrid state stays (B, H, D, D)."""
    model = randomized(tiny("hybrid", k=2)).eval()
    x, t, y = inputs(k=1)
    cache = model.new_cache()
    with torch.no_grad():
        for _ in range(6):
            out = model(x, t, y, cache=cache)
    assert torch.isfinite(out).all()
    assert cache.states[0].shape == (2, 2, 32, 32)


@pytest.mark.parametrize("mode", ["all", "every:2"])
def test_activation_checkpointing_changes_no_gradient(mode):
    reference = randomized(build_model("custom/2", depth=3, width=64, heads=2, image_size=8,
                                       in_channels=3, num_classes=5, k=3))
    checkpointed = randomized(build_model("custom/2", depth=3, width=64, heads=2, image_size=8, in_channels=3,
                                          num_classes=5, k=3, activation_checkpointing=mode))
    assert checkpointed.checkpoint_every_n in (1, 2)
    x, t, y = inputs(k=3)
    grads = []
    for model in (reference, checkpointed):
        loss = (model(x, t, y) ** 2).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_bf16_autocast_forward_runs():
    model = randomized(tiny())
    x, t, y = inputs()
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_bad_inputs_name_the_problem():
    model = tiny()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :, :1], t, y)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:, :2], y)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, y[:1])


def test_size_registry_and_parsing():
    assert parse_size("XL/2") == ("XL", 2)
    assert SIZES["XL"] == (28, 1152, 18)
    dims = resolve(ModelConfig(size="B/4", image_size=32, in_channels=4, k=5))
    assert (dims.depth, dims.width, dims.heads, dims.patch, dims.head_dim) == (12, 768, 12, 4, 64)
    assert dims.tokens_per_image == 64 and dims.sequence_length == 320
    custom = build_model("custom/2", depth=1, width=96, heads=3, image_size=4, in_channels=1, num_classes=2, k=2)
    assert (custom.dims.depth, custom.dims.width, custom.dims.heads) == (1, 96, 3)
    scaled = resolve(ModelConfig(size="S/2", depth=6))  # registry entry with one override
    assert (scaled.depth, scaled.width, scaled.heads) == (6, 384, 6)


@pytest.mark.parametrize("overrides, key", [
    ({"size": "XXL/2"}, "size"),
    ({"size": "XL/3"}, "size"),
    ({"size": "custom/2"}, "depth"),
    ({"image_size": 9}, "image_size"),
    ({"k": 0}, "k"),
    ({"attention": "sparse"}, "attention"),
    ({"activation_checkpointing": "some"}, "activation_checkpointing"),
    ({"width": 66, "heads": 3}, "width"),
    ({"heads": 5}, "heads"),  # registry width 64 of tiny is not divisible by 5
    ({"colour": 1}, "colour"),
])
def test_bad_config_names_the_key(overrides, key):
    size = overrides.pop("size", "tiny/2")
    with pytest.raises(ConfigError, match=key):
        build_model(size, **overrides)


def test_build_model_from_config_with_overrides():
    cfg = ModelConfig(size="tiny/2", image_size=8, in_channels=1, num_classes=3, k=2)
    model = build_model(cfg, k=3)
    assert model.config.k == 3 and model.config.num_classes == 3 and cfg.k == 2


def test_embeddings_shapes_and_properties():
    from arflow_scale.model.embeddings import PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d

    pos = sincos_pos_embed_2d(64, 4)
    assert pos.shape == (16, 64) and pos.abs().max() <= 1.0
    assert torch.unique(pos, dim=0).shape[0] == 16  # every patch position distinct
    assert torch.allclose(pos[1, :32], pos[5, :32]) and not torch.allclose(pos[1, 32:], pos[5, 32:])
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(30, 4)
    tokens = PatchEmbed(3, 64, 2)(torch.randn(2, 5, 3, 8, 8))
    assert tokens.shape == (2, 5, 16, 64)
    embed = TimestepEmbedder(32)
    assert embed(torch.rand(2, 5)).shape == (2, 5, 32)
    assert not torch.allclose(embed.sinusoid(torch.tensor(0.0)), embed.sinusoid(torch.tensor(1.0)))


def test_aligned_linear_equals_linear_and_keeps_the_state_dict():
    """The decay gate's padded matmul (CUDA only: unaligned 18-wide outputs fall to slow kernels) gives
    F.linear's output and gradients; the layer keeps nn.Linear's parameters and state-dict keys."""
    from arflow_scale.model.aligned import AlignedLinear, aligned_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 32, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(18, 32, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(18, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 5, 18, generator=g, dtype=torch.float64)
    results = []
    for fn in (torch.nn.functional.linear, aligned_linear):
        out = fn(x, weight, bias)
        out.backward(grad)
        results.append([out.detach(), *(t.grad.clone() for t in (x, weight, bias))])
        for t in (x, weight, bias):
            t.grad = None
    for padded, plain in zip(results[1], results[0]):
        assert padded.shape == plain.shape and torch.allclose(padded, plain, rtol=1e-12, atol=1e-12)
    assert aligned_linear(x, weight, None).shape == (4, 5, 18)
    layer = tiny().blocks[0].attn.decay
    assert isinstance(layer, AlignedLinear) and isinstance(layer, torch.nn.Linear)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {"weight": (2, 64), "bias": (2,)}
    x32 = torch.randn(3, 64, generator=g)
    assert torch.equal(layer(x32), torch.nn.functional.linear(x32, layer.weight, layer.bias))  # CPU: nn.Linear's path


def test_use_tf32_sets_the_cuda_matmul_precision_and_leaves_cpu_alone():
    from arflow_scale.model.precision import use_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        use_tf32(True, "cpu")
        assert torch.get_float32_matmul_precision() == "highest"
        use_tf32(True, torch.device("cuda", 0))  # the flag is global: settable without a GPU
        assert torch.get_float32_matmul_precision() == "high"
        use_tf32(False, "cuda")
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
