"""Explain mode: the table's numbers on SAMPLING.md's vectors, the JSON Lines schema, the trace
true to the output (chosen == emitted, u in the chosen interval, same text with explain on or
off), and the plot."""

import io
import json
import math
import re

import pytest
import torch

from nanosample import explain
from nanosample import sampling
from conftest import CHARS
from nanosample.generate import TraceStep, generate, sample_generator
from nanosample.sampling import BatchParams, SamplingParams
from nanosample.tokenizer import CharTokenizer


def explain_logits(logits, seed=1, top=10, seen=None, counts=None, **settings):
    """Run one sampler step on hand-made logits (one row) and explain it: (record, Step)."""
    logits = torch.tensor([logits], dtype=torch.float32)
    V = logits.shape[-1]
    params = BatchParams([SamplingParams(**settings)], V)
    result = sampling.sample_step(logits, params, [sample_generator(seed, 0)], V,
                                  seen=seen, counts=counts)
    trace = TraceStep([0], [True], 3, 7, logits, params, result)
    tokenizer = CharTokenizer([chr(ord("a") + i) for i in range(V)])
    return explain.explain_rows(trace, tokenizer, [0], top)[0], result


def column(record, key):
    return [c[key] for c in record["candidates"]]


# ---------------------------------------------------------------------------------------------
# The table's numbers (SAMPLING.md §2)

def test_top_p_vector_numbers_and_table():
    record, result = explain_logits([math.log(p) for p in (0.1, 0.2, 0.3, 0.4)], top_p=0.8)
    assert column(record, "id") == [3, 2, 1, 0]  # the draw's order: most probable first
    assert column(record, "rank") == [1, 2, 3, 4]
    assert column(record, "p_raw") == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-6)
    assert column(record, "p_tempered") == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-6)
    assert column(record, "top_p") == [True, True, True, False]
    assert column(record, "top_k") == column(record, "min_p") == [None] * 4  # off
    assert column(record, "penalized") == column(record, "p_adjusted") == [None] * 4
    assert column(record, "kept") == [True, True, True, False]
    assert column(record, "q") == pytest.approx([4 / 9, 3 / 9, 2 / 9, 0], abs=1e-6)
    assert column(record, "cum_before")[:3] == pytest.approx([0, 4 / 9, 7 / 9], abs=1e-6)
    assert column(record, "cum_after")[:3] == pytest.approx([4 / 9, 7 / 9, 1], abs=1e-6)
    assert column(record, "cum_after")[2] == 1.0  # the last kept interval ends at 1 exactly
    assert column(record, "cum_before")[3] is column(record, "cum_after")[3] is None
    assert record["n_kept"] == 3 and record["vocab_size"] == 4
    q = [4 / 9, 3 / 9, 2 / 9]
    assert record["entropy_bits"] == pytest.approx(-sum(p * math.log2(p) for p in q), abs=1e-6)
    p = [0.1, 0.2, 0.3, 0.4]
    assert record["entropy_tempered_bits"] == pytest.approx(-sum(x * math.log2(x) for x in p),
                                                            abs=1e-6)
    assert (record["step"], record["position"], record["sample"]) == (3, 7, 0)
    assert record["chosen_id"] == int(result.tokens[0])
    assert record["u"] == float(result.u[0])

    table = explain.format_table(record)
    lines = table.splitlines()
    assert "top_p 0.8" in lines[0] and "temperature 1" in lines[0]
    assert re.split(r"\s+", lines[1].strip()) == ["rank", "token", "raw", "p", "temp", "p",
                                                  "top-k", "top-p", "min-p", "final", "p",
                                                  "cumulative"]
    rows = [line.replace("→", " ").split() for line in lines[2:6]]
    assert rows[0] == ["1", "d", "0.4000", "0.4000", "-", "✓", "-", "0.4444", "0.4444"]
    assert rows[1] == ["2", "c", "0.3000", "0.3000", "-", "✓", "-", "0.3333", "0.7778"]
    assert rows[2] == ["3", "b", "0.2000", "0.2000", "-", "✓", "-", "0.2222", "1.0000"]
    assert rows[3] == ["4", "a", "0.1000", "0.1000", "-", "✗", "-", "0", "-"]
    chosen_line = next(line for line in lines[2:6] if line.startswith("→"))
    assert chosen_line.split()[2] == record["chosen_text"]
    assert lines[6].startswith(f"u = {record['u']:.4f}, in [")
    assert f'selected "{record["chosen_text"]}"' in lines[6]
    assert lines[7].startswith("3 of 4 tokens kept · entropy 1.53 bits")


