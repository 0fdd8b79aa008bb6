"""Text metrics of a decoding sweep, as pure functions (Holtzman et al., "The Curious Case of
Neural Text Degeneration", ICLR 2020, and the code they released, ari-holtzman/degen).

    perplexity(logprobs)               exp of the mean negative log-probability per token
    repetition(tokens)                 the back-to-back repeat a text ends in, or None
    repetition_percent(generations)    % of generations that end in such a repeat
    distinct_n(generations, n)         distinct n-grams / all n-grams, pooled
    self_bleu(generations)             mean BLEU-4 of each generation against the others
    zipf_coefficient(generations)      -slope of log frequency against log rank
    entropy(probs)                     entropy in nats of each row of a distribution
    split_words(text)                  words and punctuation marks, for character-level models

Everything here works on lists of "units": the model's tokens for a BPE model, words for a
character-level model (see `split_words`); the caller chooses and says which. Nothing here
loads a model or draws a random number.

Where the definitions follow the released code rather than a textbook:
- repetition: Holtzman's metrics/repetition.py looks at the end of a generation only. For each
  n from 1 to 90 it counts how often the final n-gram repeats back to back; the n with the
  most repeats (the smallest n among ties) decides, and the generation is repetitive when that
  count is > 1 and (n >= 3 or the count is > 50). So "a b c a b c" is repetitive, "x x x x"
  is not (a single token four times) and a text that repeats early but not at the end is not.
- distinct-n: the usual definition (Li et al., 2016): distinct n-grams / total n-grams over all
  the generations pooled. (Holtzman's distinct_n.py counts n-grams seen exactly once instead.)
- Self-BLEU4: nltk's `sentence_bleu` with weights (1/4, 1/4, 1/4, 1/4) and
  `SmoothingFunction().method1`, each generation the hypothesis and all the others its
  references, averaged, as metrics/self_bleu.py does (over every generation, not a sample).
- Zipf: least squares on (log rank, log count) of every unit type, as metrics/zipf.py does
  with scipy's linregress (which keeps the 5000 most frequent types; so does `max_rank`).
"""

import math
import re
from collections import Counter

import numpy as np
import torch

REPETITION_MAX_N = 90  # longest repeated phrase looked for (Holtzman's max_n)

# A word (letters, digits, inner apostrophes: "o'er", "Romeo's"), or one punctuation mark.
_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def split_words(text, *, drop_partial_last=False):
    """`text` as words and punctuation marks, e.g. "Nay, sir!" -> ["Nay", ",", "sir", "!"].

    A generation cut at a fixed number of characters usually ends inside a word ("... of the
    du"); `drop_partial_last` drops a last word that the end of the text may have cut, so a
    text looping on "the duke of" still ends with its whole repeated phrase.
    """
    words = _WORD.findall(text)
    # \Z, not $: `$` also matches before a final newline, and a text that ends in "duke\n"
    # ends on a complete word.
    if drop_partial_last and words and re.search(r"\w\Z", text):
        words.pop()
    return words


def perplexity(logprobs):
    """exp(-mean(logprobs)) of natural-log token probabilities, pooled: every token weighs the
    same, whichever text it belongs to. NaN when there are none."""
    logprobs = list(logprobs)
    if not logprobs:
        return math.nan
    return math.exp(-math.fsum(logprobs) / len(logprobs))


def repetition(tokens, max_n=REPETITION_MAX_N):
    """The repeat a sequence ends in, per Holtzman's repetition.py, or None if it is not
    repetitive: (phrase, times, n), the final n-gram `phrase` repeated `times` times back to
    back at the end."""
    tokens = list(tokens)
    reversed_tokens = tokens[::-1]
    best_n, best_times = 1, 0
    for n in range(1, max_n + 1):
        last = reversed_tokens[:n]
        times = 1
        while reversed_tokens[n * times:n * (times + 1)] == last and len(last) == n:
            times += 1
        if times > best_times:  # strictly greater: the smallest n wins a tie
            best_n, best_times = n, times
    if best_times > 1 and (best_n >= 3 or best_times > 50):
        return tokens[len(tokens) - best_n:], best_times, best_n
    return None


def repetition_percent(generations, max_n=REPETITION_MAX_N):
    """Percentage of generations (unit lists) that end in a repeat (see `repetition`)."""
    if not generations:
        return math.nan
    repetitive = sum(repetition(g, max_n) is not None for g in generations)
    return 100.0 * repetitive / len(generations)


def ngrams(units, n):
    return list(zip(*(units[i:] for i in range(n))))


def distinct_n(generations, n):
    """Distinct n-grams / total n-grams over all the generations pooled (NaN if none)."""
    grams = [g for units in generations for g in ngrams(list(units), n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def self_bleu(generations, n=4):
    """Mean BLEU-n of each generation against all the others as references (1 = the
    generations are copies of each other, 0 = they share no n-gram). An empty generation
    scores 0. Needs at least two generations."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    generations = [list(g) for g in generations]
    if len(generations) < 2:
        raise ValueError(f"Self-BLEU needs at least 2 generations, got {len(generations)}")
    smoothing = SmoothingFunction().method1
    weights = (1.0 / n,) * n
    scores = []
    for i, hypothesis in enumerate(generations):
        references = generations[:i] + generations[i + 1:]
        if not hypothesis:
            scores.append(0.0)
            continue
        scores.append(sentence_bleu(references, hypothesis, weights=weights,
                                    smoothing_function=smoothing))
    return float(np.mean(scores))


def zipf_coefficient(generations, max_rank=5000):
    """-slope of the least-squares line through (log rank, log count) of the unit types of all
    the generations pooled; the `max_rank` most frequent types are used. About 1 for natural
    text; higher means a few units dominate. NaN with fewer than two types."""
    counts = Counter(u for units in generations for u in units)
    frequencies = sorted(counts.values(), reverse=True)[:max_rank]
    if len(frequencies) < 2:
        return math.nan
    ranks = np.arange(1, len(frequencies) + 1)
    slope, _ = np.polyfit(np.log(ranks), np.log(frequencies), 1)
    return float(-slope)


def entropy(probs):
    """Entropy in nats of each row of a probability tensor (..., V) -> (...); 0 * log 0 = 0.
    A one-hot row (greedy) has entropy 0."""
    probs = probs.double()
    terms = torch.where(probs > 0, probs * probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    return -terms.sum(dim=-1)
