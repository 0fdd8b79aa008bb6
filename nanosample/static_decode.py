"""A decode step with fixed shapes, and its capture in a CUDA graph: the GPU's decode accelerator.

`model.py`'s decode step is the readable one: the new token's keys and values go into the
KVCache at `cache.pos` (a Python int), and attention reads the keys `[:pos + 1]`, so a tensor
changes shape at every step. That is fine for eager PyTorch, but a CUDA graph replays fixed
kernels on fixed addresses and shapes. On a GPU, a GPT-2 124M decode step is some 200 small
kernel launches, and launching them from Python costs more than running them; a graph
launches them all at once.

`static_step` is the same step with every shape fixed: the position is a device tensor, the
new keys and values are written with `index_copy_` at that position, and attention reads the
whole cache (`max_len` positions) with a mask that keeps positions <= pos. Masked positions
get weight exactly 0, so it computes what `model.forward` computes, up to rounding: softmax and
the weighted sum add over more (zero) terms, possibly in another kernel. It uses the model's
own modules, so the CPU's oneDNN products (cpu_kernels.py) run in it as in eager.

`StaticDecoder` runs `static_step` on one KVCache and, on CUDA, captures it once in a
`torch.cuda.CUDAGraph` and replays it at every step. The plain capture of the eager step was
chosen over `torch.compile(mode="reduce-overhead")`: it has no compile time (compiling takes
minutes, docs/speed.md), needs no Triton, and replays the very kernels the eager static step
runs, so graph and uncaptured static step give the same tokens bit for bit. What the compiler
would add beyond the graph is fusion of small element-wise kernels, which at these sizes is
worth less than the launches saved.

generate.py picks the step per batch (`decode_step`): "auto" uses the graph on CUDA for
batches of 1 to MAX_GRAPH_BATCH with context="half", and the readable step everywhere else.
The prefill and the "half" context's recomputation stay eager and fill the same KVCache the
graph reads. tests/test_static_decode.py holds the static step equal to the readable one on
the CPU; bench_gpu.py checks the graph against eager on a GPU and times both against
transformers.
"""

import torch
from torch.nn import functional as F

DECODE_STEPS = ("auto", "eager", "static", "graph")
MAX_GRAPH_BATCH = 64  # "auto" captures batches up to this: larger ones are bound by their products
WARMUP_STEPS = 2      # eager runs on a side stream before the capture (cuBLAS and allocator set-up)


def choose_decode_step(model, batch_size, context, decode_step="auto"):
    """The decode step a batch runs: "eager" (model.forward), "static" (static_step, not
    captured: the CPU-testable path) or "graph" (static_step replayed from a CUDA graph).

    "auto" is "graph" on CUDA for batches of 1 to MAX_GRAPH_BATCH with context="half" on a
    model that is not torch.compile'd (compile makes its own choices), else "eager".
    """
    assert decode_step in DECODE_STEPS, decode_step
    if decode_step != "auto":
        return decode_step
    on_cuda = model.transformer.wte.weight.device.type == "cuda"
    compiled = hasattr(model, "_orig_mod")  # what torch.compile returns wraps the model
    if on_cuda and context == "half" and 1 <= batch_size <= MAX_GRAPH_BATCH and not compiled:
        return "graph"
    return "eager"


def static_step(model, cache, token, pos, positions):
    """One decode step with fixed shapes: the logits (B, V) after `token` (B, 1) at position
    `pos` (a 0-dim long tensor on the model's device), its keys and values written into
    `cache` at `pos`. `positions` is arange(cache.max_len) on the device. Does not advance
    cache.pos (the caller does: the graph cannot)."""
    transformer = model.transformer
    x = transformer.wte(token) + transformer.wpe(pos.view(1))  # (B, 1, C)
    # key j is seen when j <= pos; the rest of the cache (zeros, or stale keys from before
    # a recomputation) gets weight 0
    mask = (positions <= pos).view(1, 1, 1, -1)  # (1, 1, 1, max_len)
    for layer, block in enumerate(transformer.h):
        x = x + _attend(block.attn, block.ln_1(x), cache, layer, pos, mask)
        x = x + block.mlp(block.ln_2(x))
    x = transformer.ln_f(x)
    return model.lm_head(x)[:, -1]  # (B, V)


def _attend(attn, x, cache, layer, pos, mask):
    """CausalSelfAttention.forward for one new position, over the whole cache. (B, 1, C)"""
    B, T, C = x.shape
    hs = C // attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q = q.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, 1, hs)
    k = k.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, 1, hs)
    v = v.view(B, T, attn.n_head, hs).transpose(1, 2)  # (B, nh, 1, hs)
    where = pos.view(1)  # index_copy_ takes the position from device memory: no host sync
    cache.k[layer].index_copy_(2, where, k)            # into (B, nh, max_len, hs)
    cache.v[layer].index_copy_(2, where, v)
    y = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=mask)
    y = y.transpose(1, 2).contiguous().view(B, T, C)   # (B, 1, C)
    return attn.c_proj(y)


class StaticDecoder:
    """The decode step of one batch over its KVCache, with fixed input and output buffers.

    `decoder(fed)` feeds the tokens `fed` (B, 1) at `cache.pos`, advances `cache.pos` and
    returns the logits (B, V), as `model(fed, cache=cache, last_only=True)[:, -1]` does. With
    `capture` (CUDA only) the first call captures the step in a CUDA graph, and every call
    replays it. The cache may be emptied and refilled eagerly in between (the "half" context's
    recomputation): the graph reads it wherever `cache.pos` says.
    """

    def __init__(self, model, cache, capture):
        device = cache.k.device
        assert not capture or device.type == "cuda", "CUDA graphs need a CUDA device"
        self.model, self.cache, self.capture = model, cache, capture
        # the graph's inputs: fixed addresses, refilled before each replay
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.positions = torch.arange(cache.max_len, device=device)                    # (max_len,)
        self.graph = None
        self.logits = None  # the graph's output buffer (B, V), overwritten by each replay

    def __call__(self, fed):
        cache = self.cache
        assert fed.shape == self.token.shape, "the decoder was made for another batch size"
        assert cache.pos < cache.max_len, "the cache is full: crop and prefill again"
        self.token.copy_(fed)
        self.pos.fill_(cache.pos)
        if not self.capture:
            logits = self._step()
        else:
            with torch.cuda.device(self.cache.k.device):  # the cache's GPU, maybe not current
                if self.graph is None:
                    self._capture()
                self.graph.replay()
            # a copy: the next replay overwrites the buffer, and a trace may keep this step's
            logits = self.logits.clone()
        cache.pos += 1
        return logits

    def _step(self):
        return static_step(self.model, self.cache, self.token, self.pos, self.positions)

    def _capture(self):
        """Warm up on a side stream, then capture one step (torch.cuda.graphs' recipe). The
        warm-up steps write this step's own keys and values at this step's position, the
        same values the first replay writes again."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph
