"""Sampling: from one row of logits per sample to one drawn token, as pure tensor functions.

This file owns SAMPLING.md's pipeline, in its order:

    clean-up -> bias and bans -> penalties -> greedy | temperature -> top-k -> top-p -> min-p -> draw

Two implementations of the truncations live here side by side:

- the reference ones (`apply_top_k`, `apply_top_p`, `apply_min_p`): full-vocabulary, sort-based,
  easy to read and easy to check against Hugging Face;
- the fast one (`select_candidates`): the same kept sets, computed on a window of the few
  hundred most likely tokens (one `topk` instead of a sort of the whole vocabulary) and widened
  to the full sort only for rows where the window cannot prove its answer. Tests hold the two
  equal.

Every transform returns new logits with -inf where a token is dropped; nothing is modified in
place and nothing random happens without a generator passed in.
"""

import math
from dataclasses import dataclass, fields

import torch

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Settings of one sample, validated once at the edge (SAMPLING.md §3)

@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0         # 0 = greedy
    top_k: int = 0                   # 0 = off
    top_p: float = 1.0               # 1 = off
    min_p: float = 0.0               # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    frequency_penalty: float = 0.0   # 0 = off
    presence_penalty: float = 0.0    # 0 = off
    logit_bias: tuple = ()           # ((token_id, bias), ...) added to the logits
    banned_ids: tuple = ()           # token ids that are never drawn

    def __post_init__(self):
        check_value("temperature", self.temperature, float, lambda t: t >= 0,
                    "a finite number >= 0 (0 = greedy)")
        check_value("top_k", self.top_k, int, lambda k: k >= 0, "an integer >= 0 (0 = off)")
        check_value("top_p", self.top_p, float, lambda p: 0 < p <= 1, "a number > 0 and <= 1 (1 = off)")
        check_value("min_p", self.min_p, float, lambda m: 0 <= m <= 1, "a number >= 0 and <= 1 (0 = off)")
        check_value("repetition_penalty", self.repetition_penalty, float, lambda r: r > 0,
                    "a finite number > 0 (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            check_value(name, getattr(self, name), float, lambda a: -2 <= a <= 2,
                        "a number from -2 to 2 (0 = off)")
        for item in self.logit_bias:
            ok = (isinstance(item, tuple) and len(item) == 2 and _is_int(item[0]) and item[0] >= 0
                  and _is_number(item[1]) and math.isfinite(item[1]))
            if not ok:
                raise ValueError(f"logit_bias={item!r}: must be (token id >= 0, finite bias) pairs")
        for token in self.banned_ids:
            if not (_is_int(token) and token >= 0):
                raise ValueError(f"banned_ids={token!r}: must be token ids >= 0")

    @property
    def greedy(self):
        return self.temperature == 0

    @property
    def uses_penalties(self):
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0
                or self.presence_penalty != 0)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_value(name, value, kind, allowed, description):
    """Raise ValueError('name=value: must be description') unless value is of kind and allowed."""
    ok = _is_int(value) if kind is int else (_is_number(value) and math.isfinite(value))
    if not ok or not allowed(value):
        raise ValueError(f"{name}={value!r}: must be {description}")


def check_token_ids(params, vocab_size):
    """The ids that logit_bias and banned_ids name must exist in the vocabulary."""
    for token, _ in params.logit_bias:
        if token >= vocab_size:
            raise ValueError(f"logit_bias={token}: token ids must be < {vocab_size}")
    for token in params.banned_ids:
        if token >= vocab_size:
            raise ValueError(f"banned_ids={token}: token ids must be < {vocab_size}")


