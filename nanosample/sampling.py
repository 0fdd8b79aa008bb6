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
LOG2_E = 1 / math.log(2)


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
        self.k_max = max(r.top_k for r in rows) if self.uses_top_k else 0
        # Greedy rows divide by 1 (their order is all that matters, and it stays exact).
        self.safe_temperature = self.temperature.masked_fill(self.temperature == 0, 1.0)
        self.all_unit_temperature = all(r.temperature in (0, 1) for r in rows)
        # Rows without top-k (and not greedy) may keep more tokens than any window holds;
        # `_Buckets` settles them.
        self.wide = torch.tensor([not r.greedy and not 0 < r.top_k < vocab_size for r in rows],
                                 device=device)                       # (B,)
        self.all_wide = bool(self.wide.all())
        self.all_rows = torch.arange(len(rows), device=device)
        self.scratch = {}  # work tensors the sampler reuses from step to step (_Buckets)
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
    # One sum finds a NaN (it makes the sum NaN) for ~1/15 of the cost of a (B, V) NaN mask at
    # batch 64; only a NaN sum (a NaN, or +inf meeting -inf) looks closer.
    if torch.isnan(logits.sum()) and torch.isnan(logits).any():
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


def _ranked_window(logits, width, scratch=None):
    """The `width` largest logits of each row, descending, ties by ascending id."""
    if width >= logits.shape[-1]:
        values, ids = logits.sort(dim=-1, descending=True, stable=True)  # ids ascend within ties
        return values, ids
    window = _window_above_floor(logits, width, {} if scratch is None else scratch)
    if window is not None:
        return window
    values, ids = logits.topk(width, dim=-1)                             # (B, M), tie order unknown
    return _rank(values, ids)


def _rank(values, ids):
    """Reorder (B, M) values and their ids: descending value, ties by ascending id."""
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)


CHUNK = 64  # tokens per chunk in _window_above_floor


