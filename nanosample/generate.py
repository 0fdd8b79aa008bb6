"""The generate loop: prefill once, decode token by token with the KV cache, stream text.

This file owns everything that happens between a prompt and the finished samples: batching
samples (with a cap), one random generator per sample, the penalty bookkeeping, stopping at
`<|endoftext|>` or a stop string, incremental decoding of text, and what happens when a
sample outgrows the model's context. The per-step decision itself is `sampling.sample_step`.
A batch of samples is `_prefill` (the prompt, computed once), then at each step a draw,
`_emit` (the step's tokens as Pieces: `<|endoftext|>`, stop strings, length) and `_advance`
(the tokens fed back, by the context rule below). On CUDA the cached decode step is replayed
from a CUDA graph (`static_decode.py`, `decode_step`); the prefill and the context rule's
recomputations stay eager.

Past the context: GPT-2's positions are absolute, so a full cache cannot slide one token. When
the context is full and another token must be fed, the model keeps the last `block_size // 2`
tokens, computes them again as a fresh prompt (one prefill), and goes on decoding from there.
The context it sees therefore shrinks to half a block and grows back to a full one, over and
over; `context_start` states the rule for a reference loop without a cache. `context="crop"`
is nanoGPT's rule instead: the last `block_size` tokens, computed again at every step.

nanoGPT's draw (`draw="multinomial"`, sample.py's configs/nanogpt.toml): the samples are made
one after another from one random stream seeded with the seed, as nanoGPT's sample.py does
(`nanogpt_generator`), each step `sampling.multinomial_step`.
"""

import codecs
import math
from dataclasses import dataclass

import torch

from nanosample.model import KVCache
from nanosample.sampling import BatchParams, SamplingParams, multinomial_step, sample_step
from nanosample.static_decode import StaticDecoder, choose_decode_step


@dataclass
class Piece:
    sample: int            # the sample's index i (its seed derives from (seed, i))
    text: str              # new text, safe to print ("" while a possible stop string is held back)
    token: int | None      # the token generated (one piece per token; None when none was)
    done: bool             # the last piece of this sample
    reason: str | None = None  # "eot" | "stop" | "length" when done


@dataclass
class TraceStep:
    """What the explain trace needs of one decode step, handed to `trace` only when asked."""
    samples: list          # sample index of each batch row
    active: list           # whether each row is still generating (finished rows are junk)
    step: int              # 0 for the first generated token
    position: int          # the position the chosen token takes in the sequence
    raw_logits: torch.Tensor  # (B, V) the model's logits
    params: BatchParams
    result: object         # sampling.Step
    draw: str = "inverse_cdf"  # or "multinomial": nanoGPT's draw, no u


