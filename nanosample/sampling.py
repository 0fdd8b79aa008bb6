"""The sampler: one row of logits per sample in, one token per sample out (SAMPLING.md).

    clean-up -> bias and bans -> penalties -> greedy | temperature -> top-k -> top-p -> min-p -> draw

Each step is a small pure function of (B, V) tensors that returns new logits, -inf where a
token is dropped; `sample_step` runs them in that order and draws with `inverse_cdf`. To add a
filter: write `apply_x(logits, x) -> logits`, add one line to FILTERS, and declare its setting
in sampler_settings.SETTINGS.

This is the code that runs for small vocabularies, such as the shipped model's 65 characters.
On GPT-2's 50257 tokens sorting every row at every step costs milliseconds, and
`fast_sampling` finds the same kept sets and tokens with less work; `use_fast_path` says which
runs, and tests/test_sampling.py holds the two equal.
"""

import math
from dataclasses import dataclass

import torch

from nanosample import fast_sampling
from nanosample.sampler_settings import FLOAT32_MAX, FLOAT32_TINY, NUMBERS, SamplingParams

NEG_INF = float("-inf")


class BatchParams:
    """The settings of each row of a batch as tensors, so every row may have its own."""

    def __init__(self, rows, vocab_size, device="cpu"):
        assert len(rows) > 0 and all(isinstance(r, SamplingParams) for r in rows)
        self.rows = list(rows)
        self.vocab_size = vocab_size
        self.on = {}  # setting -> whether any row turns it on
        for s in NUMBERS:  # temperature, top_k, top_p, ...: one (B, 1) column each
            values = [getattr(r, s.name) for r in rows]
            if s.tiny_is_off:  # e.g. min_p 1e-40 is 0 (off), as SAMPLING.md §3 says
                values = [v if abs(v) >= FLOAT32_TINY else s.off for v in values]
            dtype = torch.long if isinstance(s.off, int) else torch.float32
            setattr(self, s.name, torch.tensor(values, dtype=dtype, device=device)[:, None])
            self.on[s.name] = any(v != s.off for v in values)
        self.greedy = (self.temperature == 0)[:, 0]                       # (B,)
        self.any_greedy = any(r.greedy for r in rows)
        self.all_greedy = all(r.greedy for r in rows)
        self.uses_penalties = any(r.uses_penalties for r in rows)
        # Greedy rows divide by 1 (their order is all that matters, and it stays exact).
        self.safe_temperature = self.temperature.masked_fill(self.temperature == 0, 1.0)
        self.bias = None                                                  # (B, V) or None
        if any(r.logit_bias or r.banned_ids for r in rows):
            self.bias = torch.zeros(len(rows), vocab_size, device=device)
            for i, r in enumerate(rows):
                for token, value in r.logit_bias:
                    self.bias[i, token] += value
                self.bias[i, list(r.banned_ids)] = NEG_INF
        self.scratch = {}  # what the fast path keeps from step to step

    def __len__(self):
        return len(self.rows)


# ----------------------------------------------------------------------------------------------
# Steps 1-5: clean-up, bias and bans, penalties, greedy, temperature

def clean_logits(logits, n_valid):
    """Float32 logits with -inf for ids the tokenizer cannot decode. (B, V) -> (B, V)

    nanoGPT pads GPT-2's 50257 ids to 50304; those padding rows must never be drawn. A NaN or
    +inf is a broken model or input, never a token, so it raises.
    """
    logits = logits.float()  # also keeps T = 1e-4 on float16 logits from overflowing
    # One sum finds a NaN or +inf (the sum is then not finite) for ~1/15 of the cost of a
    # (B, V) mask at batch 64; only then does it look closer.
    if not torch.isfinite(logits.sum()):
        for what, bad in (("NaN", torch.isnan(logits)), ("infinite", torch.isposinf(logits))):
            if bad.any():
                rows = bad.any(dim=-1).nonzero().flatten().tolist()
                raise ValueError(f"the model produced {what} logits (batch rows {rows})")
    if n_valid < logits.shape[-1]:
        logits = logits.clone()
        logits[:, n_valid:] = NEG_INF
    return logits


def _saturate(new, old):
    """Where a finite logit `old` became ±inf, the largest finite float32 of that sign: a bias
    or a penalty makes a token very likely or unlikely, never drawn for sure or banned."""
    return torch.where(torch.isfinite(old), new.clamp(-FLOAT32_MAX, FLOAT32_MAX), new)


def apply_logit_bias(logits, bias):
    """Add a per-token bias; banned ids carry -inf in `bias`. (B, V) -> (B, V)"""
    if bias is None:
        return logits
    return _saturate(logits + bias, logits.masked_fill(bias == NEG_INF, NEG_INF))


