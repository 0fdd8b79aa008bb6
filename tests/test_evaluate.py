"""evaluate.py: prompts, scoring, the sweep's bookkeeping, the command's files and errors, and
on the shipped model the trends of Holtzman et al.'s Table 1.

Small tests use tiny random models written here with loader.save_native (a character model
and a GPT-2-vocabulary one) and a made-up corpus. The trends test needs
checkpoints/shakespeare_char and is skipped, saying why, only while its config.json is missing.
"""

import csv
import json
import math
import os

import pytest
import torch

import evaluate
from nanosample import loader
from nanosample import metrics
from nanosample.generate import generate
from nanosample.model import GPT, GPTConfig
from nanosample.sampling import SamplingParams
from nanosample.tokenizer import CharTokenizer, gpt2_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "shakespeare_char")
HELDOUT_PROMPTS = os.path.join(REPO, "tests", "data", "shakespeare_heldout_prompts.jsonl")

LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "",
         "All:", "Speak, speak.", "", "MENENIUS:", "What work's, my countrymen, in hand?",
         "Where go you with bats and clubs? The matter? Speak, I pray you.", ""]
# every line numbered, so every window of it is unique
CORPUS = "\n".join(f"{i}.{j} {line}" if line else "" for i in range(60)
                   for j, line in enumerate(LINES))
CHARS = sorted(set(CORPUS))


@pytest.fixture(autouse=True)
def one_thread():
    """Decode on one thread, as evaluate.py does by default (a small batch is far slower
    shared between threads), and leave torch's setting as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    """A tiny random character model in the native format, and the corpus beside it."""
    directory = tmp_path_factory.mktemp("eval") / "char"
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16))
    loader.save_native(model, CharTokenizer(CHARS), directory)
    (directory.parent / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def char_model(char_dir):
    return loader.load_model(str(char_dir))


def run_main(capsys, *args):
    """evaluate.main in this process: (exit code, stdout, stderr)."""
    code = evaluate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out):
    """The setting names of the table rows in the command's output."""
    return [line.split("|")[1].strip() for line in out.splitlines()[2:] if line.startswith("|")]


# ------------------------------------------------------------------------------ scoring

def test_a_uniform_model_has_perplexity_equal_to_its_vocabulary_size():
    # All weights 0: every logit is 0, every token has probability 1/V, at every position,
    # also past block_size (where the context restarts).
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    logprobs = evaluate.score_continuation(model, [1, 2, 3], [i % 37 for i in range(40)], n_vocab=37)
    assert len(logprobs) == 40
    assert metrics.perplexity(logprobs) == pytest.approx(37.0)
    # ids past the tokenizer's vocabulary (nanoGPT's padding) are not part of the distribution
    assert metrics.perplexity(evaluate.score_continuation(model, [1], [2, 3], n_vocab=30)) == \
        pytest.approx(30.0)


def test_scoring_sees_what_generate_saw_past_the_context(char_model):
    """The log-probabilities the sweep records while generating (the trace, with the KV
    cache) equal a fresh scoring of the same tokens, also after the context has restarted."""
    model, tok = char_model.model, char_model.tokenizer
    prompt = evaluate.Prompt(tok.encode("All:\nSpeak, speak."), "All:\nSpeak, speak.")
    made = evaluate.generate_for_prompt(model, tok, 0, prompt, SamplingParams(temperature=0.8),
                                        num_samples=2, max_new_tokens=100, seed=3)
    for g in made:
        assert len(g.ids) == len(g.logprobs) == 100  # 18 + 100 tokens > block_size 48
        scored = evaluate.score_continuation(model, prompt.ids, g.ids, tok.n_vocab)
        assert scored == pytest.approx(g.logprobs, abs=1e-4)


def test_entropy_is_that_of_the_distribution_drawn_from(char_model):
    model, tok = char_model.model, char_model.tokenizer
    prompt = evaluate.Prompt(tok.encode("MENENIUS:\n"), "MENENIUS:\n")
    greedy, = evaluate.generate_for_prompt(model, tok, 0, prompt, SamplingParams(temperature=0.0),
                                           1, 10, seed=0)
    assert greedy.entropies == [0.0] * 10
    pure, = evaluate.generate_for_prompt(model, tok, 0, prompt, SamplingParams(temperature=1.0),
                                         1, 1, seed=0)
    with torch.no_grad():
        logits = model(torch.tensor([prompt.ids]))[0, -1]
    expected = metrics.entropy(torch.softmax(logits.double(), dim=-1)[None])[0]
    assert pure.entropies[0] == pytest.approx(float(expected), rel=1e-6)
    # top-k 2: the entropy of the two survivors renormalized, at most log 2
    topk, = evaluate.generate_for_prompt(model, tok, 0, prompt,
                                         SamplingParams(temperature=1.0, top_k=2), 1, 1, seed=0)
    two = torch.softmax(logits.double().topk(2).values, dim=-1)
    assert topk.entropies[0] == pytest.approx(float(metrics.entropy(two[None])[0]), rel=1e-6)
    assert topk.entropies[0] <= math.log(2) + 1e-12