def context_start(length, start, block_size):
    """Where the model's context begins once the sequence is `length` tokens long.

    `start` is where it began before. When the context would exceed `block_size`, it jumps to
    keep the last `block_size // 2` tokens.
    """
    if length - start > block_size:
        return length - max(1, block_size // 2)
    return start


def sample_seed(seed, index):
    """A 64-bit seed for sample `index` of a run seeded with `seed` (SplitMix64 mixing), so each
    sample's random stream depends on (seed, index) alone."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def sample_generator(seed, index):
    generator = torch.Generator(device="cpu")
    generator.manual_seed(sample_seed(seed, index))
    return generator


def nanogpt_generator(seed, config, device):
    """The stream nanoGPT's sample.py draws its tokens from, as a generator of our own.

    nanoGPT calls torch.manual_seed(seed) and torch.cuda.manual_seed(seed), then builds its
    GPT on the CPU before loading the checkpoint into it, and that initialisation draws from
    the CPU stream. Its tokens on the CPU therefore come after those draws, which we repeat
    (`_draw_like_nanogpt_init`); on a GPU they come from the CUDA stream, which the
    initialisation never touches.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    if generator.device.type == "cpu":
        _draw_like_nanogpt_init(config, generator)
    return generator


def _draw_like_nanogpt_init(config, generator):
    """Draw from `generator` what nanoGPT's GPT(config) draws from the CPU stream.

    Same calls, same shapes, same order, on a scratch buffer (their values do not matter,
    only how many numbers each call uses): first each module's own initialisation as it is
    built (nn.Embedding: normal_; nn.Linear: kaiming_uniform_ on the weight, uniform_ on the
    bias), then `self.apply(_init_weights)` (normal_ on every Linear and Embedding weight,
    the tied wte/lm_head twice), then normal_ again on every c_proj weight.
    """
    V, T, C, L = config.vocab_size, config.block_size, config.n_embd, config.n_layer
    linears = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    scratch = torch.empty(max(V, T, 4 * C) * C)

    def tensor(*shape):
        return scratch[:math.prod(shape)].view(shape)

    g = generator
    tensor(V, C).normal_(generator=g)                                   # wte
    tensor(T, C).normal_(generator=g)                                   # wpe
    for _ in range(L):
        for out_features, in_features in linears:
            tensor(out_features, in_features).uniform_(generator=g)
            if config.bias:
                tensor(out_features).uniform_(generator=g)
    tensor(V, C).uniform_(generator=g)                                  # lm_head (no bias)
    tensor(V, C).normal_(generator=g)                                   # apply: wte
    tensor(T, C).normal_(generator=g)                                   #        wpe
    for _ in range(L):
        for shape in linears:
            tensor(*shape).normal_(generator=g)                         #        h.i (biases: zeros_)
    tensor(V, C).normal_(generator=g)                                   #        lm_head (= wte)
    for _ in range(L):
        tensor(C, C).normal_(generator=g)                               # attn.c_proj
        tensor(C, 4 * C).normal_(generator=g)                           # mlp.c_proj


class TextStream:
    """Turns one sample's tokens into printable text: whole UTF-8 characters only, stopping
    at the first stop string, and holding back text that could still become one."""

    def __init__(self, tokenizer, stop):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)  # how far back a stop can begin
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""      # all generated text so far
        self.emitted = 0    # how much of it has been handed out

    def add(self, token):
        """Append a token. Returns (new safe text, whether a stop string ended the sample)."""
        before = len(self.text)
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        search_from = max(0, before - self.longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]  # text after a stop string is never emitted
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def finish(self):
        """The rest of the text once the sample ends without a stop string."""
        self.text += self.decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _held_back(self):
        """Length of the longest tail of the text that begins some stop string."""
        tail = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), tail, -1):
                if self.text.endswith(s[:n]):
                    tail = n
                    break
        return tail

    def _take(self, end):
        end = max(end, self.emitted)
        new, self.emitted = self.text[self.emitted:end], end
        return new


def generate(model, tokenizer, prompt_ids, params, *, num_samples=1, max_new_tokens=100,
             seed=1337, batch_size=None, stop=(), stop_at_eot=True, trace=None,
             first_sample=0, draw="inverse_cdf", context="half", sampler=sample_step,
             decode_step="auto"):
    """Generate `num_samples` continuations of `prompt_ids`, yielding `Piece`s as they come.

    `params` is one `SamplingParams` for every sample or a list with one per sample. Samples
    are run `batch_size` at a time (all at once by default); sample i's text depends only on
    (weights, prompt, its settings, seed, i), however the samples are batched. Pieces of the
    samples of one batch arrive interleaved, step by step. `trace`, when given, is called
    with a `TraceStep` after every step. `draw="multinomial"`: nanoGPT's draw, one sample
    after another from one stream (temperature and top-k only). `context`: "half" or
    "crop", what happens past block_size (see the top of this file). `sampler`: the function
    that chooses each step's tokens (`sampling.sample_step`; bench.py passes a timed one).
    `decode_step`: "auto", "eager", "static" or "graph", which decode step each batch runs
    (`static_decode.choose_decode_step`; "auto" = a CUDA graph on CUDA where it applies).
    """
    if isinstance(params, SamplingParams):
        params = [params] * num_samples
    assert len(params) == num_samples, "one SamplingParams per sample"
    block_size = model.config.block_size
    if not 0 < len(prompt_ids) <= block_size:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; it must have 1 to "
                         f"{block_size} (the model's block_size)")
    assert draw in ("inverse_cdf", "multinomial") and context in ("half", "crop")
    batch_size = num_samples if batch_size is None else batch_size
    assert batch_size >= 1
    stream = None
    if draw == "multinomial":
        # Inverse-CDF is the default: u from each sample's own generator, batch-independent, u traced.
        # nanoGPT's multinomial gives both up: one stream, samples in turn; the trace has u null.
        stream = nanogpt_generator(seed, model.config, model.transformer.wte.weight.device)
        batch_size = 1
    for start in range(0, num_samples, batch_size):
        indices = list(range(start, min(start + batch_size, num_samples)))
        yield from _generate_batch(
            model, tokenizer, prompt_ids, [params[i] for i in indices],
            [first_sample + i for i in indices], max_new_tokens=max_new_tokens, seed=seed,
            stop=stop, stop_at_eot=stop_at_eot, trace=trace, stream=stream, sampler=sampler,
            context=context, decode_step=decode_step)


