"""The generate loop: reproducibility across batching, stop strings, <|endoftext|>, exact
lengths, and generation past the context against a plain loop without a cache."""

import pytest
import torch

from conftest import CHARS, run_generate as run
from nanosample.generate import TextStream, context_start, generate, sample_generator
from nanosample.sampling import BatchParams, SamplingParams, sample_step
from nanosample.tokenizer import CharTokenizer, gpt2_tokenizer




SETTINGS = SamplingParams(temperature=0.9, top_k=12, top_p=0.9)


def test_sample_i_is_the_same_whatever_the_batching(model, tokenizer):
    seven = run(model, tokenizer, params=SETTINGS, num_samples=7, max_new_tokens=30, seed=7)
    one_by_one = run(model, tokenizer, params=SETTINGS, num_samples=7, max_new_tokens=30, seed=7,
                     batch_size=1)
    three = run(model, tokenizer, params=SETTINGS, num_samples=7, max_new_tokens=30, seed=7,
                batch_size=3)
    alone = run(model, tokenizer, params=SETTINGS, num_samples=1, max_new_tokens=30, seed=7)
    assert seven == one_by_one == three
    assert alone[0] == seven[0]
    assert len({text for text, _, _ in seven.values()}) == 7  # the samples do differ
    other_seed = run(model, tokenizer, params=SETTINGS, num_samples=1, max_new_tokens=30, seed=8)
    assert other_seed[0][0] != seven[0][0]


def test_max_new_tokens_is_exact_and_padding_ids_never_appear(model, tokenizer):
    out = run(model, tokenizer, params=SamplingParams(temperature=1.5), num_samples=5,
              max_new_tokens=37, seed=1)
    for text, reason, tokens in out.values():
        assert reason == "length" and len(tokens) == 37 and len(text) == 37
        assert max(tokens) < len(CHARS)
    assert run(model, tokenizer, params=SETTINGS, max_new_tokens=0)[0] == ("", "length", [])


def test_per_sample_settings(model, tokenizer):
    params = [SamplingParams(temperature=0), SETTINGS, SamplingParams(temperature=0)]
    out = run(model, tokenizer, params=params, num_samples=3, max_new_tokens=20, seed=3)
    assert out[0] == out[2]  # greedy is greedy, whatever the seed stream
    greedy = run(model, tokenizer, params=SamplingParams(temperature=0), max_new_tokens=20)
    assert greedy[0] == out[0]


def test_stop_string_across_tokens(model, tokenizer):
    full, _, _ = run(model, tokenizer, params=SETTINGS, max_new_tokens=40, seed=11)[0]
    stop = full[10:13]  # three characters, so three tokens
    first = full.find(stop)
    text, reason, tokens = run(model, tokenizer, params=SETTINGS, max_new_tokens=40, seed=11,
                               stop=[stop])[0]
    assert reason == "stop" and text == full[:first]
    assert len(tokens) == first + len(stop)  # it stopped on the token that completed the string


def test_text_stream_holds_back_a_possible_stop_string():
    tok = gpt2_tokenizer()
    stream = TextStream(tok, ["o wor"])
    pieces = []
    for token in tok.encode("Hello world, again"):
        pieces.append(stream.add(token))
        if pieces[-1][1]:
            break
    # "Hello" could begin "o wor": its "o" is held back until " world" decides
    assert pieces[0] == ("Hell", False)
    assert pieces[1] == ("", True)
    assert stream.text == "Hell"


def test_text_stream_whole_characters_only():
    tok = gpt2_tokenizer()
    ids = tok.encode("naïve café ☕")
    stream = TextStream(tok, [])
    out = "".join(stream.add(i)[0] for i in ids) + stream.finish()
    assert out == "naïve café ☕" and "\ufffd" not in out


def test_end_of_text_stops_a_sample(model, tokenizer):
    text, _, tokens = run(model, tokenizer, params=SETTINGS, max_new_tokens=30, seed=2)[0]
    # pretend the first token that is new after the first few ends the text
    j = next(j for j in range(3, 30) if tokens[j] not in tokens[:j])

    class WithEnd(CharTokenizer):
        eot_id = tokens[j]

    end_tok = WithEnd(CHARS)
    got = run(model, end_tok, params=SETTINGS, max_new_tokens=30, seed=2)[0]
    assert got == (text[:j], "eot", tokens[:j + 1])
    got = run(model, end_tok, params=SETTINGS, max_new_tokens=30, seed=2, stop_at_eot=False)[0]
    assert got == (text, "length", tokens)


def test_context_start_rule():
    assert context_start(24, 0, 24) == 0
    assert context_start(25, 0, 24) == 13  # keeps the last 12 tokens
    assert context_start(36, 13, 24) == 13
    assert context_start(38, 13, 24) == 26


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SETTINGS,
                                    SamplingParams(temperature=1.1, repetition_penalty=1.3,
                                                   frequency_penalty=0.5, presence_penalty=0.3)])
def test_past_block_size_matches_a_plain_loop(model, tokenizer, params):
    prompt = tokenizer.encode("a long prompt, ")  # 15 of the 24 positions
    got = run(model, tokenizer, prompt="a long prompt, ", params=params, num_samples=2,
              max_new_tokens=60, seed=5)

    # The reference: no cache, a full forward over the context the rule gives, every step.
    B, V = 2, model.config.vocab_size
    seqs = [list(prompt) for _ in range(B)]
    gens = [sample_generator(5, i) for i in range(B)]
    batch = BatchParams([params] * B, V)
    seen = torch.zeros(B, V, dtype=torch.bool)
    seen[:, prompt] = True
    counts = torch.zeros(B, V)
    start = 0
    with torch.no_grad():
        for _ in range(60):
            start = context_start(len(seqs[0]), start, model.config.block_size)
            idx = torch.tensor([s[start:] for s in seqs])
            logits = model(idx)[:, -1]
            step = sample_step(logits, batch, gens, tokenizer.n_vocab, seen=seen, counts=counts)
            for row, token in enumerate(step.tokens.tolist()):
                seqs[row].append(token)
                seen[row, token] = True
                counts[row, token] += 1
    for i in range(B):
        assert got[i][2] == seqs[i][len(prompt):]


def test_prompt_must_fit_the_context(model, tokenizer):
    with pytest.raises(ValueError, match="block_size"):
        list(generate(model, tokenizer, tokenizer.encode("x" * 25), SETTINGS))


def test_finished_rows_do_not_disturb_the_others_past_block_size(model, tokenizer):
    # Samples that stop early stay in the batch; the re-prefill past block_size must still work
    # and every other sample's text must be what it is without the stop string.
    free = run(model, tokenizer, params=SETTINGS, num_samples=4, max_new_tokens=40, seed=9)
    stopped = run(model, tokenizer, params=SETTINGS, num_samples=4, max_new_tokens=40, seed=9,
                  stop=["e"])
    assert any(reason == "stop" for _, reason, _ in stopped.values())
    for i in range(4):
        text, reason, _ = stopped[i]
        assert free[i][0].startswith(text)
        assert (reason == "stop") == ("e" in free[i][0])