def apply_repetition_penalty(logits, seen, penalty):
    """Hugging Face's repetition penalty. (B, V) -> (B, V)

    For every id that occurs in the prompt or the text so far (`seen`, (B, V) bool):
    l / θ when l > 0, l * θ otherwise. `penalty` is θ, (B, 1); θ = 1 is off.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return _saturate(torch.where(seen, penalized, logits), logits)


def apply_frequency_presence(logits, counts, frequency, presence):
    """OpenAI's penalties: l - α·count - β·(count > 0), generated tokens only. (B, V) -> (B, V)"""
    return _saturate(logits - frequency * counts - presence * (counts > 0).float(), logits)


def greedy_tokens(logits):
    """Argmax of each row; ties go to the lowest id (torch.argmax returns the first). (B, V) -> (B,)"""
    return logits.argmax(dim=-1)


def apply_temperature(logits, temperature, ranked=False, may_overflow=True):
    """l / T, with T (B, 1) > 0: T < 1 sharpens, T > 1 flattens, T = 1 is exact. (B, V) -> (B, V)

    A tiny T can push l / T past float32's range; such rows are shifted first, (l - max l) / T,
    which changes neither q nor any filter's choice (the row's best logit becomes 0).
    `ranked`: rows sorted in descending order, so the first column is the largest;
    `may_overflow=False` (every T >= 1) skips the check.
    """
    tempered = logits / temperature
    if may_overflow:
        top = logits[:, :1] if ranked else logits.amax(dim=-1, keepdim=True)  # (B, 1)
        overflow = torch.isposinf(tempered[:, :1] if ranked else top / temperature)
        if bool(overflow.any()):
            tempered = torch.where(overflow, (logits - top) / temperature, tempered)
    return tempered


# ----------------------------------------------------------------------------------------------
# Steps 6-9: the filters, each on what the ones before it left

def _per_row(value, logits, dtype):
    """A scalar or a per-row tensor as a (B, 1) tensor."""
    value = torch.as_tensor(value, dtype=dtype, device=logits.device)
    return value.reshape(-1, 1).expand(logits.shape[0], 1)


def apply_top_k(logits, k):
    """Keep every token whose logit is >= the k-th largest (ties kept). k = 0 or >= V is off."""
    k = _per_row(k, logits, torch.long)                                 # (B, 1)
    V = logits.shape[-1]
    active = (k > 0) & (k < V)                                          # (B, 1)
    ranked = logits.sort(dim=-1, descending=True).values                # (B, V)
    kth = ranked.gather(-1, (k - 1).clamp(0, V - 1))                    # (B, 1)
    drop = active & (logits < kth)
    return logits.masked_fill(drop, NEG_INF)


def apply_top_p(logits, p):
    """Keep the smallest set of most probable tokens whose probability reaches p. p = 1 is off.

    Sorted by descending probability, a token is kept when the probability of the tokens
    ranked strictly before it is < p, so the token that crosses p is kept. Tokens with the
    same logit as the last one kept are kept too (the answer never depends on sort order).
    """
    p = _per_row(p, logits, torch.float64)                              # (B, 1)
    ranked = logits.sort(dim=-1, descending=True).values                # (B, V)
    probs = torch.softmax(ranked.double(), dim=-1)                      # (B, V)
    before = probs.cumsum(dim=-1) - probs                               # (B, V)
    n_keep = (before < p).sum(dim=-1, keepdim=True).clamp(min=1)        # (B, 1)
    last_kept = ranked.gather(-1, n_keep - 1)                           # (B, 1)
    drop = (p < 1) & (logits < last_kept)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits, m):
    """Keep tokens whose probability is >= m times the largest probability. m = 0 is off."""
    m = _per_row(m, logits, torch.float32)                              # (B, 1)
    relative = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)  # p_i / max(p)
    drop = (m > 0) & (relative < m)
    return logits.masked_fill(drop, NEG_INF)


# (setting, filter) in SAMPLING.md's order. A filter sees what the ones before it left.
FILTERS = (
    ("top_k", apply_top_k),
    ("top_p", apply_top_p),
    ("min_p", apply_min_p),
)


def truncate(tempered, params):
    """Steps 6-9 on tempered logits (B, V): the filters in order, each skipped when no row uses
    it. -> (the survivors' logits, {setting: (B, V) kept by this filter and every one before})"""
    logits, verdicts = tempered, {}
    for name, apply_filter in FILTERS:
        if params.on[name]:
            logits = apply_filter(logits, getattr(params, name))
        verdicts[name] = logits > NEG_INF
    return logits, verdicts


