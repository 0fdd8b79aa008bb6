"""The sampler against SAMPLING.md: its test vectors, Hugging Face's warpers, the sort-based
reference, a χ² test of the draw, and properties over random rows."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanosample import fast_sampling, sampling
from nanosample.fast_sampling import select_candidates
from nanosample.sampling import (BatchParams, SamplingParams, apply_frequency_presence, apply_min_p,
                      apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                      clean_logits, final_probabilities, greedy_tokens, inverse_cdf,
                      reference_truncate, sample_step)

NEG_INF = float("-inf")


def kept_ids(logits):
    """The ids a filter left, as a set, for a single row."""
    return set((logits[0] > NEG_INF).nonzero().flatten().tolist())


def fast_kept(logits, window=256, **settings):
    """Kept ids per row from the fast path, on logits that are already tempered."""
    params = BatchParams([SamplingParams(**settings)] * logits.shape[0], logits.shape[-1])
    cand = select_candidates(logits, params, window=window)
    return [set(cand.ids[r, cand.kept[r]].tolist()) for r in range(logits.shape[0])], cand


# ----------------------------------------------------------------------------------------------
# SAMPLING.md §2, exactly

PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()


@pytest.mark.parametrize("p, expected", [(0.7, {3, 2}), (0.8, {3, 2, 1}), (1.0, {0, 1, 2, 3})])
def test_top_p_vectors(p, expected):
    assert kept_ids(apply_top_p(PROBS, p)) == expected
    assert fast_kept(PROBS, top_p=p)[0][0] == expected


def test_top_k_vector():
    assert kept_ids(apply_top_k(PROBS, 2)) == {3, 2}
    assert fast_kept(PROBS, top_k=2)[0][0] == {3, 2}


def test_temperature_then_top_p_vector():
    tempered = apply_temperature(torch.tensor([[3.0, 2.0, 1.0]]), 0.5)
    assert kept_ids(apply_top_p(tempered, 0.8)) == {0}
    assert fast_kept(tempered, top_p=0.8)[0][0] == {0}
    # llama.cpp's default order (truncate first, temperature last) would keep {0, 1}
    assert kept_ids(apply_top_p(torch.tensor([[3.0, 2.0, 1.0]]), 0.8)) == {0, 1}


def test_min_p_vector():
    tempered = apply_temperature(torch.tensor([[5.0, 2.0, 1.5, 0.0]]), 2.0)
    assert kept_ids(apply_min_p(tempered, 0.1)) == {0, 1, 2}
    assert fast_kept(tempered, min_p=0.1)[0][0] == {0, 1, 2}


def test_greedy_and_top_k_ties_vector():
    logits = torch.tensor([[1.0, 4.0, 4.0, 2.0]])
    assert greedy_tokens(logits).tolist() == [1]
    assert kept_ids(apply_top_k(logits, 1)) == {1, 2}
    assert fast_kept(logits, top_k=1)[0][0] == {1, 2}
    step = sample_step(logits, BatchParams([SamplingParams(temperature=0)], 4), [None], 4)
    assert step.tokens.tolist() == [1]


def test_low_temperature_on_float16_does_not_overflow():
    logits = clean_logits(torch.tensor([[10.0, 9.0]], dtype=torch.float16), 2)
    tempered = apply_temperature(logits, 1e-4)
    assert tempered.dtype == torch.float32 and torch.isfinite(tempered).all()
    assert tempered[0].tolist() == pytest.approx([1e5, 9e4], rel=1e-6)
    probs = final_probabilities(fast_kept(tempered)[1])
    assert probs[0].max().item() == 1.0  # token 0 wins outright, nothing became NaN


def test_temperature_one_is_bit_exact():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 7
    assert torch.equal(apply_temperature(logits, torch.ones(4, 1)), logits)


def test_nan_logits_raise():
    logits = torch.zeros(2, 5)
    logits[1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        clean_logits(logits, 5)


def test_padded_vocabulary_is_never_drawn():
    # nanoGPT pads to 50304: ids past the tokenizer's vocabulary get -inf, even if they are best
    logits = torch.zeros(1, 8)
    logits[0, 6:] = 100.0
    cleaned = clean_logits(logits, 6)
    assert torch.isinf(cleaned[0, 6:]).all() and greedy_tokens(cleaned).tolist() == [0]


# ----------------------------------------------------------------------------------------------
# Against Hugging Face's processors, on random tie-free rows

def hf_processors():
    from transformers.generation import logits_process as lp
    return lp


def random_rows(n, vocab, seed, scale=3.0):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 0.9, 0.0), (0.7, 0, 0.5, 0.0), (1.3, 20, 1.0, 0.0), (0.8, 50, 0.95, 0.0),
    (1.0, 0, 1.0, 0.05), (0.6, 40, 0.9, 0.1), (2.0, 0, 0.3, 0.0), (1.0, 1, 1.0, 0.0),
])
def test_matches_hugging_face_warpers(temperature, top_k, top_p, min_p):
    lp = hf_processors()
    logits = random_rows(300, 500, seed=top_k + int(100 * top_p))
    scores = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = lp.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = lp.TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0:
        scores = lp.MinPLogitsWarper(min_p)(None, scores)
    hf_probs = torch.softmax(scores, dim=-1)

    tempered = apply_temperature(logits, temperature)
    ours = reference_truncate(tempered, top_k, top_p, min_p)
    assert torch.equal(ours > NEG_INF, scores > NEG_INF)
    assert (torch.softmax(ours, dim=-1) - hf_probs).abs().max() <= 1e-6

    kept, cand = fast_kept(tempered, top_k=top_k, top_p=top_p, min_p=min_p)
    assert kept == [set((scores[r] > NEG_INF).nonzero().flatten().tolist()) for r in range(300)]
    q = final_probabilities(cand).float()
    hf_q = hf_probs.gather(-1, cand.ids)
    assert (q - hf_q).abs().max() <= 1e-6


def test_repetition_penalty_matches_hugging_face():
    lp = hf_processors()
    logits = random_rows(50, 200, seed=3)
    history = torch.randint(0, 200, (50, 30), generator=torch.Generator().manual_seed(4))
    expected = lp.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    seen = torch.zeros(50, 200, dtype=torch.bool).scatter_(1, history, True)
    ours = apply_repetition_penalty(logits, seen, torch.full((50, 1), 1.3))
    assert (ours - expected).abs().max() <= 1e-6


def test_frequency_and_presence_penalties():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_frequency_presence(logits, counts, torch.tensor([[0.5]]), torch.tensor([[0.25]]))
    assert out.tolist() == [[0.0, -0.75, -1.75, 0.0]]


# ----------------------------------------------------------------------------------------------
# The fast path equals the sort-based reference, fallback rows included

@pytest.mark.parametrize("window", [4, 16, 256])
@pytest.mark.parametrize("quantized", [False, True])
def test_fast_path_equals_reference(window, quantized):
    gen = torch.Generator().manual_seed(window)
    logits = torch.randn(64, 300, generator=gen) * torch.rand(64, 1, generator=gen) * 6
    if quantized:  # many exact ties, to exercise the tie rules at every boundary
        logits = (logits * 2).round() / 2
    cases = [dict(top_p=0.37), dict(top_p=0.9), dict(top_p=0.999), dict(top_k=3),
             dict(top_k=40, top_p=0.61), dict(min_p=0.02), dict(top_p=0.83, min_p=0.2),
             dict(top_k=299, top_p=0.97), dict()]
    for case in cases:
        expected = reference_truncate(logits, case.get("top_k", 0), case.get("top_p", 1.0),
                                      case.get("min_p", 0.0))
        kept, cand = fast_kept(logits, window=window, **case)
        assert kept == [set((expected[r] > NEG_INF).nonzero().flatten().tolist())
                        for r in range(64)], case
        # the kept tokens are a prefix of each row, in descending order, ties by ascending id
        for r in range(64):
            n = int(cand.n_kept[r])
            assert cand.kept[r, :n].all() and not cand.kept[r, n:].any()
            pairs = list(zip((-cand.logits[r, :n]).tolist(), cand.ids[r, :n].tolist()))
            assert pairs == sorted(pairs)


def test_flat_rows_fall_back_to_the_full_sort():
    # A flat row needs more than the window for top-p 0.9; a peaked row does not.
    logits = torch.zeros(2, 1000)
    logits[1, 7] = 20.0
    kept, cand = fast_kept(logits, window=16, top_p=0.9)
    assert len(kept[0]) == 1000  # all tied: all kept
    assert kept[1] == {7}
    assert cand.ids.shape[1] == 1000  # the batch was widened for the flat row


@pytest.mark.parametrize("width", [4, 16, 32])
def test_window_above_floor_equals_topk(width):
    # `_window_above_floor` finds each row's window without topk; it must give the first
    # `width` of a stable descending sort (ties by ascending id, even across the window's
    # edge), on rows with ties and -inf, and defer (None) where it cannot help, e.g. a row of
    # one value everywhere.
    gen = torch.Generator().manual_seed(width)
    logits = torch.randn(16, 5000, generator=gen) * torch.rand(16, 1, generator=gen) * 4
    logits[4:8] = (logits[4:8] * 8).round() / 8                  # many exact ties
    logits[8:10, ::3] = NEG_INF                                  # banned ids
    logits[10, :4990] = NEG_INF                                  # ten finite logits only
    values, ids = logits.sort(dim=-1, descending=True, stable=True)
    expected = values[:, :width], ids[:, :width]
    window = fast_sampling._window_above_floor(logits[:10], width, {})
    assert window is not None  # the route was taken for these rows
    for got, want in zip(window, expected):
        assert torch.equal(got, want[:10])
    assert fast_sampling._window_above_floor(logits, width, {}) is None  # row 10 has no floor
    flat = torch.zeros(4, 5000)
    assert fast_sampling._window_above_floor(flat, width, {}) is None   # a crowd of ties
    # topk's route (row 10 sends every row there) agrees up to which ties it took at the edge
    got_values, got_ids = fast_sampling._ranked_window(logits, width, {})
    assert torch.equal(got_values, expected[0])
    assert torch.equal(logits.gather(-1, got_ids), got_values)


@pytest.mark.parametrize("shape", [(5, 1003), (7, 50001), (1, 50257)])  # plain; 8 flags at a time
def test_zero_positions_equals_nonzero(shape):
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(*shape, generator=gen) * 40).floor() - 20     # ~1 in 40 entries is 0
    if shape[0] > 4:
        x[3] = 0.0                                                 # a row of zeros
        x[4] = 1.0                                                 # a row without
    rows, cols = fast_sampling._zero_positions(x, {})
    want_rows, want_cols = (x == 0).nonzero(as_tuple=True)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)


def test_temperature_on_the_window_equals_tempering_first():
    # sample_step applies temperature to each row's window only (and to rows the window
    # cannot settle); the candidates must be what tempering the whole row first gives. Row 0
    # holds two logits that differ before temperature 1.5 and tie after it, the larger at the
    # higher id: after temperature the tie goes to the lower id.
    gen = torch.Generator().manual_seed(8)
    raw = torch.randn(8, 5000, generator=gen) * 3
    raw[0] *= 0.1  # all below 1.5: ids 10 and 11 lead
    raw[0, 10], raw[0, 11] = 1.750000238418579, 1.7500003576278687
    assert (raw[0, 10] / 1.5 == raw[0, 11] / 1.5) and raw[0, 10] < raw[0, 11]
    for settings in (dict(temperature=1.5, top_k=50), dict(temperature=1.5, top_k=3, top_p=0.8),
                     dict(temperature=0.6, top_k=400, min_p=0.01)):
        params = BatchParams([SamplingParams(**settings)] * 8, 5000)
        seeds = [torch.Generator().manual_seed(s) for s in range(8)]
        step = sample_step(raw, params, seeds, 5000)
        cand = select_candidates(apply_temperature(raw, settings["temperature"]), params)
        assert torch.equal(step.candidates.ids, cand.ids), settings
        assert torch.equal(step.candidates.logits, cand.logits), settings
        assert torch.equal(step.candidates.kept, cand.kept), settings
        expected_tokens = cand.ids.gather(-1, inverse_cdf(cand, step.u)[:, None])[:, 0]
        assert torch.equal(step.tokens, expected_tokens), settings
        if settings["temperature"] == 1.5:
            assert step.candidates.ids[0, :2].tolist() == [10, 11]  # the new tie, by id


def reference_draw(tempered, u, top_k=0, top_p=1.0, min_p=0.0):
    """SAMPLING.md step 10 the slow way, one row: sort everything, accumulate, take the first
    token whose cumulative probability exceeds u."""
    kept = reference_truncate(tempered[None], top_k, top_p, min_p)[0]
    values, order = kept.sort(descending=True, stable=True)  # ties in ascending id order
    n = int((values > NEG_INF).sum())
    cdf = torch.softmax(values[:n].double(), dim=-1).cumsum(dim=-1)
    rank = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)),
               n - 1)
    return int(order[rank])


@pytest.mark.parametrize("settings", [dict(top_p=0.9), dict(top_p=0.5, temperature=0.7),
                                      dict(top_k=600, top_p=0.95), dict(min_p=0.05),
                                      dict(temperature=1.3), dict(top_p=0.8, min_p=0.02)])
@pytest.mark.parametrize("quantized", [False, True])
def test_rows_no_window_settles_draw_as_the_sorted_reference(settings, quantized):
    # Flat rows over 3000 ids: the window of 256 cannot settle them, so the bucketed search
    # finds the kept set and the drawn token. Both must be what sorting everything gives,
    # for 40 rows x 3 values of u each, ties included.
    gen = torch.Generator().manual_seed(11)
    raw = torch.randn(40, 3000, generator=gen) * torch.rand(40, 1, generator=gen) * 2
    if quantized:  # many exact ties
        raw = (raw * 4).round() / 4
    params = BatchParams([SamplingParams(**settings)] * 40, 3000)
    tempered = apply_temperature(raw, settings.get("temperature", 1.0))
    expected = reference_truncate(tempered, settings.get("top_k", 0), settings.get("top_p", 1.0),
                                  settings.get("min_p", 0.0))
    kept, cand = fast_kept(tempered, **{k: v for k, v in settings.items() if k != "temperature"})
    assert kept == [set((expected[r] > NEG_INF).nonzero().flatten().tolist()) for r in range(40)]
    if "top_k" not in settings:
        assert cand.ids.shape[1] == 3000  # the window did not settle them

    for trial in range(3):
        seeds = [1000 * trial + r for r in range(40)]
        listed = sample_step(raw, params, [torch.Generator().manual_seed(s) for s in seeds], 3000)
        quick = sample_step(raw, params, [torch.Generator().manual_seed(s) for s in seeds], 3000,
                            candidates=False)
        assert quick.candidates is None and quick.ranks is None
        assert torch.equal(listed.tokens, quick.tokens)
        assert torch.equal(listed.candidates.ids.gather(-1, listed.ranks[:, None])[:, 0],
                           listed.tokens)
        for r in range(40):
            u = listed.u[r].item()
            assert listed.tokens[r].item() == reference_draw(tempered[r], u, **{
                k: v for k, v in settings.items() if k != "temperature"}), (r, u)


def test_bucketed_draw_of_a_row_does_not_depend_on_its_batch():
    # SAMPLING.md §4: a sample's tokens do not depend on how samples are batched; the
    # bucketed path works 16 rows at a time, so batches of 1, 16 and 40 must agree.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 5000, generator=gen) * torch.rand(40, 1, generator=gen) * 3
    u = torch.rand(40, generator=gen, dtype=torch.float64)
    params = BatchParams([SamplingParams(top_p=0.9, temperature=0.9)] * 40, 5000)
    together = fast_sampling._draw_wide_rows(logits, params, u)
    for r in (0, 17, 39):
        alone = fast_sampling._draw_wide_rows(logits[r:r + 1], BatchParams(params.rows[:1], 5000), u[r:r + 1])
        assert alone.item() == together[r].item()


def test_bucketed_draw_at_the_edges_of_u():
    # u = 0 takes the most probable token; u just under 1 the last kept one.
    logits = torch.randn(3, 2000, generator=torch.Generator().manual_seed(3)) * 0.3
    params = BatchParams([SamplingParams(top_p=0.9)] * 3, 2000)
    tempered = logits
    buckets = fast_sampling._Buckets(tempered, params, torch.arange(3), None)
    first = buckets.draw(torch.zeros(3, dtype=torch.float64))
    assert first.tolist() == tempered.argmax(dim=-1).tolist()
    last = buckets.draw(torch.full((3,), 1 - 2**-53, dtype=torch.float64))
    for r in range(3):
        assert last[r].item() == reference_draw(tempered[r], 1 - 2**-53, top_p=0.9)


# ----------------------------------------------------------------------------------------------
# The draw

def test_draw_matches_the_filtered_distribution_chi_square():
    # χ² goodness of fit: 20,000 inverse-CDF draws from one generator (seed 1234) against
    # the expected filtered distribution. The settings keep 4 tokens (df = 3); the critical
    # value for α = 0.001 is 16.266, so a correct sampler fails this 1 time in 1000 seeds
    # (and this seed is fixed, so the test is deterministic).
    logits = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.4, 0.0, -1.0, -3.0]])
    settings = dict(temperature=0.8, top_k=6, top_p=0.9)
    n = 20_000
    tempered = apply_temperature(logits, 0.8).expand(n, -1)
    params = BatchParams([SamplingParams(**settings)] * n, 8)
    cand = select_candidates(tempered, params)
    u = torch.rand(n, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    drawn = cand.ids.gather(-1, inverse_cdf(cand, u)[:, None])[:, 0]

    expected_logits = reference_truncate(apply_temperature(logits, 0.8), 6, 0.9)
    expected = torch.softmax(expected_logits.double(), dim=-1)[0]
    kept = (expected > 0).nonzero().flatten()
    assert kept.tolist() == [0, 1, 2, 3]
    assert set(drawn.tolist()) <= set(kept.tolist())  # never outside the kept set
    observed = torch.bincount(drawn, minlength=8).double()
    chi2 = ((observed[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum().item()
    assert chi2 < 16.266, chi2


def test_sample_step_draws_only_kept_tokens_with_per_row_settings():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(200, 50, generator=gen) * 2
    rows = [SamplingParams(temperature=0.5 + (i % 3) / 2, top_k=i % 7, top_p=0.5 + (i % 5) / 10,
                           min_p=(i % 4) / 20) for i in range(200)]
    params = BatchParams(rows, 50)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    step = sample_step(logits, params, gens, 50)
    for r, row in enumerate(rows):
        expected = reference_truncate(apply_temperature(logits[r:r + 1], row.temperature),
                                      row.top_k, row.top_p, row.min_p)
        assert expected[0, step.tokens[r]] > NEG_INF
        # u lies inside the chosen token's cumulative interval
        q = final_probabilities(step.candidates)[r]
        hi = q[:step.ranks[r] + 1].sum().item()
        assert hi - q[step.ranks[r]].item() - 1e-12 <= step.u[r].item() < hi + 1e-12


def test_greedy_is_deterministic_and_takes_the_lowest_tied_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    params = BatchParams([SamplingParams(temperature=0)] * 2, 4)
    for seed in range(3):
        gens = [torch.Generator().manual_seed(seed)] * 2
        step = sample_step(logits, params, gens, 4)
        assert step.tokens.tolist() == [1, 0]
        assert torch.isnan(step.u).all()


def test_banned_ids_and_bias():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    params = BatchParams([SamplingParams(temperature=0, banned_ids=(0,), logit_bias=((3, 4.5),))], 4)
    assert sample_step(logits, params, [None], 4).tokens.tolist() == [3]
    everything = BatchParams([SamplingParams(banned_ids=(0, 1, 2, 3))], 4)
    with pytest.raises(ValueError, match="banned"):
        sample_step(logits, everything, [torch.Generator()], 4)


# ----------------------------------------------------------------------------------------------
# Validation (SAMPLING.md §3)

@pytest.mark.parametrize("name, value", [
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True), ("top_p", 0.0), ("top_p", 1.01),
    ("min_p", -0.01), ("min_p", 1.5), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("frequency_penalty", 2.5), ("presence_penalty", -2.01), ("temperature", "hot"),
])
def test_bad_values_are_refused_naming_the_parameter(name, value):
    with pytest.raises(ValueError, match=rf"^{name}=.*: must be "):
        SamplingParams(**{name: value})


def test_boundary_values_are_allowed():
    SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=1.0, frequency_penalty=-2,
                   presence_penalty=2, repetition_penalty=1e-3)


# ----------------------------------------------------------------------------------------------
# Properties, on random rows (hypothesis)

rows = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=40).map(
    lambda xs: torch.tensor([xs]))


@settings(max_examples=150, deadline=None)
@given(rows, st.integers(0, 45), st.floats(0.01, 1.0), st.floats(0.0, 1.0), st.integers(2, 64))
def test_kept_set_never_empty_and_probabilities_sum_to_one(logits, k, p, m, window):
    kept, cand = fast_kept(logits, window=window, top_k=k, top_p=p, min_p=m)
    assert len(kept[0]) >= 1
    assert int(logits.argmax()) in kept[0] or logits.max() == logits[0, list(kept[0])].max()
    assert final_probabilities(cand).sum().item() == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(rows, st.integers(1, 45), st.integers(1, 45), st.floats(0.01, 1.0), st.floats(0.01, 1.0),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_kept_set_shrinks_with_tighter_settings(logits, k1, k2, p1, p2, m1, m2):
    k_small, k_big = sorted((k1, k2))
    p_small, p_big = sorted((p1, p2))
    m_small, m_big = sorted((m1, m2))
    assert fast_kept(logits, top_k=k_small)[0][0] <= fast_kept(logits, top_k=k_big)[0][0]
    assert fast_kept(logits, top_p=p_small)[0][0] <= fast_kept(logits, top_p=p_big)[0][0]
    assert fast_kept(logits, min_p=m_big)[0][0] <= fast_kept(logits, min_p=m_small)[0][0]


# ----------------------------------------------------------------------------------------------
# The two paths: the readable one (sampling.py) and the fast one (fast_sampling.py) choose the
# same tokens from the same generators, keep the same sets and flag the same verdicts

def both_paths(raw, rows, seeds, seen=None, counts=None):
    """One sample_step on each path: (readable Step, fast Step)."""
    V = raw.shape[-1]
    params = BatchParams(rows, V)
    steps = []
    for fast in (False, True):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        steps.append(sample_step(raw, params, generators, V, seen=seen, counts=counts,
                                 fast=fast))
    return steps


def assert_same_decisions(readable, fast, rows):
    assert torch.equal(readable.tokens, fast.tokens)
    assert torch.equal(readable.u.nan_to_num(-1), fast.u.nan_to_num(-1))
    r_c, f_c = readable.candidates, fast.candidates
    for r, row in enumerate(rows):
        # the kept tokens, in the draw's order, with the same q to the last bits of a sum
        n = int(r_c.n_kept[r])
        assert n == int(f_c.n_kept[r]), r
        assert r_c.ids[r, :n].tolist() == f_c.ids[r, :n].tolist(), r
        q_r, q_f = final_probabilities(r_c)[r, :n], final_probabilities(f_c)[r, :n]
        assert (q_r - q_f).abs().max() <= 1e-12, r
        assert r_c.ids[r, readable.ranks[r]] == f_c.ids[r, fast.ranks[r]] == readable.tokens[r]
        # every token the fast path lists (its window) carries the readable path's flags
        M = f_c.ids.shape[1]
        finite = torch.isfinite(f_c.logits[r])
        at = r_c.ids[r].argsort()[f_c.ids[r]]          # each listed id's place in readable's list
        for name in ("kept_top_k", "kept_top_p", "kept_min_p", "kept"):
            want = getattr(r_c, name)[r, at][finite]
            assert torch.equal(getattr(f_c, name)[r][finite], want), (r, name, M)


@pytest.mark.parametrize("V", [8, 65, 300, 3000])
def test_readable_and_fast_paths_agree(V):
    gen = torch.Generator().manual_seed(V)
    raw = torch.randn(24, V, generator=gen) * torch.rand(24, 1, generator=gen) * 4
    raw[3] = (raw[3] * 2).round() / 2                              # exact ties
    raw[4] = 0.0                                                   # a flat row
    rows = [SamplingParams(temperature=[0.0, 0.7, 1.0, 1.6][i % 4], top_k=[0, 1, 5, 40][i % 3],
                           top_p=[1.0, 0.5, 0.9][i % 3], min_p=[0.0, 0.3, 0.05][(i // 3) % 3])
            for i in range(24)]
    for trial in range(3):
        readable, fast = both_paths(raw, rows, [100 * trial + i for i in range(24)])
        assert_same_decisions(readable, fast, rows)
        assert readable.tokens[4] == 0  # greedy on a flat row: the lowest id, past any window


def test_paths_agree_on_gpt2_sized_flat_rows():
    # The bench's hard case: GPT-2's 50257 ids, rows as flat as a random GPT-2's (logits with
    # a spread of ~0.55, so top-p 0.9 keeps tens of thousands of tokens and the bucketed search
    # settles them), at batch 1 (one row: the plain-sized searches) and batch 6. The rows hold
    # a tie group straddling top-p's cut, banned ids (-inf), and settings crossing top-p with
    # temperature, top-k and min-p. The explain listing and the quick draw must agree too.
    V = 50257
    gen = torch.Generator().manual_seed(13)
    raw = torch.randn(6, V, generator=gen) * 0.55
    raw[1] = (raw[1] * 4).round() / 4                              # big tie groups
    raw[2, ::2] = NEG_INF                                          # half the ids banned
    raw[3, :50000] = NEG_INF                                       # 257 finite logits
    rows = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.9), SamplingParams(top_p=0.5),
            SamplingParams(temperature=0.7, top_p=0.95), SamplingParams(top_k=30000, top_p=0.8),
            SamplingParams(temperature=1.3, top_p=0.9, min_p=0.3)]
    for trial in range(2):
        seeds = [50 * trial + i for i in range(6)]
        readable, fast = both_paths(raw, rows, seeds)
        assert_same_decisions(readable, fast, rows)
        params = BatchParams(rows, V)
        quick = sample_step(raw, params, [torch.Generator().manual_seed(s) for s in seeds], V,
                            candidates=False)
        assert torch.equal(quick.tokens, readable.tokens)
        alone = sample_step(raw[:1], BatchParams(rows[:1], V), [torch.Generator().manual_seed(seeds[0])],
                            V, candidates=False)
        assert alone.tokens.item() == readable.tokens[0].item()
    # row 1's cut falls inside a tie group of thousands, and the whole group is kept
    listed = fast.candidates
    last = listed.logits[1, int(listed.n_kept[1]) - 1]
    group = int((raw[1] == last).sum())
    assert group > 1000
    assert int((listed.kept[1] & (listed.logits[1] == last)).sum()) == group


def test_one_thread_up_to_batch_8_and_the_callers_threads_above_give_the_same_tokens():
    # fast_sampling samples batches of up to 8 GPT-2 rows on one thread and larger ones on
    # the caller's threads; a row's token must not depend on which (SAMPLING.md §4), and the
    # caller's thread count comes back.
    V = 50257
    raw = torch.randn(10, V, generator=torch.Generator().manual_seed(17)) * 0.55
    rows = [SamplingParams(top_p=0.9), SamplingParams(temperature=0.8, top_k=200, top_p=0.95)] * 5
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert 10 * V > fast_sampling.ONE_THREAD_MAX >= V
        together = sample_step(raw, BatchParams(rows, V), [torch.Generator().manual_seed(i)
                                                            for i in range(10)], V)
        assert torch.get_num_threads() == 2
        for r in range(10):
            alone = sample_step(raw[r:r + 1], BatchParams(rows[r:r + 1], V),
                                [torch.Generator().manual_seed(r)], V)
            assert alone.tokens.item() == together.tokens[r].item()
            assert torch.equal(alone.candidates.ids[0, :50], together.candidates.ids[r, :50])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_paths_agree_with_bias_bans_and_penalties():
    gen = torch.Generator().manual_seed(7)
    raw = torch.randn(6, 400, generator=gen) * 3
    seen = torch.rand(6, 400, generator=gen) < 0.2
    counts = (torch.rand(6, 400, generator=gen) * 3).floor() * seen
    rows = [SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.3,
                           frequency_penalty=0.5, presence_penalty=0.2,
                           logit_bias=((3, 5.0), (9, -2.0)), banned_ids=(0, 1, 2)),
            SamplingParams(top_k=20, min_p=0.1, repetition_penalty=0.7),
            SamplingParams(temperature=0.0, banned_ids=tuple(range(200)))] * 2
    readable, fast = both_paths(raw, rows, range(6), seen=seen, counts=counts)
    assert_same_decisions(readable, fast, rows)
    assert not set(readable.tokens[[0, 3]].tolist()) & {0, 1, 2}


def test_the_shipped_vocabulary_runs_the_readable_path_and_gpt2s_the_fast_one():
    assert not sampling.use_fast_path(BatchParams([SamplingParams()], 65))
    assert sampling.use_fast_path(BatchParams([SamplingParams()], 50257))
    assert sampling.use_fast_path(BatchParams([SamplingParams()], 50304))


def test_a_filter_the_fast_path_lacks_runs_on_the_readable_path(monkeypatch):
    # Adding a filter is one function and one line in FILTERS: until fast_sampling learns
    # it, every batch that uses it runs the readable path, so its tokens are still right.
    def apply_keep_even_ids(logits, on):                      # a stand-in new filter
        odd = torch.arange(logits.shape[-1]) % 2 == 1
        return logits.masked_fill(odd & (torch.as_tensor(on) > 0), NEG_INF)
    monkeypatch.setattr(sampling, "FILTERS", sampling.FILTERS + (("even", apply_keep_even_ids),))
    params = BatchParams([SamplingParams()] * 3, 5000)
    assert sampling.use_fast_path(params)                      # not used: the fast path runs
    params.on["even"], params.even = True, torch.ones(3, 1)
    assert not sampling.use_fast_path(params)
    raw = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    step = sample_step(raw, params, [torch.Generator().manual_seed(i) for i in range(3)], 5000)
    assert (step.tokens % 2 == 0).all() and (step.candidates.kept.sum(-1) == 2500).all()


@pytest.mark.parametrize("V", [65, 3000])
def test_generated_text_is_the_same_on_either_path(V, monkeypatch):
    # The whole generate loop, with the path forced each way: the same tokens per sample.
    from nanosample.generate import generate
    from nanosample.model import GPT, GPTConfig
    from nanosample.tokenizer import CharTokenizer

    torch.manual_seed(3)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)                               # some rows peaked, some flat
    tokenizer = CharTokenizer([chr(0x100 + i) for i in range(V)])
    params = [SamplingParams(temperature=1.2, top_k=7, top_p=0.9), SamplingParams(top_p=0.6),
              SamplingParams(temperature=0.8, min_p=0.2), SamplingParams(temperature=0)]

    def tokens(threshold):
        monkeypatch.setattr(sampling, "READABLE_MAX_VOCAB", threshold)
        out = {}
        for piece in generate(model, tokenizer, [0, 1], params, num_samples=4,
                              max_new_tokens=12, seed=5, stop_at_eot=False):
            out.setdefault(piece.sample, []).append(piece.token)
        return out
    readable, fast = tokens(10**9), tokens(0)
    assert readable == fast
    assert len(set(map(tuple, readable.values()))) == 4  # the samples differ: a real check