def test_samples_share_random_numbers_across_settings_and_reproduce(char_model):
    """Sample j of prompt i is seeded from (seed, i * num_samples + j) whatever the setting:
    top-k = vocabulary size is pure sampling, and draws the very same text."""
    model, tok = char_model.model, char_model.tokenizer
    prompt = evaluate.Prompt(tok.encode("All:\n"), "All:\n")
    pure = evaluate.generate_for_prompt(model, tok, 3, prompt, SamplingParams(), 2, 20, seed=5)
    same = evaluate.generate_for_prompt(model, tok, 3, prompt,
                                        SamplingParams(top_k=len(CHARS)), 2, 20, seed=5)
    assert [g.text for g in pure] == [g.text for g in same]
    assert pure[0].text != pure[1].text
    # the same as generate() itself gives samples 6 and 7
    direct = {}
    for piece in generate(model, tok, prompt.ids, SamplingParams(), num_samples=2,
                          max_new_tokens=20, seed=5, first_sample=6):
        direct[piece.sample] = direct.get(piece.sample, "") + piece.text
    assert [direct[6], direct[7]] == [g.text for g in pure]


# ------------------------------------------------------------------------------ prompts

def test_heldout_prompts_are_evenly_spaced_line_starts_of_the_last_tenth():
    tok = CharTokenizer(CHARS)
    prompts = evaluate.heldout_prompts(CORPUS, tok, 5, 30, 20)
    heldout = CORPUS[int(len(CORPUS) * 0.9):]
    assert len(prompts) == 5
    starts = []
    for p in prompts:
        assert len(p.ids) == 30 and len(p.continuation_ids) == 20 and p.cut
        window = p.text + p.continuation_text
        start = heldout.index(window)  # held-out text, never training text
        assert start == 0 or heldout[start - 1] == "\n"  # a line's beginning
        assert window[0] != "\n"  # not a blank line
        starts.append(start)
    assert starts == sorted(starts) and len(set(starts)) == 5
    assert starts[-1] + 50 <= len(heldout)
    assert evaluate.heldout_prompts(CORPUS, tok, 5, 30, 20)[2].text == prompts[2].text


def test_heldout_prompts_with_a_bpe_tokenizer():
    prompts = evaluate.heldout_prompts(CORPUS, gpt2_tokenizer(), 3, 12, 8)
    assert all(len(p.ids) == 12 and len(p.continuation_ids) == 8 for p in prompts)


def test_heldout_text_too_short_or_foreign_is_an_error():
    tok = CharTokenizer(CHARS)
    with pytest.raises(evaluate.SettingsError, match="too short"):
        evaluate.heldout_prompts(CORPUS[:2000], tok, 4, 128, 128)
    with pytest.raises(evaluate.SettingsError, match="--data: character 'é'"):
        evaluate.heldout_prompts(CORPUS + "é" * 1000, tok, 4, 30, 20)


def test_prompts_file_lines_and_json_lines(tmp_path):
    tok = CharTokenizer(CHARS)
    plain = tmp_path / "p.txt"
    plain.write_text("All:\n\nSpeak, speak.\n", encoding="utf-8")
    prompts = evaluate.read_prompts_file(str(plain), tok)
    assert [p.text for p in prompts] == ["All:", "Speak, speak."]
    assert prompts[0].continuation_ids is None
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "All:\n", "continuation": "Speak."}) + "\n"
                     + json.dumps({"prompt": "MENENIUS:\n"}) + "\n", encoding="utf-8")
    prompts = evaluate.read_prompts_file(str(jsonl), tok)
    assert prompts[0].ids == tok.encode("All:\n") and prompts[0].continuation_text == "Speak."
    assert prompts[1].continuation_ids is None and not prompts[0].cut


