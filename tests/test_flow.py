"""Flow-matching objective and samplers: exact randomness, one call per step, CFG, and learning."""
from __future__ import annotations

import pytest
import torch

from arflow_scale.flow import (draw_noise_levels, drop_labels, flow_matching_loss, interpolate, sample,
                               unwrap_model)
from arflow_scale.model import build_model

from conftest import randomized

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(channels=1, classes=4, k=3):
    return build_model("tiny/2", image_size=8, in_channels=channels, num_classes=classes, k=k)


class Wrapper(torch.nn.Module):
    """Stands for a DeepSpeed engine / DDP: forwards to `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_noise_levels_sorted_in_unit_interval():
    t = draw_noise_levels(64, 5, torch.Generator().manual_seed(0))
    assert t.shape == (64, 5)
    assert (t[:, 1:] >= t[:, :-1]).all() and (t >= 0).all() and (t < 1).all()
    assert t[:, 0].mean() < 0.3 and t[:, -1].mean() > 0.7  # noisiest image first


def test_interpolant_endpoints_and_target():
    x, eps = torch.randn(2, 3, 1, 4, 4), torch.randn(2, 3, 1, 4, 4)
    t = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
    x_t, target = interpolate(x, eps, t)
    assert torch.equal(x_t[0, 0], eps[0, 0]) and torch.equal(x_t[0, 2], x[0, 2])
    assert torch.allclose(x_t[1, 1], 0.25 * x[1, 1] + 0.75 * eps[1, 1])
    assert torch.equal(target, x - eps)


def test_label_dropout_per_sequence_rate():
    y = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(y, 7, 0.3, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 7}
    assert abs((dropped == 7).float().mean().item() - 0.3) < 0.02
    assert torch.equal(drop_labels(y[:10], 7, 0.0, torch.Generator()), y[:10])


def test_loss_equals_manual_computation_from_the_same_generator():
    model = randomized(tiny())
    x, y = torch.randn(4, 3, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = flow_matching_loss(Wrapper(model), x, y, torch.Generator().manual_seed(5), class_dropout=0.5)
    g = torch.Generator().manual_seed(5)
    t = torch.rand(4, 3, generator=g).sort(dim=1).values
    eps = torch.randn(x.shape, generator=g)
    drop = torch.rand(4, generator=g) < 0.5
    y_in = torch.where(drop, torch.full_like(y, model.null_class), y)
    tt = t[:, :, None, None, None]
    expected = ((model(tt * x + (1 - tt) * eps, t, y_in) - (x - eps)) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    again = flow_matching_loss(model, x, y, torch.Generator().manual_seed(5), class_dropout=0.5)
    assert torch.equal(loss, again)


def test_loss_rejects_bad_arguments():
    model = tiny()
    x, y = torch.randn(2, 3, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="class_dropout"):
        flow_matching_loss(model, x, y, torch.Generator(), class_dropout=1.5)
    with pytest.raises(ValueError, match="not an ARFlow"):
        unwrap_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_same_seed_same_images_and_one_call_per_step(sampler):
    model = randomized(tiny())
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[1]), with_kwargs=True)
    labels = torch.tensor([0, 1, 2])
    a = sample(model, labels, sampler=sampler, steps=7, generator=torch.Generator().manual_seed(3))
    assert calls == [1] * 7  # one model call per step, one image per call
    b = sample(model, labels, sampler=sampler, steps=7, generator=3)
    c = sample(model, labels, sampler=sampler, steps=7, generator=4)
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def manual_cfg_ode(model, labels, steps, scale, seed, guided_channels=None):
    """Reference: two separate caches, two model calls per step."""
    d = model.dims
    x = torch.randn(labels.shape[0], d.in_channels, d.image_size, d.image_size,
                    generator=torch.Generator().manual_seed(seed))
    cond_cache, uncond_cache = model.new_cache(), model.new_cache()
    null = torch.full_like(labels, model.null_class)
    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for t0, t1 in zip(times[:-1], times[1:]):
            t = torch.full((labels.shape[0], 1), t0)
            v_c = model(x[:, None], t, labels, cache=cond_cache)[:, 0]
            v_u = model(x[:, None], t, null, cache=uncond_cache)[:, 0]
            v = v_u + scale * (v_c - v_u)
            if guided_channels is not None:
                v = torch.cat([v[:, :guided_channels], v_c[:, guided_channels:]], dim=1)
            x = x + (t1 - t0) * v
    return x


@pytest.mark.parametrize("guided_channels", [None, 3])
def test_cfg_equals_separate_conditional_and_unconditional_caches(guided_channels):
    model = randomized(tiny(channels=4)).eval()
    labels = torch.tensor([0, 3])
    out = sample(model, labels, steps=5, cfg_scale=1.5, guided_channels=guided_channels, generator=2)
    ref = manual_cfg_ode(model, labels, 5, 1.5, 2, guided_channels)
    assert torch.allclose(out, ref, atol=1e-5)
    plain = sample(model, labels, steps=5, cfg_scale=1.0, generator=2)
    assert not torch.allclose(out, plain, atol=1e-4)  # guidance changes the result
    sde = sample(model, labels, sampler="sde", steps=5, cfg_scale=1.5, guided_channels=guided_channels, generator=2)
    assert torch.isfinite(sde).all()


def test_sampler_rejects_bad_arguments():
    model = tiny()
    labels = torch.tensor([0])
    with pytest.raises(ValueError, match="sampler"):
        sample(model, labels, sampler="heun")
    with pytest.raises(ValueError, match="steps"):
        sample(model, labels, steps=0)
    with pytest.raises(ValueError, match="guided_channels"):
        sample(model, labels, cfg_scale=2.0, guided_channels=3)


def toy_batch(generator, n=16, k=3):
    """Two classes: dark (0) and bright (1) 8x8 grey images with noise, in [-1, 1]."""
    y = torch.randint(0, 2, (n,), generator=generator)
    level = torch.where(y == 1, 0.6, -0.6)[:, None, None, None, None]
    return (level + 0.2 * torch.randn(n, k, 1, 8, 8, generator=generator)).clamp(-1, 1), y


def test_tiny_model_learns_two_classes():
    """Trained a few hundred CPU steps, samples of each class are classified as that class."""
    torch.manual_seed(0)
    model = build_model("tiny/2", image_size=8, in_channels=1, num_classes=2, k=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 16 + [1] * 16)
    untrained = sample(model, labels, steps=10, generator=1)
    for _ in range(300):
        x, y = toy_batch(generator)
        loss = flow_matching_loss(model, x, y, generator, class_dropout=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = {}
    for sampler, kwargs in [("ode", {}), ("sde", {}), ("ode", {"cfg_scale": 1.5})]:
        images = sample(model, labels, sampler=sampler, steps=10, generator=1, **kwargs)
        predicted = (images.mean(dim=(1, 2, 3)) > 0).long()
        accuracy[(sampler, *kwargs)] = (predicted == labels).float().mean().item()
    assert all(acc >= 0.9 for acc in accuracy.values()), accuracy
    brightness = images.mean(dim=(1, 2, 3))
    assert brightness[:16].mean() < -0.3 and brightness[16:].mean() > 0.3  # near the class levels
    assert ((untrained.mean(dim=(1, 2, 3)) > 0).long() == labels).float().mean() < 0.8