@pytest.mark.parametrize("top_p, kept", [(0.7, [3, 2]), (1.0, [3, 2, 1, 0])])
def test_other_top_p_vectors(top_p, kept):
    record, _ = explain_logits([math.log(p) for p in (0.1, 0.2, 0.3, 0.4)], top_p=top_p)
    assert [c["id"] for c in record["candidates"] if c["kept"]] == kept
    expected_verdict = None if top_p == 1 else [i in kept for i in (3, 2, 1, 0)]
    assert column(record, "top_p") == (expected_verdict or [None] * 4)


def test_top_k_vector():
    record, _ = explain_logits([math.log(p) for p in (0.1, 0.2, 0.3, 0.4)], top_k=2)
    assert column(record, "top_k") == [True, True, False, False]
    assert column(record, "q") == pytest.approx([4 / 7, 3 / 7, 0, 0], abs=1e-6)


def test_temperature_then_top_p_vector():
    record, _ = explain_logits([3.0, 2.0, 1.0], temperature=0.5, top_p=0.8)
    tempered = torch.softmax(torch.tensor([6.0, 4.0, 2.0], dtype=torch.float64), -1).tolist()
    raw = torch.softmax(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), -1).tolist()
    assert column(record, "p_tempered") == pytest.approx(tempered, abs=1e-6)
    assert column(record, "p_raw") == pytest.approx(raw, abs=1e-6)
    assert column(record, "logit_final") == [6.0, 4.0, 2.0]
    assert column(record, "top_p") == [True, False, False]
    assert column(record, "q") == [1.0, 0.0, 0.0]
    assert record["chosen_id"] == 0 and record["entropy_bits"] == 0


def test_min_p_vector():
    record, _ = explain_logits([5.0, 2.0, 1.5, 0.0], temperature=2.0, min_p=0.1)
    assert column(record, "min_p") == [True, True, True, False]
    assert record["n_kept"] == 3
    assert "min_p 0.1" in explain.format_table(record).splitlines()[0]


def test_greedy_and_top_k_ties_vectors():
    record, _ = explain_logits([1.0, 4.0, 4.0, 2.0], temperature=0.0)
    assert record["greedy"] and record["u"] is None
    assert record["chosen_id"] == 1 and record["chosen_rank"] == 1
    assert column(record, "id") == [1, 2, 3, 0]
    assert column(record, "q") == [1.0, 0.0, 0.0, 0.0]
    assert column(record, "p_tempered") == [None] * 4  # temperature is skipped
    assert record["entropy_bits"] == 0 and record["entropy_tempered_bits"] is None
    assert "greedy: no draw" in explain.format_table(record)

    record, _ = explain_logits([1.0, 4.0, 4.0, 2.0], top_k=1)
    assert column(record, "top_k") == [True, True, False, False]  # the tie is kept
    assert column(record, "q")[:2] == pytest.approx([0.5, 0.5])
    assert record["entropy_bits"] == pytest.approx(1.0)


def test_bias_and_penalties_columns():
    seen = torch.tensor([[False, True, True, False]])
    counts = torch.zeros(1, 4)
    record, _ = explain_logits([1.0, 2.0, -1.0, 0.5], repetition_penalty=2.0,
                               logit_bias=((0, 1.0),), seen=seen, counts=counts)
    # bias: [2, 2, -1, .5]; penalty on ids 1 and 2: [2, 1, -2, .5]
    assert column(record, "id") == [0, 1, 3, 2]
    assert column(record, "penalized") == [False, True, False, True]
    adjusted = torch.softmax(torch.tensor([2.0, 1.0, 0.5, -2.0], dtype=torch.float64), -1)
    assert column(record, "p_adjusted") == pytest.approx(adjusted.tolist(), abs=1e-6)
    assert column(record, "logit") == [1.0, 2.0, 0.5, -1.0]
    assert record["bias_or_penalties"]
    table = explain.format_table(record)
    assert "adj p" in table and " pen" in table and "repetition_penalty 2" in table