def _window_above_floor(logits, width, scratch):
    """`_ranked_window` for width << V without `topk`, whose cost (~1.7 ns per logit on our
    CPU) was most of the top-k sampler's time at batch 64: this route takes 3.8 ms there
    against 6.7 ms for topk and ranking, and 0.63 against 0.86 ms at batch 8. Or None where it
    does not pay, and the caller uses topk.

    Cut each row into chunks of 64 and take each chunk's largest logit. The width-th largest
    of those maxima is a floor under the row's width-th largest logit (`width` different
    tokens reach it), so the window is among the tokens >= floor: a few hundred, which are
    picked out, sorted, and cut to `width`.
    """
    B, V = logits.shape
    n_chunks = V // CHUNK  # the last V % CHUNK tokens are left out of the maxima, not the search
    if n_chunks < 2 * width or B < 4:
        return None  # few chunks, or few rows: topk costs less than this route's fixed cost
    maxima = logits[:, :n_chunks * CHUNK].view(B, n_chunks, CHUNK).amax(dim=-1)  # (B, n_chunks)
    floor = maxima.topk(width, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # (B, 1)
    if not bool(torch.isfinite(floor).all()):
        return None  # a row of -inf (or +inf) logits: no useful floor
    below = torch.sub(floor, logits, out=_scratch(scratch, "below", (B, V), logits.dtype,
                                                 logits.device)).clamp_(min=0)
    rows, ids = _zero_positions(below, scratch)                          # the tokens >= floor
    count = torch.bincount(rows, minlength=B)                            # (B,) >= width each
    if int(count.max()) > 8 * width:
        return None  # a crowd of ties at the floor: topk is cheaper
    values, ids = _pack_rows(rows, count, [logits[rows, ids], ids], [NEG_INF, 0])  # (B, C)
    values, order = values.sort(dim=-1, descending=True, stable=True)     # ids ascend within ties
    return values[:, :width], ids.gather(-1, order[:, :width])


WORD_OF_ONES = 0x0101010101010101  # an int64 with the value 1 in each of its 8 bytes
SMALL = 1 << 18  # below this many elements, plain torch ops (fewer of them) are faster


def _zero_positions(x, scratch):
    """(rows, cols) where x (R, V) is 0, row by row, cols ascending: what
    `(x == 0).nonzero(as_tuple=True)` gives, ~3x faster on our CPU for sparse zeros.

    Why: torch's comparisons and nonzero cost ~0.3-0.5 ns per element there, a bool cast ~0.04.
    So cast x to bool (True where x != 0), read the flags 8 at a time as int64 words, flip
    every flag with one xor, and run nonzero over the words (an eighth as many elements),
    then over the bytes of the few words that hold a zero of x.
    """
    R, V = x.shape
    if R * V < SMALL:
        return (x == 0).nonzero(as_tuple=True)  # fewer operations, for a small x
    flags = _scratch(scratch, "flags", (R, -(-V // 8) * 8), torch.bool, x.device)  # (R, V8)
    flags[:, :V].copy_(x)                                                 # True where x != 0
    flags[:, V:] = True                                                   # padding: no zeros
    words = flags.view(torch.int64).bitwise_xor_(WORD_OF_ONES)           # (R, V8 / 8)
    rows, word = words.nonzero(as_tuple=True)                             # words with a zero
    hit, byte = words[rows, word].view(torch.uint8).view(-1, 8).nonzero(as_tuple=True)
    return rows[hit], word[hit] * 8 + byte


def _pack_rows(rows, count, columns, fills):
    """Entries listed row by row (`rows` ascending, `count` (R,) per row) as (R, C) tables,
    one per tensor of `columns`, padded with `fills` to C = the largest count (at least 1)."""
    R = count.shape[0]
    C = max(int(count.max()), 1)
    slot = torch.arange(rows.numel(), device=rows.device) - (count.cumsum(0) - count)[rows]
    tables = []
    for column, fill in zip(columns, fills):
        table = torch.full((R, C), fill, dtype=column.dtype, device=column.device)
        table[rows, slot] = column
        tables.append(table)
    return tables


def _scratch(scratch, name, shape, dtype, device):
    """A work tensor kept in `scratch` (a dict) and reused from step to step: at batch 8-64,
    fresh memory of vocabulary size costs page faults worth more than the work done in it."""
    key = (name, tuple(shape), dtype, device)
    if key not in scratch:
        scratch[key] = torch.empty(shape, dtype=dtype, device=device)
    return scratch[key]


def _filter_window(values, params):
    """Apply top-k, top-p and min-p to ranked windows (B, M). Returns the verdicts, whether
    each row's window was wide enough to be sure of them, and top-k's threshold (B, 1).

    Rows without top-k (`params.wide`) are never sure here: top-p needs their whole
    vocabulary's probability, and `_Buckets` settles them."""
    B, M = values.shape
    V = params.vocab_size
    always = torch.ones((), dtype=torch.bool, device=values.device).expand(B, M)  # a filter that is off
    k = params.top_k                                                     # (B,)
    k_active = (k > 0) & (k < V)
    kth = values.gather(-1, (k - 1).clamp(0, M - 1)[:, None])           # (B, 1)
    kept_top_k = (~k_active[:, None] | (values >= kth)) if params.uses_top_k else always

    kept_top_p = always
    if params.uses_top_p and params.uses_top_k:
        # The distribution top-p looks at: what top-k left, renormalized.
        masked = values.masked_fill(~kept_top_k, NEG_INF).double()
        probs = torch.exp(masked - torch.logsumexp(masked, dim=-1, keepdim=True))  # (B, M)
        before = probs.cumsum(dim=-1) - probs
        p = params.top_p.double()                                        # (B, 1)
        n_keep = (before < p).sum(dim=-1, keepdim=True).clamp(min=1)
        last_kept = values.gather(-1, n_keep - 1)
        kept_top_p = (p >= 1) | (values >= last_kept)

    kept_min_p = always
    if params.uses_min_p:
        m = params.min_p                                                 # (B, 1)
        kept_min_p = (m <= 0) | (torch.exp(values - values[:, :1]) >= m)

    kept = kept_top_k & kept_top_p & kept_min_p & torch.isfinite(values)
    if params.any_greedy:
        kept[params.greedy, 1:] = False  # greedy keeps only the best token, the lowest id among ties

    # The window proves its answer when its last token is dropped and top-k's threshold
    # (with its ties) lies inside it; otherwise a kept token could lie beyond it.
    sure = ~kept[:, -1] & (~k_active | ((k < M) & (values[:, -1] < kth[:, 0])))
    sure = (sure | params.greedy | (M >= V)) & ~params.wide
    return (kept, kept_top_k, kept_top_p, kept_min_p), sure, kth


def select_candidates(logits, params, window=256):
    """Steps 6-8 for a batch of tempered logits (B, V), without sorting the whole vocabulary.

    Each row gets a window of its `window` best tokens (wider when top-k asks for more).
    Rows the window cannot settle (no top-k: top-p and min-p need the whole vocabulary's
    probability; or top-k's threshold tied at the window's edge) take their thresholds from
    `_Buckets`; rows whose kept tokens reach the window's end are listed whole, sorted, and
    the other rows padded to the vocabulary's width. Exact either way.
    """
    return _listed(logits, params, window, tempered=True)[0]


def _listed(logits, params, window, u=None, tempered=False):
    """select_candidates, and with u given also the draw: (candidates, tokens, ranks).

    Unless `tempered`, the logits are those before temperature, which is then applied to
    the windows only (and to the rows `_Buckets` settles): dividing by T > 0 keeps the order,
    so the window of the tempered logits is the window of these, tempered.
    """
    width = min(params.vocab_size, max(window, params.k_max + 1))
    values, ids = _ranked_window(logits, width, params.scratch)           # (B, M)
    if not tempered:
        values, ids = _temper_window(values, ids, params)
    verdicts, sure, kth = _filter_window(values, params)
    candidates = _candidates(ids, values, verdicts)
    ranks = tokens = None
    if u is not None:
        ranks = inverse_cdf(candidates, u.nan_to_num(0.0))                # right where sure
        tokens = ids.gather(-1, ranks[:, None])[:, 0]
    if bool(sure.all()):
        return candidates, tokens, ranks

    redo = (~sure).nonzero().flatten()
    redo_logits = logits[redo] if tempered else _temper(logits[redo], params, redo)  # (R, V)
    buckets = _Buckets(redo_logits, params, redo, kth[redo])
    verdicts = [v.contiguous() for v in verdicts]                          # writable
    for mine, theirs in zip(verdicts, buckets.verdicts(values[redo])):
        mine[redo] = theirs
    wider = redo[verdicts[0][redo, -1] & (width < params.vocab_size)]   # kept reach the edge
    if wider.numel():
        values, ids, verdicts = _widen(values, ids, verdicts, wider, redo_logits, buckets, redo)
    candidates = _candidates(ids, values, verdicts)
    if u is not None:
        tokens, ranks = tokens.clone(), ranks.clone()
        tokens[redo] = buckets.draw(u[redo])
        ranks[redo] = (ids[redo] == tokens[redo, None]).int().argmax(dim=-1)
    return candidates, tokens, ranks


def _temper(logits, params, rows=None):
    """Step 5 for the rows `rows` of the batch (all by default): l / T, greedy rows by 1."""
    if params.all_unit_temperature:
        return logits  # T = 1 changes nothing, bit for bit
    temperature = params.safe_temperature
    return apply_temperature(logits, temperature if rows is None else temperature[rows])


def _temper_window(values, ids, params):
    """Ranked windows (B, M) of logits before temperature, tempered and still ranked."""
    tempered = _temper(values, params)
    if tempered is values:
        return values, ids
    # Division keeps the order but may round two neighbours to one value; their tie is then
    # broken by id, as everywhere, which their old order need not follow.
    new_tie = (tempered[:, 1:] == tempered[:, :-1]) & (values[:, 1:] != values[:, :-1])
    if bool(new_tie.any()):
        return _rank(tempered, ids)
    return tempered, ids


def _candidates(ids, values, verdicts):
    kept, kept_top_k, kept_top_p, kept_min_p = verdicts
    return Candidates(ids=ids, logits=values, kept=kept, kept_top_k=kept_top_k,
                      kept_top_p=kept_top_p, kept_min_p=kept_min_p, n_kept=kept.sum(dim=-1))


def _widen(values, ids, verdicts, wider, redo_logits, buckets, redo):
    """The windows padded to the vocabulary's width, with rows `wider` listed whole and
    sorted, their verdicts from `buckets`, which settled rows `redo` (tempered logits
    `redo_logits`, (R, V))."""
    V = redo_logits.shape[-1]
    at = (redo[:, None] == wider[None, :]).int().argmax(dim=0)          # wider's place in redo
    full_values, full_ids = _ranked_window(redo_logits[at], V)          # (W, V)
    pad = V - values.shape[-1]
    values = torch.nn.functional.pad(values, (0, pad), value=NEG_INF)
    ids = torch.nn.functional.pad(ids, (0, pad), value=0)
    values[wider], ids[wider] = full_values, full_ids
    padded = []
    for mine, theirs in zip(verdicts, buckets.verdicts(full_values, at)):
        mine = torch.nn.functional.pad(mine, (0, pad), value=False)
        mine[wider] = theirs
        padded.append(mine)
    return values, ids, padded


# ----------------------------------------------------------------------------------------------
# Rows a window cannot settle: thresholds and the draw without sorting the vocabulary

class _Buckets:
    """The rows whose kept set can be wider than a window (R of them, (R, V) logits), settled
    without sorting the vocabulary.

    Why: with a flat distribution top-p 0.9 keeps most of the vocabulary, and a stable sort of
    50257 logits costs 4-8 ms per row on our 2-core EPYC, about a third of a batch-1 decode
    step. Both things to find, top-p's last kept token and the drawn token, are where a
    running sum in the draw's order (descending logit, ties by ascending id) first reaches a
    target. So: cut each row's logits into N_BUCKETS buckets by value (a larger logit never
    lands in a later bucket), add up each bucket's probability mass, find the bucket where
    the running sum reaches the target, and sort only that bucket's members (a few dozen).
    The masses are float64, as the reference's are; they are added in another order, so a
    sum can differ from the reference's in its last bits (~1e-16), never more.
    """

    N_BUCKETS = 4096  # a flat row of GPT-2's 50257 logits puts a few dozen in a bucket
    SPAN = 46.0  # logits more than this below the row's best (probability ratio < 1e-20)
    #              all share the last bucket

    def __init__(self, logits, params, rows, kth):
        self.logits = logits                                             # (R, V) float32
        R, V = logits.shape
        NB = self.N_BUCKETS
        self.scratch = params.scratch
        top = logits.amax(dim=-1, keepdim=True)                          # (R, 1)
        span = (top - logits.amin(dim=-1, keepdim=True)).clamp_(1e-6, self.SPAN)
        shifted = torch.sub(logits, top, out=self._buffer("shifted", (R, V), torch.float32))
        # Each token's mass exp(l - top): the difference in float64, where it is exact as in
        # the reference's softmax; exp(x) as 2^(x log2 e), twice as fast in float64 on our CPU,
        # differing in the last bits only, as two orders of summation do.
        weights = self._buffer("weights", (R, V), torch.float64).copy_(logits)
        torch.add(top.double() * -LOG2_E, weights, alpha=LOG2_E, out=weights).exp2_()
        min_p_relative = None
        if params.uses_min_p:
            min_p_relative = torch.exp(shifted)                          # as apply_min_p, float32
        # Each logit's bucket: 0 for the row's best, NB - 1 for -inf. As int64 for scatter_add,
        # and as float32 for `_bucket_table`, whose subtraction reads half the memory then.
        self.bucket_f = shifted.mul_(-(NB - 1) / span).clamp_(max=NB - 1).floor_()
        self.bucket = self._buffer("bucket", (R, V), torch.long).copy_(self.bucket_f)  # (R, V)
        self.kth = torch.full((R, 1), NEG_INF, device=logits.device)     # top-k's threshold
        if params.uses_top_k and kth is not None:
            k = params.top_k[rows]
            self.kth = torch.where(((k > 0) & (k < V))[:, None], kth, NEG_INF)  # from the window
            if bool((self.kth > NEG_INF).any()):
                weights = weights.masked_fill(logits < self.kth, 0.0)
        running = self._running_mass(weights)                            # (R, NB)

        # Top-p, on what top-k left: the last kept token is the first whose running sum, itself
        # included, reaches p * total (the mass before it is still < p * total).
        p = params.top_p[rows].double()                                  # (R, 1)
        self.p_active = p[:, 0] < 1
        self.tau = torch.full((R, 1), NEG_INF, device=logits.device)     # top-p's last kept logit
        kept_weights, kept_running = weights, running
        if bool(self.p_active.any()):
            table = self._bucket_table(weights, running, p[:, 0] * running[:, -1], strict=False)
            last = table.first()
            self.tau = torch.where(self.p_active[:, None], table.values.gather(-1, last), NEG_INF)
            # The kept mass: the buckets ahead, and the last bucket's tokens down to tau.
            kept_in_last = table.w.masked_fill(table.values < self.tau, 0.0).sum(dim=-1)
            kept_total = torch.where(self.p_active, table.before + kept_in_last, running[:, -1])
            beyond = torch.arange(NB, device=logits.device) >= table.bucket[:, None]
            beyond &= self.p_active[:, None]
            kept_running = torch.where(beyond, kept_total[:, None], running)
            kept_weights = None  # tokens below tau still carry weight; draw() masks its table

        self.m = params.min_p[rows]                                      # (R, 1)
        if params.uses_min_p and bool((self.m > 0).any()):
            keep = (self.m <= 0) | (min_p_relative >= self.m)
            keep &= logits >= self.tau
            kept_weights = weights.masked_fill(~keep, 0.0)
            kept_running = self._running_mass(kept_weights)
        self.weights = weights if kept_weights is None else kept_weights
        self.kept_running = kept_running

    def _buffer(self, name, shape, dtype):
        return _scratch(self.scratch, name, shape, dtype, self.logits.device)

    def _running_mass(self, weights):
        """Running sum of the buckets' masses, best bucket first. (R, V) -> (R, NB) float64"""
        mass = torch.zeros(weights.shape[0], self.N_BUCKETS, dtype=torch.float64,
                           device=weights.device)
        return mass.scatter_add_(1, self.bucket, weights).cumsum_(dim=-1)

    def _bucket_table(self, weights, running, target, strict):
        """The bucket where the running sum first reaches target (> target when strict),
        its members sorted in the draw's order, as a small (R, C) table."""
        R = weights.shape[0]
        bucket = torch.searchsorted(running, target[:, None], right=strict)[:, 0]
        bucket = bucket.clamp(max=self.N_BUCKETS - 1)                     # (R,)
        before = running.gather(-1, (bucket - 1).clamp(min=0)[:, None])[:, 0]
        before = torch.where(bucket > 0, before, 0.0)                    # mass of the buckets ahead
        off_bucket = torch.sub(self.bucket_f, bucket[:, None].float(),
                               out=self._buffer("off_bucket", weights.shape, torch.float32))
        row, col = _zero_positions(off_bucket, self.scratch)              # ids ascend within a row
        count = torch.bincount(row, minlength=R)                          # (R,)
        ids, values, w = _pack_rows(row, count, [col, self.logits[row, col], weights[row, col]],
                                    [0, NEG_INF, 0.0])                    # (R, C)
        values, order = values.sort(dim=-1, descending=True, stable=True)  # ties keep id order
        return _Table(bucket, before, ids.gather(-1, order), values, w.gather(-1, order),
                      target, strict)

    def draw(self, u):
        """Step 10 for these rows: the first kept token whose cumulative probability exceeds
        u (float64, (R,)). As in `inverse_cdf`, a u above a total that rounding left a hair
        under 1 goes to the last kept token. -> (R,) token ids"""
        running = self.kept_running
        target = u * running[:, -1]
        table = self._bucket_table(self.weights, running, target, strict=True)
        table.w = table.w.masked_fill(table.values < self.tau, 0.0)     # below top-p's cut
        tokens = table.ids.gather(-1, table.first())[:, 0]
        past_the_end = target >= running[:, -1]
        if bool(past_the_end.any()):
            tokens = torch.where(past_the_end, self._last_kept(), tokens)
        return tokens

    def _last_kept(self):
        """The last kept token of each row in the draw's order: the smallest kept logit, the
        highest id among its ties."""
        kept = (self.weights > 0) & (self.logits >= self.tau)
        smallest = self.logits.masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)
        at = kept & (self.logits == smallest)
        V = self.logits.shape[-1]
        return (at * torch.arange(1, V + 1, device=at.device)).argmax(dim=-1)

    def verdicts(self, values, rows=None):
        """kept, kept_top_k, kept_top_p, kept_min_p of ranked logits (descending) of these
        rows (or of the subset `rows` of them)."""
        kth, tau, m, p_active = self.kth, self.tau, self.m, self.p_active
        if rows is not None:
            kth, tau, m, p_active = kth[rows], tau[rows], m[rows], p_active[rows]
        kept_top_k = values >= kth
        kept_top_p = ~p_active[:, None] | (values >= tau)
        kept_min_p = (m <= 0) | (torch.exp(values - values[:, :1]) >= m)
        kept = kept_top_k & kept_top_p & kept_min_p & torch.isfinite(values)
        return kept, kept_top_k, kept_top_p, kept_min_p


@dataclass
class _Table:
    """One bucket per row, its members sorted in the draw's order (padding: -inf, weight 0)."""
    bucket: torch.Tensor    # (R,) which bucket
    before: torch.Tensor    # (R,) float64 mass of the buckets ahead of it
    ids: torch.Tensor       # (R, C)
    values: torch.Tensor    # (R, C) logits
    w: torch.Tensor         # (R, C) float64 weights
    target: torch.Tensor    # (R,) float64
    strict: bool

    def first(self):
        """(R, 1) position of the first member whose running sum reaches the target. Where
        rounding leaves the members' sum a hair short of the bucket's, the last member."""
        running = self.before[:, None] + self.w.cumsum(dim=-1)            # (R, C)
        hit = running > self.target[:, None] if self.strict else running >= self.target[:, None]
        hit &= self.w > 0
        last = (self.w > 0).long().cumsum(dim=-1).argmax(dim=-1)         # the last weighted member
        return torch.where(hit.any(dim=-1), hit.int().argmax(dim=-1), last)[:, None]


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
    """What one sampling step decided, per row. `candidates` and `ranks` feed the explain
    trace; they are None when sample_step was asked not to list them."""
    tokens: torch.Tensor          # (B,) the chosen ids
    ranks: torch.Tensor | None    # (B,) the chosen token's place among the candidates
    u: torch.Tensor               # (B,) float64; NaN for greedy rows, which draw nothing
    candidates: Candidates | None
    adjusted: torch.Tensor        # (B, V) logits after clean-up, bias and penalties (pre-temperature)


def sample_step(logits, params, generators, n_valid, seen=None, counts=None, window=256,
                candidates=True):
    """SAMPLING.md §1 for one step of a batch: raw logits (B, V) -> the chosen tokens.

    `generators` holds one torch.Generator per row (greedy rows ignore their u); `seen` (B, V)
    bool marks ids in the prompt or output so far, `counts` (B, V) counts generated ids; both
    are needed only when a row uses penalties. `candidates=False` skips listing the candidates
    for the explain trace (Step.candidates and Step.ranks are then None): the tokens are the
    same, and a batch without top-k needs no window at all.
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
    if params.all_greedy:
        u = torch.full((len(params),), math.nan, dtype=torch.float64, device=logits.device)
    else:
        u = draw_uniforms(generators, logits.device)
        if params.any_greedy:
            u = u.masked_fill(params.greedy, math.nan)

    # Temperature (step 5) is applied where it is needed: by `_listed` to each row's window
    # of best tokens (and to whole rows only where the window cannot settle them); greedy
    # rows divide by 1, their order being all that matters.
    if candidates or not params.all_wide:
        listed, tokens, ranks = _listed(logits, params, window, u)
        if not candidates:
            listed = ranks = None
    else:  # no row has top-k or is greedy, and no one will read the candidates
        tokens, listed, ranks = _draw_wide_rows(_temper(logits, params), params, u), None, None
    return Step(tokens=tokens, ranks=ranks, u=u, candidates=listed, adjusted=logits)


ROWS_AT_ONCE = 16


def _draw_wide_rows(logits, params, u):
    """`_Buckets` draws for every row, ROWS_AT_ONCE rows at a time: each row's result is its
    own, and at batch 64 sixteen rows at once take half the time all 64 do (their float64
    temporaries, 6 MB instead of 26 MB, stay in cache and need no fresh pages)."""
    tokens = []
    for start in range(0, len(params), ROWS_AT_ONCE):
        rows = params.all_rows[start:start + ROWS_AT_ONCE]
        tokens.append(_Buckets(logits[start:start + ROWS_AT_ONCE], params, rows, None).draw(u[rows]))
    return torch.cat(tokens)


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


def multinomial_step(logits, params, generator, n_valid, window=256, candidates=True):
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
        listed = sample_step(logits, params, [torch.Generator()], n_valid, window=window).candidates
        ranks = (listed.ids == tokens[:, None]).int().argmax(dim=-1)      # (1,)
    u = torch.full((1,), math.nan, dtype=torch.float64, device=logits.device)
    return Step(tokens=tokens, ranks=ranks, u=u, candidates=listed, adjusted=clean)
