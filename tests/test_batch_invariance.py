"""Batch invariance: a row's logits, and so sample i's text, do not depend on how many rows
share the batch (cpu_kernels.py's contract, and the README's promise).

The model is GPT-2-shaped where it matters, its vocabulary (50304, nanoGPT's padded GPT-2),
and small elsewhere to stay fast. Its random weights give near-flat rows: top-p 0.9 keeps
~45,000 tokens, where a difference of one float32 rounding in a logit is enough to draw
another token (issue 14's finding 4: samples differed with plain F.linear, whose kernels
change with the row count).
"""

import pytest
import torch

from nanosample.cpu_kernels import CPULinear, linear
from nanosample.generate import generate
from nanosample.loader import load_model, save_native
from nanosample.model import GPT, GPTConfig, KVCache
from nanosample.sampling import SamplingParams
from nanosample.tokenizer import gpt2_tokenizer

VOCAB = 50304


@pytest.fixture(scope="module")
def gpt2_shaped(tmp_path_factory):
    """A random model with GPT-2's vocabulary, saved and loaded as a user's would be (the loader
    applies the CPU kernels)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=64)
    directory = tmp_path_factory.mktemp("gpt2_shaped")
    save_native(GPT(config).eval(), gpt2_tokenizer(), directory)
    loaded = load_model(directory)
    assert isinstance(loaded.model.lm_head, CPULinear)  # the loader did apply them
    return loaded


@pytest.mark.parametrize("in_features,out_features", [(64, 192), (768, 2304), (3072, 768)])
def test_linear_gives_each_row_the_same_bits_whatever_the_row_count(in_features, out_features):
    gen = torch.Generator().manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    bias = torch.randn(out_features, generator=gen) * 0.02
    x = torch.randn(2048, in_features, generator=gen)
    alone = torch.cat([linear(x[i:i + 1], weight, bias) for i in range(40)])  # one row each
    everything = linear(x, weight, bias)
    assert torch.equal(everything[:40], alone)
    for rows in (*range(2, 21), 33, 64, 100, 257, 1024):
        assert torch.equal(linear(x[:rows], weight, bias), everything[:rows]), rows


def test_logits_of_a_row_are_the_same_bits_whatever_the_row_count(gpt2_shaped):
    model = gpt2_shaped.model
    seqs = torch.randint(0, 50257, (20, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = []  # (prefill logits (T, V), decode logits (V,)) of each row on its own
        for row in seqs:
            cache = KVCache(model.config, 1, max_len=12)
            prefill = model(row[None, :11], cache=cache)[0]
            alone.append((prefill, model(row[None, 11:], cache=cache)[0, -1]))
        for rows in (2, 3, 8, 20):
            cache = KVCache(model.config, rows, max_len=12)
            prefill = model(seqs[:rows, :11], cache=cache)                 # (rows, 11, V)
            decode = model(seqs[:rows, 11:], cache=cache, last_only=True)  # (rows, 1, V)
            for i in range(rows):
                assert torch.equal(prefill[i], alone[i][0]), (rows, i)
                assert torch.equal(decode[i, -1], alone[i][1]), (rows, i)


def test_samples_are_the_same_however_batched_on_near_flat_gpt2_rows(gpt2_shaped):
    model, tokenizer = gpt2_shaped.model, gpt2_shaped.tokenizer
    params = SamplingParams(temperature=1.0, top_p=0.9)
    prompt = tokenizer.encode("Hello, my name is")  # 5 tokens
    # 5 + 20 tokens pass block_size 16: every batch also re-prefills its rows mid-run.

    def tokens(batch_size):
        out = {}
        for piece in generate(model, tokenizer, prompt, params, num_samples=20,
                              max_new_tokens=20, seed=4242, batch_size=batch_size,
                              stop_at_eot=False):
            out.setdefault(piece.sample, []).append(piece.token)
        return out

    one = tokens(1)
    assert len({tuple(t) for t in one.values()}) == 20 and all(len(t) == 20 for t in one.values())
    for batch_size in (3, 8, 20):
        assert tokens(batch_size) == one, batch_size


@pytest.mark.parametrize("in_features,out_features,most_rows", [
    (64, 192, 1024), (768, 2304, 1024), (3072, 768, 1024), (768, VOCAB, 64)])
def test_the_packed_route_gives_each_row_the_same_bits_whatever_the_row_count(
        in_features, out_features, most_rows):
    """cpu_kernels.packed_linear (the weight in oneDNN's layout, what the loaded model runs):
    one row alone, no padding, and every row count up to `most_rows` agree bit for bit, and
    with the unpacked route's result to float32 rounding."""
    from nanosample.cpu_kernels import pack_weight, packed_linear

    gen = torch.Generator().manual_seed(in_features + out_features + 1)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    bias = torch.randn(out_features, generator=gen) * 0.02
    packed = pack_weight(weight)
    x = torch.randn(most_rows, in_features, generator=gen)
    everything = packed_linear(x, packed, bias, out_features)
    alone = torch.cat([packed_linear(x[i:i + 1], packed, bias, out_features) for i in range(20)])
    assert torch.equal(everything[:20], alone)
    for rows in (*range(2, 21), 33, 64, 100, 257, 1024):
        if rows <= most_rows:
            got = packed_linear(x[:rows], packed, bias, out_features)
            assert torch.equal(got, everything[:rows]), rows
    assert torch.allclose(everything, linear(x, weight, bias), rtol=0, atol=1e-5)


def test_the_loaded_model_runs_packed_weights_and_repacks_a_changed_one(gpt2_shaped):
    layer = gpt2_shaped.model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, CPULinear) and layer.packed is not None
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        fresh = CPULinear(layer.in_features, layer.out_features)  # same numbers, new tensors
        fresh.weight.copy_(layer.weight)
        fresh.bias.copy_(layer.bias)
        assert torch.equal(fresh(x), linear(x, layer.weight, layer.bias))  # never packed: linear
        old = layer.weight
        layer.weight = torch.nn.Parameter(old * 2)       # replaced: packed again
        assert torch.allclose(layer(x), linear(x, old * 2, layer.bias), rtol=0, atol=1e-5)
        layer.weight.mul_(0.5)                           # changed in place: packed again
        assert torch.equal(layer(x), before)
        layer.weight = old


def test_without_memory_to_spare_the_layers_stay_unpacked_with_the_same_bits(monkeypatch):
    from nanosample import cpu_kernels

    torch.manual_seed(3)
    config = GPTConfig(block_size=16, vocab_size=300, n_layer=2, n_head=2, n_embd=64)
    packed = cpu_kernels.use_cpu_kernels(GPT(config).eval())
    monkeypatch.setattr(cpu_kernels, "available_memory", lambda: 100_000)  # 100 kB free
    unpacked = GPT(config).eval()
    unpacked.load_state_dict(packed.state_dict())
    cpu_kernels.use_cpu_kernels(unpacked)
    assert all(m.packed is not None for m in packed.modules() if isinstance(m, CPULinear))
    assert all(m.packed is None for m in unpacked.modules() if isinstance(m, CPULinear))
    idx = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(packed(idx), unpacked(idx))
