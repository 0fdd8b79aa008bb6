"""cpu_kernels.py's `linear` (oneDNN's linear on the CPU in fp32) against F.linear, and a
decode through it. (Parity with transformers and the KV cache are tested in test_loader.py,
batch invariance in test_batch_invariance.py.)"""

import pytest
import torch
import torch.nn.functional as F

from nanosample import cpu_kernels as model
from nanosample.cpu_kernels import linear, use_cpu_kernels
from nanosample.model import GPT, GPTConfig, KVCache


@pytest.mark.parametrize("out_features", [7, 256, 600, 50257])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 1), (2, 2), (5, 1), (4, 16)])
def test_linear_matches_f_linear(out_features, shape):
    # Every row count takes oneDNN's linear (one row padded to FEW_ROWS rows). Same sums in
    # another order: float32 rounding apart.
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, 48, generator=gen) * 0.1
    bias = torch.randn(out_features, generator=gen)
    x = torch.randn(*shape, 48, generator=gen)
    for b in (bias, None):
        got = linear(x, weight, b)
        assert got.shape == (*shape, out_features)
        assert (got - F.linear(x, weight, b)).abs().max().item() <= 1e-5


def test_linear_falls_back_where_the_routes_do_not_apply():
    weight = torch.randn(300, 32)
    x = torch.randn(1, 1, 32)
    transposed = weight.t().contiguous().t()  # same values, not row-contiguous
    assert torch.equal(linear(x, transposed), F.linear(x, transposed))
    half = weight.bfloat16()
    assert torch.equal(linear(x.bfloat16(), half), F.linear(x.bfloat16(), half))
    trained = weight.clone().requires_grad_()  # autograd: F.linear, whose backward exists
    for rows in (1, 8):
        y = linear(torch.randn(rows, 32), trained)
        assert y.grad_fn is not None and "Mm" in type(y.grad_fn).__name__


def test_decode_through_the_cpu_kernels_equals_the_full_forward():
    torch.manual_seed(0)
    gpt = use_cpu_kernels(GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2,
                                        n_embd=32)).eval())
    seq = torch.randint(0, 300, (2, 12))
    cache = KVCache(gpt.config, 2, max_len=12)
    with torch.no_grad():
        full = gpt(seq)                                    # oneDNN's linear (24 rows)
        gpt(seq[:, :8], cache=cache)
        for t in range(8, 12):                             # 2 rows
            step = gpt(seq[:, t:t + 1], cache=cache)
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-5
    assert model.FEW_ROWS >= 2
