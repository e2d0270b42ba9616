"""GPU-speed paths on CPU: the attention backend setting, blocks compiled in place, the compiled sampler, fused
AdamW through DeepSpeed, a bf16 engine's autocast, compiled ZeRO-3 on torch's linear, the compiler's cache folder."""
from __future__ import annotations

import os

import pytest
import torch

from arflow_scale.config import ConfigError, config_from_dict
from arflow_scale.flow import sample
from arflow_scale.model import build_model
from arflow_scale.model.attention import chunk_attention, resolve_backend
from arflow_scale.model.compile import compile_forward, is_compiled, use_user_compile_cache
from arflow_scale.tasks import SampleSettings, task_for
from arflow_scale.train.deepspeed_config import build_deepspeed_config

from conftest import randomized

pytestmark = pytest.mark.usefixtures("one_thread")
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")


def tiny(**overrides):
    """The model and shapes tools/gpu_bench.py --smoke uses (so compiled graphs are shared through the cache)."""
    return build_model("tiny/2", **{"image_size": 8, "in_channels": 1, "num_classes": 10, "k": 3, **overrides})


def forward_and_grads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t, y = torch.randn(2, 3, 1, 8, 8, generator=g), torch.rand(2, 3, generator=g), torch.tensor([1, 7])
    out = model(x, t, y)
    out.square().sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_auto_backend_is_torch_on_cpu_and_explicit_choices_pass_through():
    q = torch.zeros(1, 2, 16, 32)
    assert resolve_backend("auto", q) == "torch"
    assert resolve_backend("auto", q.to(torch.float64)) == "torch"
    assert [resolve_backend(b, q) for b in ("torch", "triton", "triton_sdpa")] == ["torch", "triton", "triton_sdpa"]
    assert tiny().blocks[0].attn.backend == "auto"
    with pytest.raises(ConfigError, match="model.attention_backend"):
        config_from_dict({}, ["model.attention_backend=cuda"])


@interpreter
@pytest.mark.parametrize("backend", ["triton", "triton_sdpa"])
def test_model_on_the_triton_backend_matches_the_torch_reference(backend):
    """`model.attention_backend=triton` (or `triton_sdpa`) runs the fused hybrid kernels inside the model: same
    outputs and gradients as the plain-PyTorch reference (fp32, the interpreter on CPU)."""
    results = []
    for backend in ("torch", backend):
        torch.manual_seed(0)
        results.append(forward_and_grads(randomized(tiny(attention_backend=backend))))
    (ref, ref_grads), (out, grads) = results
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name
    assert ref_grads["blocks.0.attn.decay.weight"].abs().max() > 0  # the decay path carries gradient


def test_full_mode_on_the_triton_backend_is_the_flex_block_mask():
    """The dense ablation on the fast backend (flex_attention's block mask) equals the masked-SDPA reference;
    on CPU flex runs its eager forward only."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3 * 16, 16, generator=g) for _ in range(3))
    flex, (keys, _) = chunk_attention("full", q, k, v, None, 16, backend="triton")
    ref, _ = chunk_attention("full", q, k, v, None, 16, backend="torch")
    assert torch.allclose(flex, ref, atol=1e-5) and keys is k


def test_compile_forward_is_in_place_once_and_keeps_the_state_dict():
    model = tiny()
    keys = list(model.state_dict())
    block = model.blocks[0]
    assert compile_forward(block) is block and is_compiled(block)
    compiled = block.forward
    compile_forward(block)
    assert block.forward is compiled and not is_compiled(model.blocks[1])
    assert list(model.state_dict()) == keys
    assert task_for(model.config).compile_units(model) == list(model.blocks)


def test_compiler_cache_goes_to_the_user_cache_folder(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch._dynamo writes
    assert use_user_compile_cache() == str(tmp_path / "arflow_scale" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_user_compile_cache() == str(tmp_path / "mine")


def test_compiled_sampler_equals_the_eager_one():
    """The one-image step compiled (inductor on CPU) draws the same images as the eager sampler, within fp32
    reordering; the compiled function really ran (graphs were captured); None means eager on CPU."""
    from torch._dynamo.utils import counters

    model = randomized(tiny()).eval()
    labels = torch.tensor([3, 8])
    eager = sample(model, labels, steps=4, cfg_scale=1.5, generator=2, compile=False)
    assert torch.equal(sample(model, labels, steps=4, cfg_scale=1.5, generator=2), eager)  # default on CPU: eager
    captured = counters["stats"]["unique_graphs"]
    compiled = task_for(model.config).sample(model, labels, SampleSettings("ode", 4, 1.5, compile=True),
                                             torch.Generator().manual_seed(2))
    assert counters["stats"]["unique_graphs"] > captured  # the step was compiled, not run eagerly
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)
    assert eager.abs().max() > 0.1


def test_sampling_step_traces_whole_on_the_reference_attention():
    """The one-image step on the plain-PyTorch attention is one graph, which CUDA graphs capture whole on a GPU
    (the fused kernels are a graph break in every block, their launches running between the graphs)."""
    import torch._dynamo

    from arflow_scale.flow.samplers import model_step

    model = randomized(tiny(depth=2, attention_backend="torch")).eval()
    x, t, labels = torch.randn(2, 1, 1, 8, 8), torch.rand(2, 1), torch.tensor([3, 8])
    with torch.no_grad():
        _, states = model_step(model, x, t, labels, tuple(model.new_cache().states))  # a step with history
        explained = torch._dynamo.explain(model_step)(model, x, t, labels, states)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_full_mode_samples_eagerly_even_when_compile_is_asked():
    from arflow_scale.flow.samplers import use_compiled

    cpu = torch.device("cpu")
    assert use_compiled(True, tiny(), cpu) and not use_compiled(None, tiny(), cpu)
    assert not use_compiled(True, tiny(attention="full"), cpu)


def test_fused_adamw_on_cuda_only():
    cfg = config_from_dict({}, ["train.precision=fp32"])
    assert build_deepspeed_config(cfg, 1, "cuda")["optimizer"]["params"]["fused"] is True
    assert "fused" not in build_deepspeed_config(cfg, 1, "cpu")["optimizer"]["params"]


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo process group for DeepSpeed engines built in this process."""
    from arflow_scale.bench.process_group import single_rank_group

    with single_rank_group(torch.device("cpu")):
        yield