def reference_truncate(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Steps 6-8 on tempered logits with one setting for all rows: top-k, top-p, min-p."""
    values = {"top_k": top_k, "top_p": top_p, "min_p": min_p}
    for name, apply_filter in FILTERS:
        logits = apply_filter(logits, values[name])
    return logits


# ----------------------------------------------------------------------------------------------
# Step 10: the draw

@dataclass
class Candidates:
    """Each row's tokens, best first, and what each filter did with them.

    Rows are ordered by descending tempered logit, ties by ascending id, which is the order
    the draw accumulates probability in. The kept tokens are a prefix of each row. The fast
    path lists only a window of each row's best tokens (padded with -inf where rows differ).
    """
    ids: torch.Tensor         # (B, M) token ids
    logits: torch.Tensor      # (B, M) logits after penalties and temperature
    kept: torch.Tensor        # (B, M) survived every filter (greedy: the best token only)
    kept_top_k: torch.Tensor  # (B, M) kept by this filter and every one before it
    kept_top_p: torch.Tensor
    kept_min_p: torch.Tensor
    n_kept: torch.Tensor      # (B,) length of the kept prefix


def list_candidates(tempered, params):
    """Steps 4 and 6-9: every token of each row in the draw's order, with the filters'
    verdicts. Greedy rows (step 4) keep only their first token: the largest logit, the lowest
    id among ties."""
    survivors, verdicts = truncate(tempered, params)                    # (B, V)
    logits, ids = tempered.sort(dim=-1, descending=True, stable=True)  # ties: ascending id
    kept = survivors.gather(-1, ids) > NEG_INF                          # a prefix of each row
    if params.any_greedy:
        kept[params.greedy, 1:] = False
    flags = {name: verdict.gather(-1, ids) for name, verdict in verdicts.items()}
    return Candidates(ids=ids, logits=logits, kept=kept, kept_top_k=flags["top_k"],
                      kept_top_p=flags["top_p"], kept_min_p=flags["min_p"],
                      n_kept=kept.sum(dim=-1))


def draw_uniforms(generators, device="cpu"):
    """One u ~ U[0, 1) per row, each from that row's own generator. -> (B,) float64"""
    u = [torch.rand((), generator=g, dtype=torch.float64) for g in generators]
    return torch.stack(u).to(device)


def final_probabilities(candidates):
    """q = softmax over the kept tokens, 0 elsewhere. -> (B, M) float64"""
    kept_logits = candidates.logits.double().masked_fill(~candidates.kept, NEG_INF)
    return torch.softmax(kept_logits, dim=-1)


def inverse_cdf(candidates, u):
    """The rank of the first candidate whose cumulative probability exceeds u. -> (B,) ranks

    Probability is accumulated in the candidates' order (descending, ties by id). Rounding can
    leave the total a hair under 1; a u above it goes to the last kept token.
    """
    cdf = final_probabilities(candidates).cumsum(dim=-1)                 # (B, M)
    rank = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]         # first cdf > u
    return torch.minimum(rank, candidates.n_kept - 1)


# ----------------------------------------------------------------------------------------------
# The whole pipeline for one step

@dataclass
class Step:
    """What one sampling step decided, per row. `candidates` and `ranks` feed the explain
    trace; they are None when sample_step was asked not to list them."""
    tokens: torch.Tensor          # (B,) the chosen ids
    ranks: torch.Tensor | None    # (B,) the chosen token's place among the candidates
    u: torch.Tensor               # (B,) float64; NaN for greedy rows, which draw nothing
    candidates: Candidates | None
    adjusted: torch.Tensor        # (B, V) logits after clean-up, bias and penalties (pre-temperature)


# Vocabularies up to this size run the readable path. Measured with `python bench_sampler.py
# --threads=1` (docs/sampler_paths.md): at 65, 128 and 192 tokens it is faster than the fast
# path at batch 1, 8 and 64 with top-k 200 and with top-p 0.9 (65 tokens, batch 64: 0.68 ms
# against 2.1 ms); at 256 the fast path starts to win (top-k, batch 64: 1.3 ms against 1.9),
# and on GPT-2's 50257 it is 30-60 times faster (top-k, batch 8: 1.6 ms against 94).
READABLE_MAX_VOCAB = 192


def use_fast_path(params):
    """Whether `fast_sampling` runs this batch: by the vocabulary's size alone, so a sample's
    tokens never depend on how samples are batched (SAMPLING.md §4), unless a filter the fast
    path does not know yet is on (a new one runs here until fast_sampling learns it)."""
    unknown = any(params.on.get(name) for name, _ in FILTERS if name not in fast_sampling.FILTERS)
    return params.vocab_size > READABLE_MAX_VOCAB and not unknown


