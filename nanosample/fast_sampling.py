"""The exact fast path of the sampler: SAMPLING.md's steps 4-10 on large vocabularies.

`sampling.py` is the sampler as SAMPLING.md reads: every filter on every token, one sort, the
inverse-CDF draw. On GPT-2's 50257 tokens that sorting costs milliseconds per row and step;
this module finds the same kept sets and draws the same tokens from far less work:

- each row gets a window of its few hundred best tokens (chunk maxima give a floor under the
  window's last logit, so no `topk` over the vocabulary), temperature is applied to windows
  only, and the filters run on the windows (`_filter_window`);
- rows a window cannot settle (no top-k: top-p needs the whole row's probability) go to
  `_Buckets`: 4096 buckets by value, their float64 masses summed, and only the one bucket
  where a running sum reaches its target is sorted.

Its contract is tests/test_sampling.py: the same kept sets, flags and tokens as `sampling.py`'s
readable path for the same generators (exact up to the last bits of float64 sums, which can
only matter when u falls within ~1e-16 of a boundary). `sampling.sample_step` chooses which
path runs (`sampling.use_fast_path`).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nanosample import sampling

NEG_INF = float("-inf")
FILTERS = ("top_k", "top_p", "min_p")  # the filters of sampling.FILTERS this module applies


class _Plan:
    """What the fast path needs to know of a batch's settings, worked out once per batch
    (kept in `BatchParams.scratch`) from the per-row columns of `sampling.BatchParams`."""

    def __init__(self, params):
        rows, V = params.rows, params.vocab_size
        self.rows, self.vocab_size, self.scratch = rows, V, params.scratch
        self.top_k = params.top_k[:, 0]                                   # (B,)
        self.k_active = (self.top_k > 0) & (self.top_k < V)               # (B,) top-k on
        self.top_p, self.min_p = params.top_p, params.min_p               # (B, 1)
        self.greedy, self.any_greedy = params.greedy, params.any_greedy   # (B,)
        self.safe_temperature = params.safe_temperature                   # (B, 1), greedy rows 1
        self.uses_top_p, self.uses_min_p = params.on["top_p"], params.on["min_p"]
        self.uses_top_k = any(0 < r.top_k < V for r in rows)
        self.k_max = max(r.top_k for r in rows) if self.uses_top_k else 0
        self.all_unit_temperature = all(r.temperature in (0, 1) for r in rows)
        self.min_temperature = min(r.temperature or 1.0 for r in rows)  # greedy rows: 1
        # Rows without top-k (and not greedy) may keep more tokens than any window holds;
        # `_Buckets` settles them.
        self.wide = torch.tensor([not r.greedy and not 0 < r.top_k < V for r in rows],
                                 device=self.top_k.device)                # (B,)
        self.all_wide = bool(self.wide.all())
        self.all_rows = torch.arange(len(rows), device=self.top_k.device)

    def __len__(self):
        return len(self.rows)


def plan(params):
    """The `_Plan` of a `sampling.BatchParams` (made on first use), or the plan itself."""
    if isinstance(params, _Plan):
        return params
    if "plan" not in params.scratch:
        params.scratch["plan"] = _Plan(params)
    return params.scratch["plan"]


def sample_step(adjusted, params, u, window=256, candidates=True):
    """Steps 4-10 for a batch: logits after clean-up, bias and penalties (B, V), and each
    row's u (NaN for greedy rows) -> (tokens, ranks, candidates), as `sampling.sample_step`.

    `candidates=False` skips listing the candidates for the explain trace (they and the ranks
    are then None): the tokens are the same, and a batch without top-k needs no window at all.
    Up to ONE_THREAD_MAX logits, it runs on one of torch's threads (`one_thread`).
    """
    with one_thread(few_logits(adjusted)):
        return _sample_step(adjusted, plan(params), u, window, candidates)


# Batches of up to this many logits (8 rows of GPT-2, padded to 50304 as nanoGPT does) sample
# on one thread.
ONE_THREAD_MAX = 8 * 50304


def few_logits(logits):
    """Whether a batch of logits is small enough to sample on one thread (`one_thread`)."""
    return logits.device.type == "cpu" and logits.numel() <= ONE_THREAD_MAX


@contextmanager
def one_thread(on):
    """Torch's intra-op threads at one while inside, then back to what they were; if `on`.

    Why: a step of this sampler is 150-250 small operations. On several threads each one
    ends at a barrier, and on a busy machine a barrier waits for whichever thread the system
    has set aside: on the 2-core EPYC at load average 7-9, top-p 0.9 on a random GPT-2's
    logits took 157 ms a step at batch 1 with torch's 2 threads against 2.5 ms with one, and
    228 against 16 ms at batch 8. Up to batch 8 the operations are small (docs/bench.md: on
    a quiet machine a batch-1 step is ~100 of them, 0.9 ms alone), so a second thread has
    little to gain there; larger batches keep the caller's threads, which split each pass
    over the vocabulary when the machine is quiet. No result depends on the thread count
    (tests/test_sampling.py checks a row alone and in a batch of 10).
    """
    threads = torch.get_num_threads()
    if not on or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sample_step(adjusted, params, u, window, candidates):
    # Temperature (step 5) is applied where it is needed: by `_listed` to each row's window
    # of best tokens (and to whole rows only where the window cannot settle them); greedy
    # rows divide by 1, their order being all that matters.
    if candidates or not params.all_wide:
        listed, tokens, ranks = _listed(adjusted, params, window, u)
        if not candidates:
            listed = ranks = None
        return tokens, ranks, listed
    # no row has top-k or is greedy, and no one will read the candidates
    return _draw_wide_rows(_temper(adjusted, params), params, u), None, None


# ----------------------------------------------------------------------------------------------
# A window of each row's best tokens

def _ranked_window(logits, width, scratch=None, lowest_ties=True):
    """The `width` largest logits of each row, descending, ties by ascending id. Where one tie
    group fills a window, its lowest ids when `lowest_ties` (greedy takes the lowest), else any
    of its members (a row whose kept tokens reach the window's edge is listed whole later)."""
    if width >= logits.shape[-1]:
        values, ids = logits.sort(dim=-1, descending=True, stable=True)  # ids ascend within ties
        return values, ids
    window = _window_above_floor(logits, width, {} if scratch is None else scratch)
    if window is not None:
        return window
    values, ids = logits.topk(width, dim=-1)                             # (B, M), tie order unknown
    values, ids = _rank(values, ids)
    if lowest_ties:  # topk took any `width` members of a tie group that fills the window
        for r in (values[:, -1] == values[:, 0]).nonzero().flatten().tolist():
            ids[r] = (logits[r] == values[r, 0]).nonzero().flatten()[:width]
    return values, ids


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
SMALL = 1 << 15  # below this many elements, plain torch ops (fewer of them) are faster


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
    k, k_active = params.top_k, params.k_active                          # (B,)
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
        kept_min_p = _kept_by_min_p(values, m)

    kept_top_k, kept_top_p, kept_min_p = _in_order(values, kept_top_k, kept_top_p, kept_min_p)
    kept = kept_min_p
    if params.any_greedy:
        kept = kept.clone()
        kept[params.greedy, 1:] = False  # greedy keeps only the best token, the lowest id among ties

    # The window proves its answer when its last token is dropped and top-k's threshold
    # (with its ties) lies inside it; otherwise a kept token could lie beyond it.
    sure = ~kept[:, -1] & (~k_active | ((k < M) & (values[:, -1] < kth[:, 0])))
    sure = (sure | params.greedy | (M >= V)) & ~params.wide
    return (kept, kept_top_k, kept_top_p, kept_min_p), sure, kth


def _kept_by_min_p(values, m):
    """Min-p's verdict on ranked logits (B, M), best first: p_i / max(p) >= m, as
    `sampling.apply_min_p`; m (B, 1) <= 0 is off."""
    return (m <= 0) | (torch.exp(values - values[:, :1]) >= m)


def _in_order(values, kept_top_k, kept_top_p, kept_min_p):
    """Each filter's verdict as the readable path gives it: kept by this filter and by every
    one before it (a token top-k dropped is never kept by min-p), finite logits only."""
    kept_top_k = kept_top_k & torch.isfinite(values)
    kept_top_p = kept_top_p & kept_top_k
    return kept_top_k, kept_top_p, kept_min_p & kept_top_p


def select_candidates(logits, params, window=256):
    """Steps 6-8 for a batch of tempered logits (B, V), without sorting the whole vocabulary.

    Each row gets a window of its `window` best tokens (wider when top-k asks for more).
    Rows the window cannot settle (no top-k: top-p and min-p need the whole vocabulary's
    probability; or top-k's threshold tied at the window's edge) take their thresholds from
    `_Buckets`; rows whose kept tokens reach the window's end are listed whole, sorted, and
    the other rows padded to the vocabulary's width. Exact either way.
    """
    return _listed(logits, plan(params), window, tempered=True)[0]


def _listed(logits, params, window, u=None, tempered=False):
    """select_candidates, and with u given also the draw: (candidates, tokens, ranks).

    Unless `tempered`, the logits are those before temperature, which is then applied to
    the windows only (and to the rows `_Buckets` settles): dividing by T > 0 keeps the order,
    so the window of the tempered logits is the window of these, tempered.
    """
    width = min(params.vocab_size, max(window, params.k_max + 1))
    values, ids = _ranked_window(logits, width, params.scratch, params.any_greedy)  # (B, M)
    if not tempered:
        values, ids = _temper_window(values, ids, params)
    verdicts, sure, kth = _filter_window(values, params)
    candidates = _candidates(ids, values, verdicts)
    ranks = tokens = None
    if u is not None:
        ranks = sampling.inverse_cdf(candidates, u.nan_to_num(0.0))                # right where sure
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


def _temper(logits, params, rows=None, ranked=False):
    """Step 5 for the rows `rows` of the batch (all by default): l / T, greedy rows by 1.
    `ranked`: each row is sorted, descending (a window)."""
    if params.all_unit_temperature:
        return logits  # T = 1 changes nothing, bit for bit
    temperature = params.safe_temperature
    return sampling.apply_temperature(logits, temperature if rows is None else temperature[rows],
                                      ranked=ranked, may_overflow=params.min_temperature < 1)


def _temper_window(values, ids, params):
    """Ranked windows (B, M) of logits before temperature, tempered and still ranked."""
    tempered = _temper(values, params, ranked=True)
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
    return sampling.Candidates(ids=ids, logits=values, kept=kept, kept_top_k=kept_top_k,
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
        params = plan(params)
        self.logits = logits                                             # (R, V) float32
        self.scratch = params.scratch
        # The filters in SAMPLING.md's order: top-k zeroes its dropped tokens' weights, top-p
        # finds its cut in what is left, min-p keeps what both left and passes its own test.
        weights, min_p_relative = self._weights_and_buckets(params)
        weights = self._top_k_cut(weights, params, rows, kth)
        running = self._running_mass(weights)                            # (R, NB)
        kept_weights, kept_running = self._top_p_cut(weights, running, params, rows)
        self.m = params.min_p[rows]                                      # (R, 1)
        if params.uses_min_p and bool((self.m > 0).any()):
            kept_weights, kept_running = self._min_p_cut(weights, min_p_relative)
        self.weights = weights if kept_weights is None else kept_weights
        self.kept_running = kept_running

    def _weights_and_buckets(self, params):
        """Each token's mass exp(l - top), (R, V) float64, and min-p's exp(l - top) in float32
        (None without min-p); sets each token's bucket (self.bucket, self.bucket_f)."""
        logits = self.logits
        R, V = logits.shape
        NB = self.N_BUCKETS
        top = logits.amax(dim=-1, keepdim=True)                          # (R, 1)
        span = (top - logits.amin(dim=-1, keepdim=True)).clamp_(1e-6, self.SPAN)
        shifted = torch.sub(logits, top, out=self._buffer("shifted", (R, V), torch.float32))
        # Each token's mass exp(l - top): the difference in float64, where it is exact, then
        # exp, as the reference's softmax computes it. (2^(x log2 e) took 15 % longer on the
        # 2-core AMD EPYC the bench runs on, and rounds x log2 e besides: 296 against 250 us
        # per row of 50257, `exp` measured on the logits of a random GPT-2, 16 rows at once.)
        weights = self._buffer("weights", (R, V), torch.float64).copy_(logits)
        weights.sub_(top.double()).exp_()
        min_p_relative = None
        if params.uses_min_p:  # before `shifted` becomes the bucket numbers, in place
            min_p_relative = torch.exp(shifted)                          # as apply_min_p, float32
        # Each logit's bucket: 0 for the row's best, NB - 1 for -inf. As int64 for scatter_add,
        # and as float32 for `_bucket_table`, whose subtraction reads half the memory then.
        self.bucket_f = shifted.mul_(-(NB - 1) / span).clamp_(max=NB - 1).floor_()
        self.bucket = self._buffer("bucket", (R, V), torch.long).copy_(self.bucket_f)  # (R, V)
        return weights, min_p_relative

    def _top_k_cut(self, weights, params, rows, kth):
        """The weights with top-k's dropped tokens at 0; sets self.kth, top-k's threshold
        (taken from the window, -inf where top-k is off)."""
        R = self.logits.shape[0]
        self.kth = torch.full((R, 1), NEG_INF, device=self.logits.device)
        if params.uses_top_k and kth is not None:
            self.kth = torch.where(params.k_active[rows, None], kth, NEG_INF)  # from the window
            if bool((self.kth > NEG_INF).any()):
                weights = weights.masked_fill(self.logits < self.kth, 0.0)
        return weights

    def _top_p_cut(self, weights, running, params, rows):
        """Top-p, on what top-k left: (kept weights or None, kept running mass (R, NB)); sets
        self.p_active and self.tau, top-p's last kept logit (-inf where top-p is off).

        The last kept token is the first whose running sum, itself included, reaches
        p * total (the mass before it is still < p * total)."""
        R = self.logits.shape[0]
        p = params.top_p[rows].double()                                  # (R, 1)
        self.p_active = p[:, 0] < 1
        self.tau = torch.full((R, 1), NEG_INF, device=self.logits.device)
        if not bool(self.p_active.any()):
            return weights, running
        table = self._bucket_table(weights, running, p[:, 0] * running[:, -1], strict=False)
        last = table.first()
        self.tau = torch.where(self.p_active[:, None], table.values.gather(-1, last), NEG_INF)
        # The kept mass: the buckets ahead, and the last bucket's tokens down to tau.
        kept_in_last = table.w.masked_fill(table.values < self.tau, 0.0).sum(dim=-1)
        kept_total = torch.where(self.p_active, table.before + kept_in_last, running[:, -1])
        beyond = torch.arange(self.N_BUCKETS, device=self.logits.device) >= table.bucket[:, None]
        beyond &= self.p_active[:, None]
        kept_running = torch.where(beyond, kept_total[:, None], running)
        return None, kept_running  # tokens below tau still carry weight; draw() masks its table

    def _min_p_cut(self, weights, min_p_relative):
        """Min-p, on what top-k and top-p left: (kept weights, their running mass)."""
        keep = (self.m <= 0) | (min_p_relative >= self.m)
        keep &= self.logits >= self.tau
        kept_weights = weights.masked_fill(~keep, 0.0)
        return kept_weights, self._running_mass(kept_weights)

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
        bucket = torch.searchsorted(running, target[:, None], right=strict)
        bucket = bucket.clamp_(max=self.N_BUCKETS - 1)                    # (R, 1)
        ahead = running.gather(-1, (bucket - 1).clamp_(min=0))
        before = ahead.masked_fill_(bucket == 0, 0.0)[:, 0]              # mass of the buckets ahead
        off_bucket = torch.sub(self.bucket_f, bucket,
                               out=self._buffer("off_bucket", weights.shape, torch.float32))
        row, col = _zero_positions(off_bucket, self.scratch)              # ids ascend within a row
        count = torch.bincount(row, minlength=R)                          # (R,)
        ids, values, w = _pack_rows(row, count, [col, self.logits[row, col], weights[row, col]],
                                    [0, NEG_INF, 0.0])                    # (R, C)
        values, order = values.sort(dim=-1, descending=True, stable=True)  # ties keep id order
        return _Table(bucket[:, 0], before, ids.gather(-1, order), values, w.gather(-1, order),
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
        kept_min_p = _kept_by_min_p(values, m)
        kept_top_k, kept_top_p, kept_min_p = _in_order(values, kept_top_k, kept_top_p, kept_min_p)
        return kept_min_p, kept_top_k, kept_top_p, kept_min_p


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
        weighted = self.w > 0                                             # (R, C)
        running = self.w.cumsum(dim=-1).add_(self.before[:, None])        # (R, C)
        target = self.target[:, None]
        hit = running > target if self.strict else running >= target
        hit &= weighted
        first = hit.int().argmax(dim=-1, keepdim=True)                    # (R, 1)
        reached = hit.any(dim=-1, keepdim=True)
        if bool(reached.all()):
            return first
        last = weighted.long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # the last weighted member
        return torch.where(reached, first, last)



# ----------------------------------------------------------------------------------------------
# Rows no window settles, drawn without listing them

ROWS_AT_ONCE = 16


def _draw_wide_rows(logits, params, u):
    """`_Buckets` draws for every row, ROWS_AT_ONCE rows at a time: each row's result is its
    own, and at batch 64 sixteen rows at once take half the time all 64 do (their float64
    temporaries, 6 MB instead of 26 MB, stay in cache and need no fresh pages)."""
    params = plan(params)
    tokens = []
    for start in range(0, len(params), ROWS_AT_ONCE):
        rows = params.all_rows[start:start + ROWS_AT_ONCE]
        tokens.append(_Buckets(logits[start:start + ROWS_AT_ONCE], params, rows, None).draw(u[rows]))
    return torch.cat(tokens)
