"""The sampler's edges, as a user meets them.

- The explain trace's flags follow SAMPLING.md's order: a token an earlier filter dropped is
  never "kept" by a later one (top-k + top-p + min-p together, on an 8-token model).
- Float32 edges: values whose float32 form is 0, inf or subnormal are refused with one line
  naming the flag (through sample.py and through the settings parser); tiny but normal values
  run as SAMPLING.md documents (a temperature of 1.2e-38 is as good as greedy, a bias or
  penalty past float32's range saturates, it never bans).
"""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import sample_py
from nanosample.sampling import BatchParams, SamplingParams, apply_temperature, sample_step
from nanosample.settings import SampleSettings, SettingsError, parse_settings

CHARS = list("abcdefgh")  # an 8-token model: every candidate fits in the trace


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """A native 8-token character model whose rows are flat enough for every filter to act."""
    from nanosample import loader
    from nanosample.model import GPT, GPTConfig
    from nanosample.tokenizer import CharTokenizer

    torch.manual_seed(14)
    model = GPT(GPTConfig(block_size=32, vocab_size=8, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path_factory.mktemp("eight") / "model"
    loader.save_native(model, CharTokenizer(CHARS), path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# The trace's flags

def expected_flags(candidates, top_k, top_p, min_p):
    """SAMPLING.md §1 steps 6-8 from the trace's own final logits, in plain Python: each
    filter's verdict on what the filters before it left. {id: (top_k, top_p, min_p)}"""
    ranked = sorted(candidates, key=lambda c: (-c["logit_final"], c["id"]))
    logits = [c["logit_final"] for c in ranked]
    kth = logits[top_k - 1]
    by_k = [x >= kth for x in logits]
    survivors = [x for x, k in zip(logits, by_k) if k]
    total = sum(math.exp(x - survivors[0]) for x in survivors)
    before, last_kept = 0.0, survivors[0]
    for x in survivors:  # descending: keep while the mass before is < p
        if before >= top_p:
            break
        last_kept = x
        before += math.exp(x - survivors[0]) / total
    by_p = [k and x >= last_kept for x, k in zip(logits, by_k)]
    by_m = [p and math.exp(x - logits[0]) >= min_p for x, p in zip(logits, by_p)]
    return {c["id"]: (k, p, m) for c, k, p, m in zip(ranked, by_k, by_p, by_m)}


def test_trace_flags_follow_the_filter_order(eight, tmp_path):
    # The run where the flags once disagreed with the filter order: T 1.6, top_k 5, top_p 0.5,
    # min_p 0.3, three samples of 20 tokens.
    trace = tmp_path / "t.jsonl"
    code, out, err = sample_py(f"--init_from={eight}", "--start=a", "--temperature=1.6",
                               "--top_k=5", "--top_p=0.5", "--min_p=0.3", "--num_samples=3",
                               "--max_new_tokens=20", f"--explain_file={trace}", "--explain")
    assert code == 0, err
    records = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 60
    dropped_by_k_but_min_p_ratio = 0  # tokens top-k dropped that min-p alone would keep
    for r in records:
        cands = r["candidates"]
        assert len(cands) == 8  # every token is listed, so the flags can be checked in full
        want = expected_flags(cands, 5, 0.5, 0.3)
        top = max(c["logit_final"] for c in cands)
        for c in cands:
            assert (c["top_k"], c["top_p"], c["min_p"]) == want[c["id"]], (r["step"], c)
            assert c["kept"] == c["min_p"]
            # a filter never keeps what an earlier one dropped
            assert c["top_k"] or not (c["top_p"] or c["min_p"])
            assert c["top_p"] or not c["min_p"]
            if not c["top_k"] and math.exp(c["logit_final"] - top) >= 0.3:
                dropped_by_k_but_min_p_ratio += 1
    assert dropped_by_k_but_min_p_ratio > 0  # the run does hit that case
    # The --explain table on stderr: per row the marks run ✓... then ✗..., never ✗ then ✓.
    rows = [line for line in err.splitlines() if "✓" in line or "✗" in line]
    assert rows
    for line in rows:
        marks = "".join(ch for ch in line if ch in "✓✗")
        assert "✗✓" not in marks, line


# ---------------------------------------------------------------------------------------------
# float32 edges, refused

ALL_MINUS_INF = ",".join(f"{i}:-1e39" for i in range(len(CHARS)))
REFUSED = [  # (flag, what the one error line says after "error: ")
    ("--logit_bias=3:1e39", "--logit_bias=3:1e39: the bias 1e39 overflows to inf in float32"),
    (f"--logit_bias={ALL_MINUS_INF}",
     f"--logit_bias={ALL_MINUS_INF}: the bias -1e39 overflows to inf in float32"),
    ("--logit_bias=3:1e-40", "--logit_bias=3:1e-40: the bias 1e-40 becomes a subnormal number"),
    ("--temperature=1e-40", "--temperature=1e-40: becomes a subnormal number in float32"),
    ("--temperature=1e-46", "--temperature=1e-46: becomes 0 in float32"),
    ("--repetition_penalty=1e-38", "--repetition_penalty=1e-38: becomes a subnormal number"),
    ("--repetition_penalty=1e39", "--repetition_penalty=1e+39: overflows to inf in float32"),
    ("--top_p=1e-46", "--top_p=1e-46: becomes 0 in float32"),
    ("--frequency_penalty=1e-45", "--frequency_penalty=1e-45: becomes a subnormal number"),
    ("--presence_penalty=-1e-50", "--presence_penalty=-1e-50: becomes 0 in float32"),
]
ALLOWED = "nonzero values must be 1.2e-38 to 3.4e38 in size"


@pytest.fixture(scope="module")
def refused_runs(eight):
    def run(case):
        return case[0], sample_py(f"--init_from={eight}", "--max_new_tokens=3", case[0])
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, REFUSED))


@pytest.mark.parametrize("flag, message", REFUSED, ids=[f for f, _ in REFUSED])
def test_float32_edges_are_one_error_line_through_sample_py(refused_runs, flag, message):
    code, out, err = refused_runs[flag]
    assert code == 2 and out == "" and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message), err
    assert "1.2e-38 to 3.4e38 in size" in lines[0]