def test_chosen_token_beyond_the_top_n_is_appended():
    # flat distribution, everything kept: a draw past rank 2 shows up after a "..." line
    for seed in range(50):
        record, result = explain_logits([0.0] * 8, seed=seed, top=2)
        if record["chosen_rank"] > 3:
            break
    else:
        pytest.fail("no draw landed past rank 3 in 50 seeds")
    cands = record["candidates"]
    assert [c["rank"] for c in cands] == [1, 2, record["chosen_rank"]]
    assert cands[-1]["chosen"] and cands[-1]["id"] == int(result.tokens[0])
    assert cands[-1]["cum_before"] <= record["u"] < cands[-1]["cum_after"]
    assert cands[-1]["cum_after"] - cands[-1]["cum_before"] == pytest.approx(1 / 8)
    lines = explain.format_table(record).splitlines()
    assert lines[4].strip() == "..." and lines[5].startswith("→")


def test_padded_windows_never_list_padding():
    # Row 0 is flat (the window cannot prove its answer, so it is redone on the full sort);
    # row 1 is decided inside its 256-wide window and padded to 300 with id 0, -inf.
    torch.manual_seed(0)
    logits = torch.stack([torch.zeros(300), torch.randn(300) * 3])           # (2, 300)
    params = BatchParams([SamplingParams(), SamplingParams(top_k=5)], 300)
    result = sampling.sample_step(logits, params, [sample_generator(1, i) for i in (0, 1)], 300)
    assert result.candidates.ids.shape[1] == 300
    trace = TraceStep([0, 1], [True, True], 0, 1, logits, params, result)
    tokenizer = CharTokenizer([chr(0x100 + i) for i in range(300)])
    flat, peaked = explain.explain_rows(trace, tokenizer, [0, 1], top=400)
    assert len(flat["candidates"]) == 300 and flat["n_kept"] == 300
    ids = [c["id"] for c in peaked["candidates"]]
    assert len(ids) == 256 == len(set(ids))  # the sampler's window, no padding entries
    assert all(math.isfinite(c["logit_final"]) for c in peaked["candidates"])
    assert [c["kept"] for c in peaked["candidates"]].count(True) == 5


def test_visible_text():
    assert explain.visible_text(" the\n") == "␣the↵"
    assert explain.visible_text("\t\r") == "\\t\\r"
    assert explain.visible_text("\x00é") == "\\x00é"
    assert explain.visible_text("") == '""'


# ---------------------------------------------------------------------------------------------
# The trace is true to the output

PARAMS = [SamplingParams(temperature=0.9, top_k=12, top_p=0.9),
          SamplingParams(temperature=0),
          SamplingParams(temperature=1.3, min_p=0.05, repetition_penalty=1.3,
                         frequency_penalty=0.5, logit_bias=((0, 1.5),)),
          SamplingParams(temperature=1.0),
          SamplingParams(temperature=0.7, top_p=0.5, presence_penalty=1.0)]


def pieces_of(model, tokenizer, **kwargs):
    return list(generate(model, tokenizer, tokenizer.encode("the "), params=PARAMS,
                         num_samples=len(PARAMS), seed=5, **kwargs))


def test_chosen_is_emitted_and_u_is_in_its_interval(model, tokenizer, tmp_path):
    path = tmp_path / "trace.jsonl"
    explainer = explain.Explainer(tokenizer, table_sample=2, top=5, jsonl_path=path,
                                  table_stream=io.StringIO(), record_for_plot=True)
    pieces = pieces_of(model, tokenizer, max_new_tokens=40, batch_size=3, trace=explainer)
    explainer.close()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    emitted = {i: [p.token for p in pieces if p.sample == i] for i in range(len(PARAMS))}
    traced = {i: [r for r in records if r["sample"] == i] for i in range(len(PARAMS))}
    assert len(records) == 40 * len(PARAMS)
    for i in range(len(PARAMS)):
        assert [r["step"] for r in traced[i]] == list(range(40))
        assert [r["position"] for r in traced[i]] == [4 + s for s in range(40)]
        assert [r["chosen_id"] for r in traced[i]] == emitted[i]
        for r in traced[i]:
            chosen = [c for c in r["candidates"] if c["chosen"]]
            assert len(chosen) == 1 and chosen[0]["id"] == r["chosen_id"]
            assert chosen[0]["rank"] == r["chosen_rank"] and chosen[0]["kept"]
            assert chosen[0]["text"] == r["chosen_text"] == CHARS[r["chosen_id"]]
            assert all(c["id"] < len(CHARS) for c in r["candidates"])  # no padding ids
            if r["greedy"]:
                assert r["u"] is None and chosen[0]["rank"] == 1
            else:
                assert chosen[0]["cum_before"] <= r["u"] < chosen[0]["cum_after"]
            kept = [c for c in r["candidates"] if c["kept"]]
            assert sum(c["q"] for c in kept) <= 1 + 1e-9
            assert all(c["q"] == 0 and c["cum_after"] is None
                       for c in r["candidates"] if not c["kept"])
    # the penalties sample's trace shows its penalties at work
    assert any(c["penalized"] for r in traced[2] for c in r["candidates"])
    assert all(c["penalized"] is None for r in traced[0] for c in r["candidates"])
    assert explainer.records == traced[2]