@dataclass
class _Batch:
    """The state of one batch while it decodes: what `_prefill` makes and each step updates."""
    samples: list           # sample index of each row
    params: BatchParams
    generators: list        # one random generator per row (the inverse-CDF draw's u)
    texts: list             # one TextStream per row
    cache: KVCache
    sequences: list         # each row's tokens, prompt included; every row has the same length
    active: list            # whether each row is still generating (finished rows go on, ignored)
    start: int = 0          # where the model's context begins in each sequence
    seen: torch.Tensor | None = None    # (B, V) bool, the tokens so far; only with penalties
    counts: torch.Tensor | None = None  # (B, V) how often each token was generated; likewise
    decoder: StaticDecoder | None = None  # the fixed-shape decode step, where it runs


@torch.no_grad()
def _generate_batch(model, tokenizer, prompt_ids, params, samples, *, max_new_tokens, seed,
                    stop, stop_at_eot, trace, stream, context, sampler, decode_step):
    """One batch of samples, yielding Pieces: prefill, then each step draw, emit, advance.

    `stream`: the run's one random stream for nanoGPT's draw, or None for the inverse-CDF
    draw from each sample's own generator.
    """
    if max_new_tokens == 0:
        for i in samples:
            yield Piece(i, "", None, True, "length")
        return
    batch, logits = _prefill(model, tokenizer, prompt_ids, params, samples, seed=seed,
                             stop=stop, max_new_tokens=max_new_tokens)
    chosen = choose_decode_step(model, len(samples), context, decode_step)
    if chosen != "eager":  # the graph reads and writes the cache the prefill filled
        batch.decoder = StaticDecoder(model, batch.cache, capture=chosen == "graph")
    eot = tokenizer.eot_id if stop_at_eot else None
    for step in range(max_new_tokens):
        result = _draw(logits, batch, stream, tokenizer.n_vocab, sampler,
                       candidates=trace is not None)  # only the trace reads them
        if trace is not None:
            trace(TraceStep(batch.samples, list(batch.active), step, len(batch.sequences[0]),
                            logits, batch.params, result,
                            "inverse_cdf" if stream is None else "multinomial"))
        tokens = result.tokens.tolist()
        yield from _emit(batch, tokens, eot, last_step=step == max_new_tokens - 1)
        if not any(batch.active):
            return
        logits = _advance(model, batch, result.tokens, tokens, context)