class BatchParams:
    """The settings of each row of a batch as tensors, so every row may have its own."""

    def __init__(self, rows, vocab_size, device="cpu"):
        assert len(rows) > 0 and all(isinstance(r, SamplingParams) for r in rows)
        self.rows = list(rows)
        self.vocab_size = vocab_size

        def column(name, dtype=torch.float32):
            return torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=device)[:, None]

        self.temperature = column("temperature")                      # (B, 1)
        self.top_k = column("top_k", torch.long)[:, 0]                # (B,)
        self.top_p = column("top_p")                                  # (B, 1)
        self.min_p = column("min_p")                                  # (B, 1)
        self.repetition_penalty = column("repetition_penalty")        # (B, 1)
        self.frequency_penalty = column("frequency_penalty")          # (B, 1)
        self.presence_penalty = column("presence_penalty")            # (B, 1)
        self.greedy = (self.temperature == 0)[:, 0]                   # (B,)
        self.any_greedy = any(r.greedy for r in rows)
        self.all_greedy = all(r.greedy for r in rows)
        self.uses_penalties = any(r.uses_penalties for r in rows)
        self.uses_top_p = any(r.top_p < 1 for r in rows)
        self.uses_min_p = any(r.min_p > 0 for r in rows)
        self.uses_top_k = any(0 < r.top_k < vocab_size for r in rows)
        self.bias = None                                              # (B, V) or None
        if any(r.logit_bias or r.banned_ids for r in rows):
            self.bias = torch.zeros(len(rows), vocab_size, device=device)
            for i, r in enumerate(rows):
                for token, value in r.logit_bias:
                    self.bias[i, token] += value
                self.bias[i, list(r.banned_ids)] = NEG_INF

    def __len__(self):
        return len(self.rows)


# ----------------------------------------------------------------------------------------------
# Steps 1-5: clean-up, bias and bans, penalties, greedy, temperature

def clean_logits(logits, n_valid):
    """Float32 logits with -inf for ids the tokenizer cannot decode. (B, V) -> (B, V)

    nanoGPT pads GPT-2's 50257 ids to 50304; those padding rows must never be drawn. A NaN
    is a broken model or input, never a token, so it raises.
    """
    logits = logits.float()  # also keeps T = 1e-4 on float16 logits from overflowing
    if torch.isnan(logits).any():
        rows = torch.isnan(logits).any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"the model produced NaN logits (batch rows {rows})")
    if n_valid < logits.shape[-1]:
        logits = logits.clone()
        logits[:, n_valid:] = NEG_INF
    return logits


def apply_logit_bias(logits, bias):
    """Add a per-token bias; banned ids carry -inf in `bias`. (B, V) -> (B, V)"""
    return logits if bias is None else logits + bias


def apply_repetition_penalty(logits, seen, penalty):
    """Hugging Face's repetition penalty. (B, V) -> (B, V)

    For every id that occurs in the prompt or the text so far (`seen`, (B, V) bool):
    l / θ when l > 0, l * θ otherwise. `penalty` is θ, (B, 1); θ = 1 is off.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence(logits, counts, frequency, presence):
    """OpenAI's penalties: l - α·count - β·(count > 0), generated tokens only. (B, V) -> (B, V)"""
    return logits - frequency * counts - presence * (counts > 0).float()


def greedy_tokens(logits):
    """Argmax of each row; ties go to the lowest id (torch.argmax returns the first). (B, V) -> (B,)"""
    return logits.argmax(dim=-1)


def apply_temperature(logits, temperature):
    """l / T, with T (B, 1) > 0: T < 1 sharpens, T > 1 flattens, T = 1 is exact. (B, V) -> (B, V)"""
    return logits / temperature


# ----------------------------------------------------------------------------------------------
# Steps 6-8, the reference way: whole vocabulary, sorted

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