@pytest.mark.parametrize("flag, message", REFUSED, ids=[f for f, _ in REFUSED])
def test_float32_edges_through_the_settings_parser(flag, message):
    with pytest.raises(SettingsError) as info:
        parse_settings(SampleSettings, [flag])
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
    assert ("nonzero biases" if "logit_bias" in flag else ALLOWED).split(" must")[0] in text


@pytest.mark.parametrize("name, value", [("temperature", 1e-46), ("temperature", 1e-40),
                                         ("repetition_penalty", 1e-38), ("top_p", 1e-40),
                                         ("repetition_penalty", math.ldexp(1, 128))])
def test_sampling_params_refuse_float32_edges(name, value):
    with pytest.raises(ValueError, match=rf"^{name}=.*float32"):
        SamplingParams(**{name: value})


def test_the_smallest_normal_values_are_allowed():
    SamplingParams(temperature=1.2e-38, repetition_penalty=1.2e-38, top_p=1.2e-38,
                   frequency_penalty=-1.2e-38, logit_bias=((0, 3.4e38),))
    SamplingParams(min_p=1e-45)  # tiny min_p is documented: it acts as 0 (off)


# ---------------------------------------------------------------------------------------------
# what tiny but normal values do

@pytest.mark.parametrize("fast", [False, True])
def test_tiny_temperature_is_greedy_and_never_overflows(fast):
    # l / 1.2e-38 overflows float32 for l > 4; the row is shifted first, so the best token
    # takes all the probability (as T -> 0 does) instead of NaN or a crash.
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(6, 300, generator=gen) * 5
    tempered = apply_temperature(raw, 1.2e-38)
    assert not torch.isnan(tempered).any() and not torch.isposinf(tempered).any()
    assert torch.equal(tempered.argmax(dim=-1), raw.argmax(dim=-1))
    params = BatchParams([SamplingParams(temperature=1.2e-38, top_p=0.9)] * 6, 300)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    step = sample_step(raw, params, gens, 300, fast=fast)
    assert torch.equal(step.tokens, raw.argmax(dim=-1))
    assert step.candidates.n_kept.tolist() == [1] * 6


@pytest.mark.parametrize("fast", [False, True])
def test_huge_bias_and_penalty_saturate_instead_of_banning(fast):
    # A bias of -3.4e38 on every token leaves them all finite and equal: nothing is banned,
    # the draw is uniform. A tiny repetition penalty sends seen positive logits to +3.4e38,
    # never +inf: the seen tokens share the probability.
    raw = torch.tensor([[5.0, 6.0, 3.0, 0.5], [5.0, 6.0, 3.0, 0.5]])  # 5 / 1.2e-38 > 3.4e38
    bias = tuple((i, -3.4e38) for i in range(4))
    params = BatchParams([SamplingParams(logit_bias=bias),
                          SamplingParams(repetition_penalty=1.2e-38, temperature=0.5)], 4)
    seen = torch.tensor([[False] * 4, [True, True, False, False]])
    counts = torch.zeros(2, 4)
    drawn = [set(), set()]
    for seed in range(60):
        step = sample_step(raw, params, [torch.Generator().manual_seed(seed)] * 2, 4,
                           seen=seen, counts=counts, fast=fast)
        assert torch.isfinite(step.adjusted).all()
        for r in range(2):
            drawn[r].add(int(step.tokens[r]))
    assert drawn[0] == {0, 1, 2, 3}  # uniform over 4: all seen in 60 draws (miss odds < 1e-6)
    assert drawn[1] == {0, 1}        # both saturated seen tokens, nothing else


def test_tiny_temperature_runs_through_sample_py_like_greedy(eight):
    tiny = sample_py(f"--init_from={eight}", "--start=a", "--temperature=1.2e-38",
                     "--num_samples=2", "--max_new_tokens=15")
    greedy = sample_py(f"--init_from={eight}", "--start=a", "--temperature=0",
                       "--num_samples=2", "--max_new_tokens=15")
    assert tiny[0] == greedy[0] == 0, tiny[2]
    assert tiny[1] == greedy[1]