def test_output_is_the_same_with_and_without_explain(model, tokenizer, tmp_path):
    plain = pieces_of(model, tokenizer, max_new_tokens=25, batch_size=2)
    explainer = explain.Explainer(tokenizer, table_stream=io.StringIO(),
                                  jsonl_path=tmp_path / "t.jsonl", record_for_plot=True)
    explained = pieces_of(model, tokenizer, max_new_tokens=25, batch_size=2, trace=explainer)
    explainer.close()
    assert explained == plain


def test_one_table_per_step_of_the_chosen_sample_only(model, tokenizer, monkeypatch):
    asked = []
    real = explain.explain_rows
    monkeypatch.setattr(explain, "explain_rows",
                        lambda trace, tok, rows, top: asked.append(rows) or real(trace, tok, rows, top))
    out = io.StringIO()
    explainer = explain.Explainer(tokenizer, table_sample=3, top=4, table_stream=out)
    pieces_of(model, tokenizer, max_new_tokens=6, trace=explainer)
    explainer.close()
    assert asked == [[3]] * 6  # only the shown sample's row is computed, no JSON asked for
    tables = out.getvalue().strip().split("\n\n")
    assert len(tables) == 6
    assert [t.splitlines()[0].split(" · ")[:2] for t in tables] == \
        [["sample 3", f"step {s}"] for s in range(6)]


def test_finished_samples_are_not_traced(model, tokenizer, tmp_path):
    # a stop string ends samples early; their rows go on in the batch but are not explained
    path = tmp_path / "t.jsonl"
    explainer = explain.Explainer(tokenizer, jsonl_path=path)
    pieces = list(generate(model, tokenizer, tokenizer.encode("the "), params=PARAMS[0],
                           num_samples=4, max_new_tokens=18, seed=2, stop=["e"],
                           trace=explainer))
    explainer.close()
    assert [p.reason for p in pieces if p.done][0] == "stop"  # one did stop early
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for i in range(4):
        tokens = [p.token for p in pieces if p.sample == i]
        assert [r["chosen_id"] for r in records if r["sample"] == i] == tokens


def test_positions_after_sample_0_finishes(model, tokenizer):
    positions = []
    pieces = list(generate(model, tokenizer, tokenizer.encode("the "), params=PARAMS[0],
                           num_samples=2, max_new_tokens=18, seed=10, stop=["e"],
                           trace=lambda t: positions.append(t.position)))
    assert sum(p.sample == 0 for p in pieces) < sum(p.sample == 1 for p in pieces)
    assert positions == [4 + step for step in range(len(positions))]