def test_deepspeed_hands_fused_to_torch_adamw(one_rank_group):
    """The CUDA config's `fused` reaches torch.optim.AdamW through DeepSpeed's torch_adam path (torch's fused
    AdamW also runs on CPU, which lets this check the wiring here); the default config leaves it unfused."""
    from arflow_scale.train.engine import build_engine

    cfg = config_from_dict({}, ["train.precision=fp32", "train.zero_stage=2", "data.batch_size=2"])
    for device_type, fused in (("cuda", True), ("cpu", None)):
        torch.manual_seed(0)
        engine = build_engine(cfg, tiny(), 1, device_type, "fp32").engine
        optimizer = engine.basic_optimizer
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is fused


def test_bf16_engine_computes_under_autocast_where_deepspeed_turns_it_off(one_rank_group):
    """DeepSpeed's engine switches the caller's autocast off around its module on CUDA, so `arflow train`'s bf16
    step fed an fp32 batch to bf16 weights and failed at the first layer (seen on an H200). A bf16 engine's module
    runs under bf16 autocast itself: with autocast off around the call (DeepSpeed's CUDA behaviour, here on CPU)
    the fp32 batch trains, with the same output as under the caller's autocast."""
    from arflow_scale.train.engine import autocast_inside, build_engine

    cfg = config_from_dict({}, ["train.precision=bf16", "train.zero_stage=2", "data.batch_size=2"])
    torch.manual_seed(0)
    model = randomized(tiny())
    engine = build_engine(cfg, model, 1, "cpu", "bf16").engine
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 3, 1, 8, 8, generator=g), torch.rand(2, 3, generator=g), torch.tensor([1, 7])
    with torch.autocast("cpu", enabled=False):
        out = engine(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_caller = engine(x, t, y)
    assert torch.equal(out, under_caller) and out.abs().max() > 0
    assert not torch.is_autocast_enabled("cpu")  # the hooks left the context they entered
    engine.backward(out.float().square().mean())
    engine.step()
    hooks = len(model._forward_pre_hooks), len(model._forward_hooks)
    autocast_inside(model, "cpu")  # a second call (another engine over the same module) adds nothing
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


@pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")  # DeepSpeed's ZeRO-3 collectives
def test_compiled_zero3_blocks_run_on_torchs_linear(one_rank_group):
    """A ZeRO-3 engine swaps DeepSpeed's autograd wrapper in for F.linear for the whole process; compiled blocks
    traced its parameter-id checks and recompiled per block on torch 2.11 (the limit of 8 hit at XL/2 on an
    H200). A compiled ZeRO-3 engine turns the wrapper off and restores torch's F.linear, also after an eager
    ZeRO-3 engine swapped it in; its step runs and matches the eager engine's loss."""
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from arflow_scale.train.engine import build_engine, restore_torch_linear

    losses = {}
    for compiled in (False, True):
        cfg = config_from_dict({}, ["train.zero_stage=3", f"train.compile={str(compiled).lower()}",
                                    "data.batch_size=2"])
        assert build_deepspeed_config(cfg, 1, "cpu")["zero_optimization"]["memory_efficient_linear"] is not compiled
        torch.manual_seed(0)
        model = randomized(tiny())
        engine = build_engine(cfg, model, 1, "cpu", "fp32", compile_units=list(model.blocks)).engine
        assert (F.linear is zero3_linear_wrap) is not compiled
        g = torch.Generator().manual_seed(1)
        x, t, y = torch.randn(2, 3, 1, 8, 8, generator=g), torch.rand(2, 3, generator=g), torch.tensor([1, 7])
        loss = engine(x, t, y).square().mean()
        engine.backward(loss)
        engine.step()
        losses[compiled] = loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert restore_torch_linear() is False  # nothing left to restore


def test_compile_without_blocks_is_refused(one_rank_group):
    from arflow_scale.train.engine import build_engine

    cfg = config_from_dict({}, ["train.compile=true", "data.batch_size=2"])
    with pytest.raises(ValueError, match="train.compile"):
        build_engine(cfg, tiny(), 1, "cpu", "fp32")
