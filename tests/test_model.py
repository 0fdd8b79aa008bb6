"""model.py's own pieces: the batched matrix-vector route of `linear` against F.linear.
(Parity with transformers and the KV cache are tested in test_loader.py.)"""

import pytest
import torch
import torch.nn.functional as F

from nanosample import model
from nanosample.model import GPT, GPTConfig, KVCache, linear


@pytest.mark.parametrize("out_features", [7, 256, 600, 50257])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 1), (2, 2), (5, 1), (4, 16)])
def test_linear_matches_f_linear(out_features, shape):
    # 1-4 rows take the bmm route (blocks of 256 weight rows, the rest on its own); 5 rows
    # and more oneDNN's linear. Same sums in another order: float32 rounding apart.
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


def test_decode_through_the_bmm_route_equals_the_full_forward():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32)).eval()
    seq = torch.randint(0, 300, (2, 12))
    cache = KVCache(gpt.config, 2, max_len=12)
    with torch.no_grad():
        full = gpt(seq)                                    # F.linear everywhere (24 rows)
        gpt(seq[:, :8], cache=cache)
        for t in range(8, 12):                             # 2 rows: the bmm route
            step = gpt(seq[:, t:t + 1], cache=cache)
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-5
    assert model.FEW_ROWS >= 2
