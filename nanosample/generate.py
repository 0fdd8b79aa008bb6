"""The generate loop: prefill once, decode token by token with the KV cache, stream text.

This file owns everything that happens between a prompt and the finished samples: batching
samples (with a cap), one random generator per sample, the penalty bookkeeping, stopping at
`<|endoftext|>` or a stop string, incremental decoding of text, and what happens when a
sample outgrows the model's context. The per-step decision itself is `sampling.sample_step`.

Past the context: GPT-2's positions are absolute, so a full cache cannot slide one token. When
the context is full and another token must be fed, the model keeps the last `block_size // 2`
tokens, computes them again as a fresh prompt (one prefill), and goes on decoding from there.
The context it sees therefore shrinks to half a block and grows back to a full one, over and
over; `context_start` states the rule for a reference loop without a cache.
"""

import codecs
from dataclasses import dataclass

import torch

from nanosample.model import KVCache
from nanosample.sampling import BatchParams, SamplingParams, sample_step


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


class TextStream:
    """Turns one sample's tokens into printable text: whole UTF-8 characters only, stopping
    at the first stop string, and holding back text that could still become one."""

    def __init__(self, tokenizer, stop):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""      # all generated text so far
        self.emitted = 0    # how much of it has been handed out

    def add(self, token):
        """Append a token. Returns (new safe text, whether a stop string ended the sample)."""
        before = len(self.text)
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, before - longest + 1)
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
             first_sample=0, window=256):
    """Generate `num_samples` continuations of `prompt_ids`, yielding `Piece`s as they come.

    `params` is one `SamplingParams` for every sample or a list with one per sample. Samples
    are run `batch_size` at a time (all at once by default); sample i's text depends only on
    (weights, prompt, its settings, seed, i), however the samples are batched. Pieces of the
    samples of one batch arrive interleaved, step by step. `trace`, when given, is called
    with a `TraceStep` after every step.
    """
    if isinstance(params, SamplingParams):
        params = [params] * num_samples
    assert len(params) == num_samples, "one SamplingParams per sample"
    block_size = model.config.block_size
    if not 0 < len(prompt_ids) <= block_size:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; it must have 1 to "
                         f"{block_size} (the model's block_size)")
    batch_size = num_samples if batch_size is None else batch_size
    assert batch_size >= 1
    for start in range(0, num_samples, batch_size):
        indices = list(range(start, min(start + batch_size, num_samples)))
        yield from _generate_batch(
            model, tokenizer, prompt_ids, [params[i] for i in indices],
            [first_sample + i for i in indices], max_new_tokens=max_new_tokens, seed=seed,
            stop=stop, stop_at_eot=stop_at_eot, trace=trace, window=window)


@torch.no_grad()
def _generate_batch(model, tokenizer, prompt_ids, params, samples, *, max_new_tokens, seed,
                    stop, stop_at_eot, trace, window):
    config = model.config
    weight = model.transformer.wte.weight
    device, dtype = weight.device, weight.dtype
    B = len(samples)
    batch_params = BatchParams(params, config.vocab_size, device)
    generators = [sample_generator(seed, i) for i in samples]
    eot = tokenizer.eot_id if stop_at_eot else None
    streams = [TextStream(tokenizer, stop) for _ in samples]
    active = [True] * B
    if max_new_tokens == 0:
        for i in samples:
            yield Piece(i, "", None, True, "length")
        return

    # Prefill: the prompt is the same for every row, so it is computed once. The cache holds
    # what this call can reach (the prompt and every token fed back), not a whole block: at
    # batch 64 a 1024-position cache is 4.8 GB of fp32, 128 new tokens need 0.7 GB of it.
    max_len = min(config.block_size, len(prompt_ids) + max_new_tokens - 1)
    cache = KVCache(config, B, max_len=max_len, device=device, dtype=dtype)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    logits = model(prompt, cache=cache, last_only=True)[:, -1].expand(B, -1)  # (B, V)
    sequences = [list(prompt_ids) for _ in samples]
    start = 0  # where the model's context begins in each sequence

    seen = counts = None
    if batch_params.uses_penalties:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        seen[:, prompt[0]] = True
        counts = torch.zeros(B, config.vocab_size, device=device)

    for step in range(max_new_tokens):
        result = sample_step(logits, batch_params, generators, tokenizer.n_vocab,
                             seen=seen, counts=counts, window=window,
                             candidates=trace is not None)  # only the trace reads them
        if trace is not None:
            trace(TraceStep(samples, list(active), step, len(sequences[0]), logits,
                            batch_params, result))
        tokens = result.tokens.tolist()
        last_step = step == max_new_tokens - 1
        for row, token in enumerate(tokens):
            sequences[row].append(token)  # finished rows too: every row keeps the same length
            if not active[row]:
                continue
            if token == eot:
                active[row] = False
                yield Piece(samples[row], streams[row].finish(), token, True, "eot")
                continue
            text, stopped = streams[row].add(token)
            if stopped:
                active[row] = False
                yield Piece(samples[row], text, token, True, "stop")
            elif last_step:
                active[row] = False
                yield Piece(samples[row], text + streams[row].finish(), token, True, "length")
            else:
                yield Piece(samples[row], text, token, False)  # text may be "" (held back)
        if not any(active):
            return

        fed = result.tokens[:, None]  # (B, 1); finished rows go on in lockstep, ignored
        if seen is not None:
            seen.scatter_(1, fed, True)
            counts.scatter_add_(1, fed, torch.ones_like(fed, dtype=counts.dtype))
        length = len(sequences[0])
        new_start = context_start(length, start, config.block_size)
        if new_start != start:
            # The context is full: compute the kept tail again as a fresh prompt.
            start = new_start
            cache.reset()
            tail = torch.tensor([s[start:] for s in sequences], dtype=torch.long, device=device)
            logits = model(tail, cache=cache, last_only=True)[:, -1]
        else:
            logits = model(fed, cache=cache, last_only=True)[:, -1]
