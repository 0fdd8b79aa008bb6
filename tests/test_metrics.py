"""metrics.py on hand-made inputs whose answers are known by hand."""

import math

import pytest
import torch

from nanosample import metrics


# ------------------------------------------------------------------------------ repetition

def test_a_phrase_repeated_back_to_back_at_the_end_is_repetitive():
    text = "once upon a time the cat sat down and the cat sat down and the cat sat down".split()
    # The last 5 words, "and the cat sat down", come twice back to back; before them stands
    # "time the cat sat down". No other n repeats at the end.
    phrase, times, n = metrics.repetition(text)
    assert (phrase, times, n) == ("and the cat sat down".split(), 2, 5)


def test_three_copies_of_a_trigram():
    phrase, times, n = metrics.repetition(list("xyabcabcabc"))
    assert (phrase, times, n) == (list("abc"), 3, 3)


def test_text_without_repeats_is_not_repetitive():
    assert metrics.repetition("the quick brown fox jumps over the lazy dog".split()) is None
    assert metrics.repetition([]) is None
    assert metrics.repetition(["alone"]) is None


def test_a_repeat_that_does_not_reach_the_end_does_not_count():
    tokens = "a b c a b c a b c then something new".split()
    assert metrics.repetition(tokens) is None


def test_short_ngrams_need_more_than_fifty_repeats():
    # Holtzman's rule: count > 1 and (n >= 3 or count > 50). A single token 50 times is not
    # repetitive, 51 times it is; a bigram repeated 30 times is not either.
    assert metrics.repetition(["the"] * 50) is None
    assert metrics.repetition(["the"] * 51) == (["the"], 51, 1)
    assert metrics.repetition(["of", "the"] * 30) is None
    # "x x x x": n = 1 repeats 4 times, n = 2 only twice; the most repeats (n = 1) decides
    assert metrics.repetition(list("xxxx")) is None


def test_the_most_repeated_n_wins_and_the_smallest_n_breaks_ties():
    # "ab" three times: n = 2 repeats 3 times, n = 4 and n = 6 once; n = 2 decides, and a
    # bigram needs more than 50 repeats
    assert metrics.repetition(list("zababab")) is None
    # "abcabc" x 2 = "abc" x 4: n = 3 (4 times) beats n = 6 (2 times)
    assert metrics.repetition(list("abc" * 4)) == (list("abc"), 4, 3)


def test_repetition_percent():
    looping = "and so on and so on and so on".split()
    plain = "it was a dark and stormy night".split()
    assert metrics.repetition_percent([looping, plain, plain, plain]) == 25.0
    assert math.isnan(metrics.repetition_percent([]))


# ------------------------------------------------------------------------------ distinct-n

def test_distinct_n_by_hand():
    texts = ["a b a b".split(), "a c".split()]
    # unigrams: a b a b a c -> 3 distinct of 6
    assert metrics.distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams: (a b) (b a) (a b) | (a c) -> 3 distinct of 4; pooled, never across texts
    assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 4)
    # trigrams: (a b a) (b a b) -> 2 of 2; the two-word text has none
    assert metrics.distinct_n(texts, 3) == 1.0
    assert math.isnan(metrics.distinct_n([["a"]], 2))


# ------------------------------------------------------------------------------ Self-BLEU

def test_identical_generations_have_self_bleu_1():
    text = "to be or not to be that is the question".split()
    assert metrics.self_bleu([text, text, text]) == pytest.approx(1.0)


def test_generations_sharing_nothing_have_self_bleu_0():
    texts = ["a b c d e".split(), "f g h i j".split(), "k l m n o".split()]
    assert metrics.self_bleu(texts) == 0.0


def test_self_bleu_matches_nltk_each_against_the_others():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    texts = ["the cat sat on the mat".split(), "the cat lay on the rug".split(),
             "a dog sat on the mat today".split()]
    smooth = SmoothingFunction().method1
    expected = sum(sentence_bleu(texts[:i] + texts[i + 1:], texts[i], smoothing_function=smooth)
                   for i in range(3)) / 3
    assert metrics.self_bleu(texts) == pytest.approx(expected)
    assert 0 < expected < 1
    with pytest.raises(ValueError, match="at least 2"):
        metrics.self_bleu([texts[0]])


# ------------------------------------------------------------------------------ Zipf

def test_zipf_coefficient_of_an_exact_power_law():
    # counts 1000 / r^s for ranks 1..20 (whole numbers, so close to exact): slope -s
    for s in (1.0, 1.5):
        tokens = [f"w{r}" for r in range(1, 21) for _ in range(round(1000 / r ** s))]
        assert metrics.zipf_coefficient([tokens]) == pytest.approx(s, abs=0.01)


def test_zipf_coefficient_of_a_flat_distribution_is_0():
    assert metrics.zipf_coefficient([list("abcdefgh") * 3]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(metrics.zipf_coefficient([["one", "one"]]))


# ------------------------------------------------------------------------------ perplexity, entropy

def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    V = 65
    assert metrics.perplexity([-math.log(V)] * 100) == pytest.approx(V)
    assert metrics.perplexity([0.0, 0.0]) == 1.0  # certain of every token
    # pooled per token: exp(-(log 1/2 + log 1/8) / 2) = 4
    assert metrics.perplexity([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0)
    assert math.isnan(metrics.perplexity([]))


def test_entropy_rows():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert metrics.entropy(probs).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])


# ------------------------------------------------------------------------------ words

def test_split_words():
    assert metrics.split_words("Nay, sir! O'er the hills,\nRomeo's men.") == \
        ["Nay", ",", "sir", "!", "O'er", "the", "hills", ",", "Romeo's", "men", "."]
    # a generation cut mid-word: the cut word goes, a whole last word stays
    assert metrics.split_words(" of the du", drop_partial_last=True) == ["of", "the"]
    assert metrics.split_words(" of the duke ", drop_partial_last=True) == ["of", "the", "duke"]
    assert metrics.split_words(" of the duke.", drop_partial_last=True) == ["of", "the", "duke", "."]


def test_a_text_ending_in_a_newline_keeps_its_last_word():
    # issue 14: `\w$` matched before a final newline, so "duke\n" lost "duke"
    assert metrics.split_words(" of the duke\n", drop_partial_last=True) == ["of", "the", "duke"]
    assert metrics.split_words("of the duke\n\n", drop_partial_last=True) == ["of", "the", "duke"]
    assert metrics.split_words("of the duke\nan", drop_partial_last=True) == ["of", "the", "duke"]
    assert metrics.split_words("duke\n", drop_partial_last=False) == ["duke"]


def test_a_cut_loop_is_still_repetitive_once_the_cut_word_is_dropped():
    text = " the duke of york, the duke of york, the duke of york, the du"
    assert metrics.repetition(metrics.split_words(text)) is None
    phrase, times, n = metrics.repetition(metrics.split_words(text, drop_partial_last=True))
    assert (times, n) == (3, 5) and phrase == ["duke", "of", "york", ",", "the"]