def _prefill(model, tokenizer, prompt_ids, params, samples, *, seed, stop, max_new_tokens):
    """Compute the prompt once for the whole batch. Returns (its `_Batch`, the logits (B, V)
    the first token is drawn from)."""
    config = model.config
    weight = model.transformer.wte.weight
    device, dtype = weight.device, weight.dtype
    B = len(samples)
    # The prompt is the same for every row, so it is computed once. The cache holds what this
    # call can reach (the prompt and every token fed back), not a whole block: at batch 64 a
    # 1024-position cache is 4.8 GB of fp32, 128 new tokens need 0.7 GB of it.
    max_len = min(config.block_size, len(prompt_ids) + max_new_tokens - 1)
    cache = KVCache(config, B, max_len=max_len, device=device, dtype=dtype)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    logits = model(prompt, cache=cache, last_only=True)[:, -1].expand(B, -1)  # (B, V)
    batch = _Batch(samples=samples,
                   params=BatchParams(params, config.vocab_size, device),
                   generators=[sample_generator(seed, i) for i in samples],
                   texts=[TextStream(tokenizer, stop) for _ in samples],
                   cache=cache,
                   sequences=[list(prompt_ids) for _ in samples],
                   active=[True] * B)
    if batch.params.uses_penalties:
        batch.seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        batch.seen[:, prompt[0]] = True
        batch.counts = torch.zeros(B, config.vocab_size, device=device)
    return batch, logits


def _draw(logits, batch, stream, n_vocab, sampler, candidates):
    """One step's decision for every row from its logits (B, V): a `sampling.Step`.

    Each row's u comes from its own generator (inverse CDF), or, when `stream` is given,
    torch.multinomial takes the token from the run's one stream (nanoGPT's draw).
    """
    if stream is None:
        return sampler(logits, batch.params, batch.generators, n_vocab, seen=batch.seen,
                       counts=batch.counts, candidates=candidates)
    return multinomial_step(logits, batch.params, stream, n_vocab, candidates=candidates)


def _emit(batch, tokens, eot, last_step):
    """Yield a Piece for each active row's new token (`tokens`: one int per row), and mark the
    rows that end here: at `eot` (None: never), at a stop string, or at the last step."""
    for row, token in enumerate(tokens):
        if not batch.active[row]:
            continue
        sample, text_stream = batch.samples[row], batch.texts[row]
        if token == eot:
            batch.active[row] = False
            yield Piece(sample, text_stream.finish(), token, True, "eot")
            continue
        text, stopped = text_stream.add(token)
        if stopped:
            batch.active[row] = False
            yield Piece(sample, text, token, True, "stop")
        elif last_step:
            batch.active[row] = False
            yield Piece(sample, text + text_stream.finish(), token, True, "length")
        else:
            yield Piece(sample, text, token, False)  # text may be "" (held back)


def _advance(model, batch, fed, tokens, context):
    """Feed one step's tokens back (`fed` (B,), `tokens` the same as a list). Returns the
    logits (B, V) the next token is drawn from.

    Within the context each row's token is one cached step. Past block_size the context rule
    decides: "half" computes the kept tail again as a fresh prompt when the context is full
    (`context_start`), "crop" computes the last block_size tokens again at every step.
    """
    block_size = model.config.block_size
    for sequence, token in zip(batch.sequences, tokens):
        sequence.append(token)  # finished rows too: every row keeps the same length
    fed = fed[:, None]  # (B, 1); finished rows go on in lockstep, ignored
    if batch.seen is not None:
        batch.seen.scatter_(1, fed, True)
        batch.counts.scatter_add_(1, fed, torch.ones_like(fed, dtype=batch.counts.dtype))
    length = len(batch.sequences[0])
    new_start = context_start(length, batch.start, block_size)
    if context == "crop" and length > block_size:
        # nanoGPT's rule: the last block_size tokens, computed again at every step.
        return _recompute(model, batch, [s[-block_size:] for s in batch.sequences])
    if new_start != batch.start:
        # The context is full: compute the kept tail again as a fresh prompt.
        batch.start = new_start
        return _recompute(model, batch, [s[new_start:] for s in batch.sequences])
    if batch.decoder is not None:
        return batch.decoder(fed)  # the same step with fixed shapes, maybe a CUDA graph
    return model(fed, cache=batch.cache, last_only=True)[:, -1]  # (B, V)


def _recompute(model, batch, tails):
    """Empty the cache and compute `tails` (one list of token ids per row, all as long) as a
    fresh prompt. Returns the logits (B, V) at its last position."""
    batch.cache.reset()
    device = model.transformer.wte.weight.device
    tail = torch.tensor(tails, dtype=torch.long, device=device)  # (B, T)
    return model(tail, cache=batch.cache, last_only=True)[:, -1]