def test_jsonl_is_written_as_it_goes(model, tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    explainer = explain.Explainer(tokenizer, jsonl_path=path)
    stream = generate(model, tokenizer, [0], params=PARAMS[0], num_samples=2,
                      max_new_tokens=50, trace=explainer)
    for _ in range(2 * 5):  # five steps, then the run is "interrupted"
        next(stream)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2 * 5
    explainer.close()


# ---------------------------------------------------------------------------------------------
# The JSON Lines schema

def documented_keys():
    """(record keys, candidate keys) as JSONL_SCHEMA lists them."""
    top, nested = [], []
    for line in explain.JSONL_SCHEMA.splitlines():
        m = re.match(r"( {0,2})([a-z_]+) +(int|float|str|bool|object|list)", line)
        if m:
            (nested if m.group(1) else top).append(m.group(2))
    return top, nested


TYPES = {"int": int, "float": float, "str": str, "bool": bool, "object": dict, "list": list}


def documented_types():
    types = {}
    for line in explain.JSONL_SCHEMA.splitlines():
        m = re.match(r" {0,2}([a-z_]+) +([a-z|]+) ", line)
        if m and all(t in TYPES or t == "null" for t in m.group(2).split("|")):
            types[m.group(1)] = m.group(2).split("|")
    return types


def test_jsonl_schema_every_key_with_its_type(model, tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    explainer = explain.Explainer(tokenizer, jsonl_path=path, top=3)
    pieces_of(model, tokenizer, max_new_tokens=8, trace=explainer)
    explainer.close()
    top, nested = documented_keys()
    types = documented_types()
    assert len(top) == 16 and len(nested) == 17
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8 * len(PARAMS)
    seen_null = set()

    def check(key, value):
        allowed = types[key]
        if value is None:
            assert "null" in allowed, key
            seen_null.add(key)
        else:
            expected = TYPES[[t for t in allowed if t != "null"][0]]
            assert type(value) is expected, f"{key}={value!r} is not {allowed}"

    for line in lines:
        record = json.loads(line)
        assert list(record) == top
        assert record["version"] == 1
        assert set(record["settings"]) == {"temperature", "top_k", "top_p", "min_p",
                                           "repetition_penalty", "frequency_penalty",
                                           "presence_penalty"}
        for key, value in record.items():
            check(key, value)
        for candidate in record["candidates"]:
            assert list(candidate) == nested
            for key, value in candidate.items():
                check(key, value)
    # every nullable key was seen both ways across these settings
    assert {k for k, t in types.items() if "null" in t} == seen_null


def test_docs_quote_the_schema():
    with open("docs/explain_schema.md", encoding="utf-8") as f:
        assert explain.JSONL_SCHEMA in f.read()


# ---------------------------------------------------------------------------------------------
# The CLI hook and the plot

class Settings:
    """The fields of settings.SampleSettings that open_trace reads."""

    def __init__(self, **kwargs):
        self.explain, self.explain_sample, self.explain_top = False, 0, 10
        self.explain_file = self.plot = None
        self.plot_step, self.overwrite = 0, False
        self.__dict__.update(kwargs)


def test_open_trace_refuses_existing_files_and_missing_matplotlib(tokenizer, tmp_path,
                                                                  monkeypatch):
    from nanosample.settings import SettingsError

    existing = tmp_path / "old.jsonl"
    existing.write_text("keep me\n")
    with pytest.raises(SettingsError, match=r"^--explain_file=.*old.jsonl: the file exists"):
        explain.open_trace(Settings(explain_file=str(existing)), tokenizer)
    assert existing.read_text() == "keep me\n"
    explain.open_trace(Settings(explain_file=str(existing), overwrite=True), tokenizer).close()
    assert existing.read_text() == ""

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SettingsError, match=r"^--plot=p.png: needs matplotlib"):
        explain.open_trace(Settings(plot="p.png"), tokenizer)


def test_plot_is_written_and_never_replaces_a_file(model, tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "explain.png"
    explainer = explain.Explainer(tokenizer, table_sample=2, top=6, plot_path=str(path),
                                  plot_step=3)
    pieces_of(model, tokenizer, max_new_tokens=12, trace=explainer)
    explainer.close()
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    with pytest.raises(FileExistsError):
        explain.plot_explained(explainer.records, str(path), 3)
    assert path.read_bytes() == data
    explain.plot_explained(explainer.records, str(path), 0, overwrite=True)
    assert path.read_bytes() != data


def test_plot_of_a_step_the_sample_never_reached_draws_its_last(model, tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    path, messages = tmp_path / "greedy.svg", io.StringIO()
    explainer = explain.Explainer(tokenizer, table_sample=1, plot_path=str(path), plot_step=9,
                                  messages=messages)
    pieces_of(model, tokenizer, max_new_tokens=4, trace=explainer)
    explainer.close()
    assert "has no step 9 (it ended after 4 tokens); drawing its last step, 3" in \
        messages.getvalue()
    assert path.read_text().lstrip().startswith("<?xml")