def reference_truncate(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Steps 6-8 on tempered logits: top-k, then top-p and min-p on what top-k left."""
    after_k = apply_top_k(logits, top_k)
    keep = (apply_top_p(after_k, top_p) > NEG_INF) & (apply_min_p(after_k, min_p) > NEG_INF)
    return after_k.masked_fill(~keep, NEG_INF)


# ----------------------------------------------------------------------------------------------
# Steps 6-8, the fast way: the same kept sets from a window of the top candidates

@dataclass
class Candidates:
    """Each row's most likely tokens, best first, and what each filter did with them.

    Rows are ordered by descending tempered logit, ties by ascending id, which is the order
    the draw accumulates probability in. Every kept token of a row is in its window and the
    kept tokens are a prefix of it; the window may hold dropped tokens after them, and rows
    padded to a common width carry -inf logits there.
    """
    ids: torch.Tensor        # (B, M) token ids
    logits: torch.Tensor     # (B, M) logits after penalties and temperature
    kept: torch.Tensor       # (B, M) survived every filter
    kept_top_k: torch.Tensor  # (B, M) what each filter alone says (True where it is off)
    kept_top_p: torch.Tensor
    kept_min_p: torch.Tensor
    n_kept: torch.Tensor     # (B,) length of the kept prefix


def _ranked_window(logits, width):
    """The `width` largest logits of each row, descending, ties by ascending id."""
    if width >= logits.shape[-1]:
        values, ids = logits.sort(dim=-1, descending=True, stable=True)  # ids ascend within ties
        return values, ids
    values, ids = logits.topk(width, dim=-1)                             # (B, M), tie order unknown
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)


def _filter_window(values, params, rows, log_norm_full):
    """Apply top-k, top-p and min-p to ranked windows. Returns the verdicts and whether each
    row's window was wide enough to be sure of them."""
    M = values.shape[-1]
    V = params.vocab_size
    k = params.top_k[rows]                                               # (R,)
    k_active = (k > 0) & (k < V)
    kth = values.gather(-1, (k - 1).clamp(0, M - 1)[:, None])           # (R, 1)
    kept_top_k = ~k_active[:, None] | (values >= kth)

    # The distribution top-p and min-p look at: what top-k left, renormalized.
    masked = values.masked_fill(~kept_top_k, NEG_INF)
    masked = masked.double()
    log_norm = torch.where(k_active[:, None], torch.logsumexp(masked, dim=-1, keepdim=True),
                           log_norm_full)                               # (R, 1) float64
    probs = torch.exp(masked - log_norm)                                 # (R, M)
    before = probs.cumsum(dim=-1) - probs
    p = params.top_p[rows].double()                                      # (R, 1)
    n_keep = (before < p).sum(dim=-1, keepdim=True).clamp(min=1)
    last_kept = values.gather(-1, n_keep - 1)
    kept_top_p = (p >= 1) | (values >= last_kept)

    m = params.min_p[rows]                                               # (R, 1)
    kept_min_p = (m <= 0) | (torch.exp(values - values[:, :1]) >= m)

    kept = kept_top_k & kept_top_p & kept_min_p & torch.isfinite(values)
    greedy = params.greedy[rows]
    kept[greedy, 1:] = False  # greedy keeps only the best token, the lowest id among ties

    # The window proves its answer when its last token is dropped and top-k's threshold
    # (with its ties) lies inside it; otherwise a kept token could lie beyond it.
    sure = ~kept[:, -1] & (~k_active | ((k < M) & (values[:, -1] < kth[:, 0])))
    sure = sure | greedy | (M >= V)
    return kept, kept_top_k, kept_top_p, kept_min_p, sure


def select_candidates(logits, params, window=256):
    """Steps 6-8 for a batch of tempered logits (B, V), without sorting the whole vocabulary.

    Each row starts with a window of its `window` best tokens (wider when top-k asks for
    more); rows whose window cannot prove the kept set (a flat distribution with a large
    top-p, pure sampling) are redone on the full sort. Exact either way.
    """
    B, V = logits.shape
    k_max = int(params.top_k.max()) if params.uses_top_k else 0
    width = min(V, max(window, k_max + 1))
    # top-p without top-k needs each row's normaliser over the whole vocabulary
    # (summed in float64: top-p compares cumulative sums with p, and a sum that lands on p,
    # like 0.4 + 0.3 = 0.7, must not tip over through rounding)
    row_max = logits.max(dim=-1, keepdim=True).values                    # (B, 1)
    mass = torch.exp(logits - row_max).sum(dim=-1, keepdim=True, dtype=torch.float64)
    log_norm_full = row_max.double() + mass.log()                        # (B, 1) float64

    rows = torch.arange(B, device=logits.device)
    values, ids = _ranked_window(logits, width)
    verdicts = _filter_window(values, params, rows, log_norm_full)
    sure = verdicts[-1]
    if not bool(sure.all()):
        # Redo the unsure rows on the full vocabulary; pad the others to the same width.
        redo = (~sure).nonzero().flatten()
        full_values, full_ids = _ranked_window(logits[redo], V)
        full_verdicts = _filter_window(full_values, params, redo, log_norm_full[redo])
        pad = V - width
        values = torch.nn.functional.pad(values, (0, pad), value=NEG_INF)
        ids = torch.nn.functional.pad(ids, (0, pad), value=0)
        values[redo], ids[redo] = full_values, full_ids
        padded = []
        for mine, theirs in zip(verdicts[:-1], full_verdicts[:-1]):
            mine = torch.nn.functional.pad(mine, (0, pad), value=False)
            mine[redo] = theirs
            padded.append(mine)
        verdicts = (*padded, None)
    kept, kept_top_k, kept_top_p, kept_min_p, _ = verdicts
    return Candidates(ids=ids, logits=values, kept=kept, kept_top_k=kept_top_k,
                      kept_top_p=kept_top_p, kept_min_p=kept_min_p, n_kept=kept.sum(dim=-1))


# ----------------------------------------------------------------------------------------------
# Step 10: the draw

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
    """What one sampling step decided, per row. `candidates` and `u` feed the explain trace."""
    tokens: torch.Tensor          # (B,) the chosen ids
    ranks: torch.Tensor           # (B,) the chosen token's place among the candidates
    u: torch.Tensor               # (B,) float64; NaN for greedy rows, which draw nothing
    candidates: Candidates
    adjusted: torch.Tensor        # (B, V) logits after clean-up, bias and penalties (pre-temperature)


def sample_step(logits, params, generators, n_valid, seen=None, counts=None, window=256):
    """SAMPLING.md §1 for one step of a batch: raw logits (B, V) -> the chosen tokens.

    `generators` holds one torch.Generator per row (greedy rows ignore their u); `seen` (B, V)
    bool marks ids in the prompt or output so far, `counts` (B, V) counts generated ids; both
    are needed only when a row uses penalties.
    """
    logits = clean_logits(logits, n_valid)
    if params.bias is not None:
        logits = apply_logit_bias(logits, params.bias)
        if not torch.isfinite(logits).any(dim=-1).all():
            raise ValueError("banned_ids: every token of the vocabulary is banned")
    if params.uses_penalties:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        logits = apply_frequency_presence(logits, counts, params.frequency_penalty,
                                          params.presence_penalty)
    # Greedy rows divide by 1: their order is all that matters and it stays exact.
    temperature = params.temperature.masked_fill(params.temperature == 0, 1.0)
    tempered = apply_temperature(logits, temperature)
    candidates = select_candidates(tempered, params, window)
    if params.all_greedy:
        u = torch.full((len(params),), math.nan, dtype=torch.float64, device=logits.device)
    else:
        u = draw_uniforms(generators, logits.device)
        u = u.masked_fill(params.greedy, math.nan)
    ranks = inverse_cdf(candidates, u.nan_to_num(0.0))
    tokens = candidates.ids.gather(-1, ranks[:, None])[:, 0]
    return Step(tokens=tokens, ranks=ranks, u=u, candidates=candidates, adjusted=logits)