def sample_step(logits, params, generators, n_valid, seen=None, counts=None, candidates=True,
                fast=None):
    """SAMPLING.md §1 for one step of a batch: raw logits (B, V) -> the chosen tokens.

    `generators` holds one torch.Generator per row (greedy rows ignore their u); `seen` (B, V)
    bool marks ids in the prompt or output so far, `counts` (B, V) counts generated ids; both
    are needed only when a row uses penalties. With `candidates=False` it skips listing the
    candidates for the explain trace (Step.candidates and Step.ranks are then None); the
    tokens are the same. `fast` picks a path (True: the fast one; None: as `use_fast_path`
    says), for the tests and bench_sampler.py. Small batches run on one of torch's threads
    (`fast_sampling.one_thread` says why).
    """
    with fast_sampling.one_thread(fast_sampling.few_logits(logits)):
        return _sample_step(logits, params, generators, n_valid, seen, counts, candidates, fast)


def _sample_step(logits, params, generators, n_valid, seen, counts, candidates, fast):
    logits = clean_logits(logits, n_valid)                                       # step 1
    if params.bias is not None:                                                  # step 2
        logits = apply_logit_bias(logits, params.bias)
        if not torch.isfinite(logits).any(dim=-1).all():
            raise ValueError("ban: every token of the vocabulary is banned")
    if params.uses_penalties:                                                    # step 3
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        logits = apply_frequency_presence(logits, counts, params.frequency_penalty,
                                          params.presence_penalty)
    if params.all_greedy:                                                        # no draw
        u = torch.full((len(params),), math.nan, dtype=torch.float64, device=logits.device)
    else:
        u = draw_uniforms(generators, logits.device)
        if params.any_greedy:
            u = u.masked_fill(params.greedy, math.nan)

    if use_fast_path(params) if fast is None else fast:
        tokens, ranks, listed = fast_sampling.sample_step(logits, params, u, candidates=candidates)
        return Step(tokens=tokens, ranks=ranks, u=u, candidates=listed, adjusted=logits)
    tempered = apply_temperature(logits, params.safe_temperature)                # step 5
    listed = list_candidates(tempered, params)                                   # steps 4, 6-9
    ranks = inverse_cdf(listed, u.nan_to_num(0.0))                               # step 10
    tokens = listed.ids.gather(-1, ranks[:, None])[:, 0]
    if not candidates:
        listed = ranks = None
    return Step(tokens=tokens, ranks=ranks, u=u, candidates=listed, adjusted=logits)


# ----------------------------------------------------------------------------------------------
# nanoGPT's draw (sample.py --draw=multinomial)

def nanogpt_draw(logits, temperature, top_k, generator):
    """nanoGPT's sampling step, op for op: tokens from (B, V) float32 logits. -> (B,)

    Divide by the temperature; keep the logits >= the k-th largest (nanoGPT's top-k: ties
    kept, k clipped to V); softmax; torch.multinomial. For one row, multinomial draws one
    exponential variate per vocabulary entry from `generator` and takes the argmax of p / E,
    so each step uses V numbers of the stream whatever it picks.
    """
    logits = logits / temperature                                         # (B, V)
    if top_k:  # nanoGPT's top_k=None is off; ours is 0
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))            # (B, k)
        logits = logits.masked_fill(logits < v[:, [-1]], NEG_INF)
    probs = torch.softmax(logits, dim=-1)                                 # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]  # (B,)


def multinomial_step(logits, params, generator, n_valid, candidates=True):
    """`sample_step` with nanoGPT's draw: raw logits (1, V) -> Step, one row at a time.

    Temperature and top-k only (settings refuse the other samplers with this draw). Clean-up
    is ours: float32, and -inf for padded ids (>= n_valid), which nanoGPT leaves in (its
    tiktoken decode fails on one). They keep their columns, so the stream advances by V per
    step as nanoGPT's does, and the tokens are nanoGPT's unless it would have drawn a padded
    id. No u is drawn: Step.u is NaN. For the explain trace, the candidates and kept sets are
    sample_step's (its own draw, from a throwaway generator, is discarded); the rank is where
    the drawn token stands among them.
    """
    assert len(params) == 1, "nanoGPT's draw runs one sample at a time"
    row = params.rows[0]
    clean = clean_logits(logits, n_valid)                                 # (1, V)
    if row.greedy:
        tokens = greedy_tokens(clean)
    else:
        tokens = nanogpt_draw(clean, row.temperature, row.top_k, generator)
    listed = ranks = None
    if candidates:
        listed = sample_step(logits, params, [torch.Generator()], n_valid).candidates
        ranks = (listed.ids == tokens[:, None]).int().argmax(dim=-1)      # (1,)
    u = torch.full((1,), math.nan, dtype=torch.float64, device=logits.device)
    return Step(tokens=tokens, ranks=ranks, u=u, candidates=listed, adjusted=clean)