@pytest.mark.parametrize("content, message", [
    ("All:\n", "needs at least 2 prompts"),
    ('{"prompt": "All:"}\n{"prompt": 3}\n', ':2: expected an object with a "prompt" string'),
    ('{"prompt": "All:"}\n{"prompt": "x", "continuatoin": "y"}\n', ':2: unknown key "continuatoin"'),
    ('{"prompt": "All:"}\n{"prompt": \n', ":2: not valid JSON"),
    ("All:\nnaïve\n", ":2: character 'ï'"),
])
def test_bad_prompts_files(tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(evaluate.SettingsError, match=message):
        evaluate.read_prompts_file(str(path), CharTokenizer(CHARS))


# ------------------------------------------------------------------------------ the sweep file

def settings_with(**kwargs):
    return evaluate.EvaluateSettings(**kwargs)


def test_the_default_sweep():
    sweep = evaluate.read_sweep(settings_with(sweep=os.path.join(REPO, "configs", "sweep.toml")))
    assert [(s.name, s.params) for s in sweep] == [
        ("greedy", SamplingParams(temperature=0.0)),
        ("pure sampling", SamplingParams(temperature=1.0)),
        ("temperature 0.7", SamplingParams(temperature=0.7)),
        ("top-k 40", SamplingParams(top_k=40)),
        ("top-p 0.95", SamplingParams(top_p=0.95)),
        ("min-p 0.1", SamplingParams(min_p=0.1)),
    ]


def test_inline_settings_replace_the_file():
    sweep = evaluate.read_sweep(settings_with(setting=("temperature=0.5,top-k=7", "min_p=0.2")))
    assert [(s.name, s.params) for s in sweep] == [
        ("temperature=0.5,top-k=7", SamplingParams(temperature=0.5, top_k=7)),
        ("min_p=0.2", SamplingParams(min_p=0.2))]


@pytest.mark.parametrize("toml, message", [
    ('[a]\ntemprature = 0.5\n', r"\[a\]: unknown key 'temprature'; did you mean 'temperature'\?"),
    ('[a]\ntop_p = 1.5\n', r"\[a\]: top_p=1.5: must be"),
    ('temperature = 0.5\n', "'temperature' must be a \\[table\\]"),
    ('', "no settings"),
    ('[a\n', "invalid TOML"),
])
def test_bad_sweep_files(tmp_path, toml, message):
    path = tmp_path / "sweep.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(evaluate.SettingsError, match=message):
        evaluate.read_sweep(settings_with(sweep=str(path)))


# ------------------------------------------------------------------------------ the command

def test_the_command_writes_a_reproducible_table(char_dir, tmp_path, capsys):
    args = [f"--init_from={char_dir}", f"--data={char_dir.parent / 'corpus.txt'}",
            "--num_prompts=3", "--prompt_length=20", "--max_new_tokens=24", "--num_samples=2",
            "--setting=temperature=0", "--setting=temperature=1", "--setting=top_p=0.5",
            f"--out_dir={tmp_path / 'a'}"]
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    assert table_rows(out) == ["temperature=0", "temperature=1", "top_p=0.5", "human"]
    assert sorted(os.listdir(tmp_path / "a")) == sorted(evaluate.OUTPUT_FILES)
    assert "Repetition %, distinct-n, Self-BLEU4 and Zipf: on words (character-level model)" in out
    with open(tmp_path / "a" / "sweep.csv", encoding="utf-8") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    assert float(rows["temperature=0"]["entropy"]) == 0.0
    assert rows["human"]["entropy"] == ""
    assert float(rows["temperature=1"]["entropy"]) > 0
    md = (tmp_path / "a" / "sweep.md").read_text(encoding="utf-8")
    assert md == out
    samples = [json.loads(line) for line in
               (tmp_path / "a" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 3 * 3 * 2 and {s["reason"] for s in samples} == {"length"}
    # greedy's samples of one prompt are the same text
    greedy = [s["text"] for s in samples if s["setting"] == "temperature=0" and s["prompt"] == 1]
    assert len(greedy) == 2 and greedy[0] == greedy[1]
    assert (tmp_path / "a" / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    # the same command again: the same table, once --overwrite allows it
    code, again, err = run_main(capsys, *args)
    assert code == 2 and err.startswith("error: --out_dir=") and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    code, again, err = run_main(capsys, *args, "--overwrite")
    assert code == 0 and again == out


def test_the_command_on_a_bpe_model_with_a_prompts_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=8))
    loader.save_native(model, gpt2_tokenizer(), tmp_path / "bpe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nThe quick brown fox\nOnce upon a time\n", encoding="utf-8")
    code, out, err = run_main(capsys, f"--init_from={tmp_path / 'bpe'}", f"--prompts={prompts}",
                              "--max_new_tokens=6", "--setting=temperature=1",
                              f"--out_dir={tmp_path / 'out'}")
    assert code == 0, err
    assert "Self-BLEU4 and Zipf: on gpt2 tokens" in out
    assert table_rows(out) == ["temperature=1"]
    samples = [json.loads(line) for line in
               (tmp_path / "out" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 3 * 2


@pytest.mark.parametrize("args, message", [
    (["--num_prompts=1"], "--num_prompts=1: must be an integer >= 2"),
    (["--num_sampels=3"], "--num_sampels: unknown flag; did you mean --num_samples?"),
    (["--setting=temperature"], "--setting=temperature: must be key=value pairs"),
    (["--setting=temperature=-1"], "--setting=temperature=-1: temperature=-1.0: must be"),
    (["--setting=top_q=0.5"], "--setting=top_q=0.5: unknown key 'top_q'; did you mean 'top_p'?"),
    (["--sweep=nowhere.toml"], "--sweep=nowhere.toml: no such file"),
    (["--prompts=p.txt", "--data=d.txt"], "--data=d.txt: give --data or --prompts, not both"),
    (["--prompts=nowhere.txt"], "--prompts=nowhere.txt: no such file"),
    (["--data=nowhere.txt"], "--data=nowhere.txt: no such file"),
    (["--prompt_length=100"], "--prompt_length=100: longer than the model's context of 48"),
    (["--init_from=nowhere"], "init_from='nowhere': no such file or directory"),
])
def test_mistakes_are_one_error_line(char_dir, tmp_path, capsys, args, message):
    data = [] if any(a.startswith("--prompts") for a in args) else \
        [f"--data={char_dir.parent / 'corpus.txt'}"]
    defaults = [f"--init_from={char_dir}", *data, "--prompt_length=20", "--max_new_tokens=8",
                f"--out_dir={tmp_path}"]
    code, out, err = run_main(capsys, *defaults, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert message in err


def test_help(capsys):
    code, out, err = run_main(capsys, "--help")
    assert code == 0 and "--num_prompts=INT" in out and "--setting=STR (repeatable)" in out


# ------------------------------------------------------------------------------ the trends

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "config.json")),
                    reason="checkpoints/shakespeare_char/config.json is missing: the shipped "
                           "model is not trained yet (train.py writes it)")
def test_the_papers_trends_hold_on_the_shipped_model():
    """Holtzman et al.'s Table 1, qualitatively, on the shipped model: greedy is the most
    predictable, the most repetitive and the least diverse; pure sampling the least predictable
    and the least alike (Self-BLEU); lowering the temperature (1 -> 0.7) or top-p (1 -> 0.8)
    lowers perplexity and distinct-n.

    24 held-out prompts x 2 samples x 128 characters per setting, seed 1337 (about a minute on
    one CPU thread). Before fixing the seed, every assertion was checked on seeds 1 to 4 as
    well. distinct-3 is asserted for greedy only: at ~25 words per text, nearly every word
    trigram of a sampled text is unique (0.99 or more for every sampling setting).
    """
    loaded = loader.load_model(SHIPPED)
    prompts = evaluate.read_prompts_file(HELDOUT_PROMPTS, loaded.tokenizer)
    sweep = [evaluate.SweepSetting(name, SamplingParams(**params)) for name, params in [
        ("greedy", dict(temperature=0.0)), ("pure", dict(temperature=1.0)),
        ("T=0.7", dict(temperature=0.7)), ("top-p 0.8", dict(top_p=0.8))]]
    rows, _ = evaluate.run_sweep(loaded.model, loaded.tokenizer, prompts, sweep,
                                 num_samples=2, max_new_tokens=128, seed=1337)
    m = dict(rows)
    report = "\n" + evaluate.format_table(rows)  # shown when an assertion fails

    for name in ("pure", "T=0.7", "top-p 0.8"):
        assert m["greedy"]["perplexity"] < m[name]["perplexity"], name + report
        assert m["greedy"]["repetition"] >= m[name]["repetition"], name + report
        assert m["greedy"]["self_bleu"] > m[name]["self_bleu"], name + report
        for n in (1, 2, 3):
            assert m["greedy"][f"distinct_{n}"] < m[name][f"distinct_{n}"], name + report
    assert m["greedy"]["repetition"] > 0, report
    for lower in ("T=0.7", "top-p 0.8"):
        assert m["pure"]["perplexity"] > m[lower]["perplexity"], lower + report
        assert m["pure"]["self_bleu"] < m[lower]["self_bleu"], lower + report
        for n in (1, 2):
            assert m["pure"][f"distinct_{n}"] > m[lower][f"distinct_{n}"], lower + report
