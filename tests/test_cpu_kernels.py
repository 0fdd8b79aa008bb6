"""cpu_kernels.py: how the routes are applied to a model, and where they step aside for F.linear.
(Their results against F.linear are in test_model.py, their batch invariance in
test_batch_invariance.py.)"""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanosample import cpu_kernels
from nanosample.cpu_kernels import CPULinear, linear, use_cpu_kernels
from nanosample.model import GPT, GPTConfig

CONFIG = GPTConfig(block_size=16, vocab_size=90, n_layer=2, n_head=2, n_embd=32)


def operands(rows=3):
    # shapes where oneDNN's sums and MKL's differ in the last bits, so `equal` tells them apart
    gen = torch.Generator().manual_seed(0)
    return torch.randn(rows, 768, generator=gen), torch.randn(2304, 768, generator=gen)


def test_the_route_differs_from_f_linear_in_rounding_only():
    x, weight = operands()
    routed, plain = linear(x, weight), F.linear(x, weight)
    assert not torch.equal(routed, plain)  # else the step-aside tests below prove nothing
    assert (routed - plain).abs().max().item() <= 1e-4


def test_use_cpu_kernels_keeps_every_parameter_and_its_name():
    torch.manual_seed(0)
    gpt = GPT(CONFIG).eval()
    before = dict(gpt.named_parameters())
    keys = list(gpt.state_dict())
    assert use_cpu_kernels(gpt) is gpt
    linears = [m for m in gpt.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * CONFIG.n_layer + 1 and all(type(m) is CPULinear for m in linears)
    assert dict(gpt.named_parameters()) == before  # the same Parameter objects
    assert list(gpt.state_dict()) == keys
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # still tied
    assert not gpt.training and not gpt.lm_head.training


def test_use_cpu_kernels_leaves_models_off_the_cpu_alone():
    with torch.device("meta"):
        gpt = GPT(CONFIG)
    use_cpu_kernels(gpt)
    assert not any(isinstance(m, CPULinear) for m in gpt.modules())


def test_without_the_private_op_everything_is_f_linear(monkeypatch):
    torch.manual_seed(0)
    routed = use_cpu_kernels(GPT(CONFIG).eval())
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # a torch without it
    assert cpu_kernels.onednn_linear_op() is None
    x, weight = operands()
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    fresh = use_cpu_kernels(GPT(CONFIG).eval())
    assert not any(isinstance(m, CPULinear) for m in fresh.modules())  # left plain
    fresh.load_state_dict(routed.state_dict())
    idx = torch.randint(0, 90, (2, 5))
    with torch.no_grad():  # a model routed before the op went away runs on F.linear
        assert torch.equal(routed(idx), fresh(idx))


def test_under_torch_compile_the_route_steps_aside(monkeypatch):
    x, weight = operands()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_under_autocast_and_autograd_the_route_steps_aside():
    x, weight = operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, weight)
        assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x, weight))
    trained = weight.clone().requires_grad_()
    y = linear(x, trained)
    assert torch.equal(y, F.linear(x, weight)) and y.grad_fn is not None
    with torch.no_grad():  # no autograd: the route again
        assert torch.equal(linear(x, trained), linear(x, weight))
