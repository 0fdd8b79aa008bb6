"""GPT-2 in PyTorch: the network, its config, and the KV cache it reads and writes.

Parameter names are GPT-2's own (`transformer.wte`, `transformer.h.N.attn.c_attn`, `ln_f`,
`lm_head`), so Hugging Face and nanoGPT checkpoints map onto it one to one; `loader.py` owns
every quirk of those files. This file imports only torch and holds no generation state:
the caller creates a `KVCache` and passes it to `forward`, and positions advance with it.

Every matrix product is a plain `nn.Linear`. On the CPU the loader then hands the products to
faster, batch-invariant kernels (`cpu_kernels.py`), as gpt-fast applies its speed-ups to a
loaded model; this file does not know about them.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024   # longest sequence the position table covers
    vocab_size: int = 50257  # rows of wte; nanoGPT pads GPT-2's 50257 to 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True        # biases in Linear and LayerNorm (nanoGPT can train without)
    gelu: str = "tanh"       # "tanh": GPT-2's and HF's gelu_new; "exact": nanoGPT's nn.GELU()
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        assert self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head"
        assert self.gelu in ("tanh", "exact"), f"unknown gelu {self.gelu!r}"


class KVCache:
    """Keys and values of every layer for the positions seen so far, allocated once.

    `pos` is how many positions are filled; `forward` writes the new positions' keys and
    values at `pos` and advances it. `reset()` empties the cache without reallocating.
    """

    def __init__(self, config, batch_size, max_len=None, device=None, dtype=torch.float32):
        max_len = config.block_size if max_len is None else max_len
        assert 0 < max_len <= config.block_size, "the cache cannot outgrow the position table"
        head_size = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    @property
    def batch_size(self):
        return self.k.shape[1]

    def reset(self):
        self.pos = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)

        if cache is None or cache.pos == 0:
            # All keys are the new ones: a plain causal mask does it.
            if cache is not None:
                cache.k[layer, :, :, :T] = k
                cache.v[layer, :, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start, end = cache.pos, cache.pos + T
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k = cache.k[layer, :, :, :end]  # (B, nh, end, hs)
            v = cache.v[layer, :, :, :end]  # (B, nh, end, hs)
            if T == 1:
                mask = None  # one new query sees every cached key
            else:
                # query i sits at position start + i and sees keys 0 .. start + i
                rows = torch.arange(start, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= rows  # (T, end)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # GPT-2 ties them
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that feed the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, cache=None, last_only=False):
        """Logits for the tokens `idx` (B, T).

        Without a cache, `idx` is the whole sequence from position 0. With one, `idx`
        continues the cached positions (a prefill of many tokens, or a decode step of
        one) and the cache advances by T. `last_only` computes the vocabulary projection
        for the last position only, which is all that sampling needs.
        Returns (B, T, V) logits, or (B, 1, V) with `last_only`.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if cache is not None:
            # A batch of 1 may fill an empty larger cache: a prompt shared by every sample is
            # then computed once and its keys and values are broadcast to every row.
            shared_prefill = B == 1 and start == 0
            assert B == cache.batch_size or shared_prefill, "the cache was made for another batch size"
            assert start + T <= cache.max_len, "the cache is full: crop and prefill again"
        assert start + T <= self.config.block_size, "sequence longer than block_size"
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)  # (B, T, V)
