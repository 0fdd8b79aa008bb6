"""The decoding sweep: how each sampling setting trades predictability for diversity, measured.

    python evaluate.py                                   # the shipped model, configs/sweep.toml
    python evaluate.py --data=path/to/input.txt --num_prompts=8
    python evaluate.py --prompts=tests/data/shakespeare_heldout_prompts.jsonl   # no download
    python evaluate.py --init_from=gpt2 --prompts=prompts.jsonl --setting=temperature=0.9,top_p=0.9

For every setting in the sweep (a TOML file of named settings, or inline --setting flags) it
generates `num_samples` continuations of `max_new_tokens` tokens for each of `num_prompts`
prompts and measures them as Holtzman et al. (ICLR 2020, Table 1) do: perplexity under the
untempered model, repetition %, distinct-1/2/3, Self-BLEU4, the Zipf coefficient and the mean
entropy of the distribution each token was drawn from (metrics.py has the definitions). The
human continuations of the same prompts get the same measurements, as the reference row.

Prompts: with --prompts, one per line of a text file, or JSON Lines {"prompt": ..., and
optionally "continuation": the human text that follows, for the reference row}. Otherwise
`num_prompts` windows of held-out text at evenly spaced offsets of the validation split (the
last 10 %, as train.py splits) of tiny Shakespeare (--data, or downloaded once): each window
starts at the beginning of a line; its first `prompt_length` tokens are the prompt and the next
`max_new_tokens` the human continuation.

Units: repetition, distinct-n, Self-BLEU and Zipf are computed on words (and punctuation marks)
for a character-level model, on the model's tokens for a BPE model; perplexity and entropy are
always per model token. The table says which. A text cut at a token count may end inside a
word; for words, that last piece is left out (metrics.split_words), so "... of the du" ends
on "the".

How the samples are drawn, so the table reproduces and the settings compare fairly: sample j
of prompt i has index i * num_samples + j (generate.py seeds it from (seed, index)) under every
setting, so all settings see the same random numbers. Greedy's samples are all the same text.
The diversity metrics (distinct-n, Self-BLEU, Zipf) are computed on each of the num_samples
sets of one generation per prompt, as the paper measures one generation per prompt, and
averaged; repetition %, perplexity and entropy pool every generation.

Output: the table on stdout, and in --out_dir: sweep.md (the table with what was measured),
sweep.csv, sweep.png (perplexity against diversity, one point per setting, the human text
marked) and samples.jsonl (every generation). Existing files are never replaced unless
--overwrite is given; each is written beside its path and renamed into place, whole.

Exit codes (nanosample/cli.py): a user's mistake is one line `error: ...` on stderr and exit
code 2, found before the sweep starts (flags, files, an --out_dir that cannot be written, a
sweep too large for the memory left); a failure midway (the model producing NaN logits, a
full disk) is one `error:` line and exit code 1; Ctrl-C is 130.
"""

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields

from nanosample import cli, threads
from nanosample.sampler_settings import NUMBERS
# `setting` is also a flag's name below, so the field helper goes by another name here
from nanosample.settings import DEVICE_PATTERN, HelpRequested, SettingsError, check, parse_settings
from nanosample.settings import setting as option

DESCRIPTION = ("Sweep decoding settings and measure each as Holtzman et al. do: perplexity, "
               "repetition, distinct-n, Self-BLEU, Zipf coefficient and entropy, against the "
               "human continuation of the same held-out prompts.")
OUTPUT_FILES = ("sweep.md", "sweep.csv", "sweep.png", "samples.jsonl")
VAL_FRACTION = 0.1  # the last 10 % of the corpus is held out (train.py's and nanoGPT's split)
SWEEP_KEYS = tuple(s.name for s in NUMBERS)  # the sampler's numbers (sampler_settings.SETTINGS)
INTEGER_KEYS = tuple(s.name for s in NUMBERS if isinstance(s.off, int))
HUMAN = "human"
# The table's columns: (key, heading, format)
COLUMNS = (
    ("perplexity", "perplexity", "{:.2f}"),
    ("repetition", "repetition %", "{:.1f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("distinct_3", "distinct-3", "{:.3f}"),
    ("self_bleu", "Self-BLEU4", "{:.3f}"),
    ("zipf", "Zipf", "{:.2f}"),
    ("entropy", "entropy", "{:.2f}"),
)


# Why 96 prompts of 128 tokens. Greedy decoding of the shipped model ends
# in a Holtzman repeat after 128 new characters for about 5.7 % of held-out prompts (51 of 900
# random line starts of the held-out split), pure sampling for none of 400. Longer texts do not
# help, as the model leaves its loops again: on 400 prompts greedy's rate is 6.8 % at 128 new
# characters, 3.5 % at 192, 3.8 % at 256, 2.8 % at 384 and 3.0 % at 512. The number of loops in
# a draw of N prompts is binomial: with 24 prompts a quarter of the draws show greedy at 0 %,
# equal to pure sampling; with 96, 0.4 % of them (90 % show 2 to 9 loops, 2 % to 9 %).

@dataclass(frozen=True)
class EvaluateSettings:
    """Everything `evaluate.py` reads."""
    init_from: str = option("shakespeare_char",
        "what to evaluate: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a path to a Hugging Face or "
        "native model directory, a nanoGPT out_dir or ckpt.pt file, or the name of a folder in "
        "checkpoints/ (shakespeare_char is the shipped model)")
    sweep: str = option("configs/sweep.toml",
        "TOML file of the settings to sweep: one [table] per setting, its heading the setting's "
        "name, holding sampler keys (temperature, top_k, top_p, min_p, repetition_penalty, "
        "frequency_penalty, presence_penalty)")
    setting: tuple[str, ...] = option((),
        "a setting to sweep instead of the --sweep file, as key=value pairs separated by commas, "
        "e.g. temperature=0.7,top_k=40; repeat the flag for several")
    prompts: str | None = option(None,
        "prompts file: one prompt per line, or JSON Lines of {\"prompt\": ..., \"continuation\": "
        "...} (the continuation, optional, is the human reference); None = held-out windows of "
        "--data")
    data: str = option("",
        "the text whose last 10 % gives the prompts and human continuations when --prompts is "
        "None; empty = tiny Shakespeare, downloaded once")
    num_prompts: int = option(96, "prompts taken from --data (at least 2: Self-BLEU compares "
                                   "generations). 96: enough that greedy's rare loops show up "
                                   "in the repetition column on any draw of prompts")
    prompt_length: int = option(128, "tokens in each prompt taken from --data")
    num_samples: int = option(2, "samples per prompt and setting")
    max_new_tokens: int = option(128, "tokens generated per sample (and the length of the "
                                       "human continuation)")
    seed: int = option(1337, "random seed; the table reproduces for the same seed")
    out_dir: str = option("out/evaluate", "where sweep.md, sweep.csv, sweep.png and samples.jsonl "
                                           "are written")
    overwrite: bool = option(False, "replace those files when they exist (by default an "
                                     "existing file is an error)")
    device: str = option("auto", "cpu, cuda, cuda:N or mps; auto = cuda if available, else "
                                  "mps, else cpu")
    threads: int | None = option(None, "CPU threads for torch; None = automatic, as sample.py's "
                                        "--threads (one prompt's num_samples rows: the shipped "
                                        "model gets 1, too little work to share between "
                                        "threads; fewer on a busy machine)")

    def __post_init__(self):
        check(self.num_prompts >= 2, "num_prompts", self.num_prompts, "must be an integer >= 2")
        check(self.prompt_length >= 1, "prompt_length", self.prompt_length,
              "must be an integer >= 1")
        check(self.num_samples >= 1, "num_samples", self.num_samples, "must be an integer >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens,
              "must be an integer >= 1")
        check(0 <= self.seed < 2**63, "seed", self.seed, "must be an integer >= 0 and < 2**63")
        check(self.out_dir != "", "out_dir", "''", "must be a directory path")
        check(self.threads is None or self.threads >= 1, "threads", self.threads,
              "must be an integer >= 1, or None for the automatic choice")
        check(self.prompts != "", "prompts", "''", "must be a file path, or None")
        check(bool(DEVICE_PATTERN.fullmatch(self.device)), "device", self.device,
              "must be auto, cpu, cuda, cuda:N or mps")
        check(self.prompts is None or self.data == "", "data", self.data,
              "give --data or --prompts, not both (--prompts brings its own text)")
        for text in self.setting:
            parse_inline_setting(text)


# ---------------------------------------------------------------------------------------------
# What to sweep

@dataclass(frozen=True)
class SweepSetting:
    name: str
    params: object  # sampling.SamplingParams


def _sampling_params(values, where):
    """SamplingParams from {key: value} of SWEEP_KEYS; SettingsError naming `where`."""
    import difflib

    from nanosample import sampling

    for key in values:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(key, SWEEP_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(SWEEP_KEYS)}"
            raise SettingsError(f"{where}: unknown key '{key}'{hint}")
    values = dict(values)
    for s in NUMBERS:
        if isinstance(s.off, float) and isinstance(values.get(s.name), int) \
                and not isinstance(values[s.name], bool):
            values[s.name] = float(values[s.name])  # TOML's `temperature = 1` is an int
    try:
        return sampling.SamplingParams(**values)
    except ValueError as e:
        raise SettingsError(f"{where}: {e}") from None


def parse_inline_setting(text):
    """"temperature=0.7,top_k=40" -> {"temperature": 0.7, "top_k": 40}; ValueError if malformed."""
    values = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        key = key.strip().replace("-", "_")
        if not (eq and key and value.strip()):
            raise ValueError(f"setting={text}: must be key=value pairs separated by commas, e.g. "
                             f"temperature=0.7,top_k=40")
        if key in values:
            raise ValueError(f"setting={text}: {key} is given twice; keep one")
        try:
            number = int(value) if key in INTEGER_KEYS else float(value)
        except ValueError:
            raise ValueError(f"setting={text}: {key}: expected a number, got {value.strip()!r}") \
                from None
        values[key] = number
    return values


def read_sweep(settings):
    """The settings to sweep: --setting flags when given, else the --sweep file's tables."""
    if settings.setting:
        return [SweepSetting(text, _sampling_params(parse_inline_setting(text), f"--setting={text}"))
                for text in settings.setting]
    path = settings.sweep
    text = cli.read_user_text(path, f"--sweep={path}", what="a TOML file")
    table = cli.parse_toml(text, f"--sweep={path}")
    sweep = []
    for name, values in table.items():
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: '{name}' must be a [table] of sampler keys, e.g. "
                                f"[\"{name}\"] then temperature = 0.7 on the next line")
        sweep.append(SweepSetting(name, _sampling_params(values, f"{path}: [{name}]")))
    if not sweep:
        raise SettingsError(f"{path}: no settings; add a [table] per setting to sweep")
    return sweep


# ---------------------------------------------------------------------------------------------
# Prompts

@dataclass
class Prompt:
    ids: list                   # the prompt's token ids
    text: str
    continuation_ids: list | None = None  # the human continuation, when known
    continuation_text: str | None = None
    cut: bool = False           # the continuation was cut at a token count (may end mid-word)


def heldout_prompts(text, tokenizer, num_prompts, prompt_length, continuation_length,
                    val_fraction=VAL_FRACTION, flag="--data"):
    """`num_prompts` windows of the last `val_fraction` of `text`: prompt + human continuation.

    The windows' starts are evenly spaced over the held-out text, each moved forward to the
    beginning of a line, so a prompt starts where a speech or a verse line does.
    """
    heldout = text[int(len(text) * (1 - val_fraction)):]
    want = prompt_length + continuation_length
    # A token is at least one character for a character vocabulary; BPE tokens are longer,
    # except the few bytes of one character that are split: 4 characters a token is ample.
    span = want if tokenizer.name == "char" else 4 * want
    last_start = len(heldout) - span
    if last_start < 0:
        raise SettingsError(f"{flag}: the held-out text (the last {val_fraction:.0%}) has "
                            f"{len(heldout)} characters, too short for windows of {want} tokens; "
                            f"use a longer text or a smaller --prompt_length/--max_new_tokens")
    prompts = []
    for i in range(num_prompts):
        start = round(i * last_start / max(num_prompts - 1, 1))
        if start == 0 or heldout[start - 1] != "\n":
            # on to the next line's start (the split itself falls mid-line), or back to
            # this line's start when the next one is too late
            after = heldout.find("\n", start, last_start) + 1
            start = after if after > 0 else heldout.rfind("\n", 0, start) + 1
        while heldout[start] == "\n" and start < last_start:
            start += 1  # a speech, not the blank line before it
        try:
            ids = tokenizer.encode(heldout[start:start + span])
        except ValueError as e:  # a character outside a character vocabulary
            raise SettingsError(f"{flag}: {e}") from None
        if len(ids) < want:
            raise SettingsError(f"{flag}: a window of {span} characters gives only {len(ids)} "
                                f"tokens, fewer than {want}")
        prompt_ids, continuation = ids[:prompt_length], ids[prompt_length:want]
        prompts.append(Prompt(prompt_ids, tokenizer.decode(prompt_ids), continuation,
                              tokenizer.decode(continuation), cut=True))
    return prompts


def read_prompts_file(path, tokenizer):
    """Prompts of a --prompts file: one per line, or JSON Lines of {"prompt", "continuation"}."""
    flag = f"--prompts={path}"
    text = cli.read_user_text(path, flag, what="a prompts file", limit=cli.PROMPTS_LIMIT)
    lines = text.removeprefix("\ufeff").splitlines()
    lines = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    jsonl = bool(lines) and lines[0][1].lstrip().startswith("{")
    prompts = []
    for n, line in lines:
        where = f"{flag}:{n}"
        continuation = None
        if jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SettingsError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise SettingsError(f"{where}: expected an object with a \"prompt\" string")
            unknown = sorted(set(record) - {"prompt", "continuation"})
            if unknown:
                raise SettingsError(f"{where}: unknown key \"{unknown[0]}\"; the keys are "
                                    f"\"prompt\" and \"continuation\"")
            text, continuation = record["prompt"], record.get("continuation")
            if continuation is not None and not isinstance(continuation, str):
                raise SettingsError(f"{where}: \"continuation\" must be a string")
        else:
            text = line
        if text == "":
            raise SettingsError(f"{where}: the prompt is empty")
        try:
            ids = tokenizer.encode(text)
            continuation_ids = None if continuation is None else tokenizer.encode(continuation)
        except ValueError as e:
            raise SettingsError(f"{where}: {e}") from None
        prompts.append(Prompt(ids, text, continuation_ids, continuation))
    if len(prompts) < 2:
        raise SettingsError(f"{flag}: needs at least 2 prompts (Self-BLEU compares generations), "
                            f"found {len(prompts)}")
    return prompts


def check_prompt_lengths(prompts, block_size, flag):
    for i, p in enumerate(prompts):
        if len(p.ids) > block_size:
            raise SettingsError(f"{flag}: prompt {i + 1} is {len(p.ids)} tokens, longer than the "
                                f"model's context of {block_size} tokens (block_size)")


# ---------------------------------------------------------------------------------------------
# Generating and scoring

@dataclass
class Generation:
    prompt: int                 # index of the prompt
    sample: int                 # j: which of the prompt's samples
    ids: list = field(default_factory=list)       # the generated tokens (<|endoftext|> included)
    text: str = ""
    reason: str | None = None   # "eot" | "length"
    logprobs: list = field(default_factory=list)  # untempered log-probability of each token
    entropies: list = field(default_factory=list)  # entropy of each token's final distribution


class StepRecorder:
    """generate()'s trace callback: for each generated token, its log-probability under the
    untempered model and the entropy of the distribution it was actually drawn from."""

    def __init__(self, generations, n_vocab):
        self.generations = generations  # {sample index: Generation}
        self.n_vocab = n_vocab

    def __call__(self, step):
        import torch

        from nanosample import metrics
        from nanosample import sampling

        logits = sampling.clean_logits(step.raw_logits, self.n_vocab)        # (B, V)
        logprobs = torch.log_softmax(logits.double(), dim=-1)                 # (B, V)
        chosen = logprobs.gather(-1, step.result.tokens[:, None])[:, 0]       # (B,)
        entropies = metrics.entropy(sampling.final_probabilities(step.result.candidates))  # (B,)
        for row, index in enumerate(step.samples):
            if step.active[row]:
                self.generations[index].logprobs.append(float(chosen[row]))
                self.generations[index].entropies.append(float(entropies[row]))


def generate_for_prompt(model, tokenizer, prompt_index, prompt, params, num_samples,
                        max_new_tokens, seed, on_token=None):
    """The `num_samples` generations of one prompt under one setting, as one batch."""
    from nanosample import generate

    first = prompt_index * num_samples
    generations = {first + j: Generation(prompt_index, j) for j in range(num_samples)}
    recorder = StepRecorder(generations, tokenizer.n_vocab)
    for piece in generate.generate(model, tokenizer, prompt.ids, params,
                                   num_samples=num_samples, max_new_tokens=max_new_tokens,
                                   seed=seed, first_sample=first, trace=recorder):
        g = generations[piece.sample]
        g.text += piece.text
        if piece.token is not None:
            g.ids.append(piece.token)
            if on_token:
                on_token(1)
        if piece.done:
            g.reason = piece.reason
            if on_token:
                on_token(max_new_tokens - len(g.ids))  # a sample that stopped early
    for g in generations.values():
        assert len(g.logprobs) == len(g.ids), "one trace step per generated token"
    return [generations[first + j] for j in range(num_samples)]


def score_continuation(model, prompt_ids, continuation_ids, n_vocab):
    """Untempered log-probability of each continuation token after the prompt (ids >= n_vocab,
    nanoGPT's padding, excluded from the softmax as sampling.clean_logits does).

    The model sees what generate() would have shown it: the whole sequence while it fits in
    block_size, then (generate.context_start) the last half block, growing back to a full one.
    Each stretch with one context start is a single forward pass.
    """
    import torch

    from nanosample.generate import context_start

    block_size = model.config.block_size
    sequence = list(prompt_ids) + list(continuation_ids)
    first = len(prompt_ids)
    assert 0 < first <= block_size
    # start[t]: where the context predicting token t begins
    starts, start = {}, 0
    for t in range(first, len(sequence)):
        start = context_start(t, start, block_size) if t > first else 0
        starts[t] = start
    logprobs = []
    device = model.transformer.wte.weight.device
    t = first
    with torch.no_grad():
        while t < len(sequence):
            start = starts[t]
            end = t
            while end + 1 < len(sequence) and starts[end + 1] == start:
                end += 1
            # predict tokens t..end from the context sequence[start:end]
            x = torch.tensor([sequence[start:end]], dtype=torch.long, device=device)  # (1, T)
            logits = model(x)                                                   # (1, T, V)
            logits = logits[0, t - 1 - start:].double()                         # (end - t + 1, V)
            logits[:, n_vocab:] = -math.inf
            targets = torch.tensor(sequence[t:end + 1], device=device)
            lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
            logprobs += lp.tolist()
            t = end + 1
    return logprobs


# ---------------------------------------------------------------------------------------------
# Measuring

def units_of(tokenizer, ids, text, cut):
    """What the text metrics count: words for a character model, tokens for BPE."""
    from nanosample import metrics

    if tokenizer.name == "char":
        return metrics.split_words(text, drop_partial_last=cut)
    eot = tokenizer.eot_id
    return [i for i in ids if i != eot]


def measure(unit_sets, logprobs, entropies):
    """One table row. `unit_sets`: the replicate sets (each one generation per prompt, as unit
    lists); diversity is computed per set and averaged. `entropies` None for human text."""
    import numpy as np

    from nanosample import metrics

    everything = [units for units_set in unit_sets for units in units_set]

    def mean_over_sets(fn):
        return float(np.mean([fn(s) for s in unit_sets]))

    return {
        "perplexity": metrics.perplexity(logprobs),
        "repetition": metrics.repetition_percent(everything),
        "distinct_1": mean_over_sets(lambda s: metrics.distinct_n(s, 1)),
        "distinct_2": mean_over_sets(lambda s: metrics.distinct_n(s, 2)),
        "distinct_3": mean_over_sets(lambda s: metrics.distinct_n(s, 3)),
        "self_bleu": mean_over_sets(metrics.self_bleu),
        "zipf": mean_over_sets(metrics.zipf_coefficient),
        "entropy": float(np.mean(entropies)) if entropies else math.nan,
    }


def run_sweep(model, tokenizer, prompts, sweep, *, num_samples, max_new_tokens, seed,
              progress=None):
    """Generate and measure every setting. Returns (rows, generations): rows is a list of
    (name, metrics dict), the human row last when every prompt has a continuation;
    generations {setting name: [Generation, ...]} in prompt, then sample order."""
    rows, generations = [], {}
    for s in sweep:
        made = []
        for i, prompt in enumerate(prompts):
            cli.check_interrupted()  # even if a library swallowed Ctrl-C
            if progress is not None:
                progress.set_postfix_str(s.name, refresh=False)
            made += generate_for_prompt(model, tokenizer, i, prompt, s.params, num_samples,
                                        max_new_tokens, seed,
                                        on_token=progress.update if progress else None)
        generations[s.name] = made
        unit_sets = [[units_of(tokenizer, g.ids, g.text, g.reason == "length")
                      for g in made if g.sample == j] for j in range(num_samples)]
        logprobs = [lp for g in made for lp in g.logprobs]
        entropies = [e for g in made for e in g.entropies]
        rows.append((s.name, measure(unit_sets, logprobs, entropies)))
    if all(p.continuation_ids for p in prompts):
        logprobs = []
        for p in prompts:
            logprobs += score_continuation(model, p.ids, p.continuation_ids, tokenizer.n_vocab)
        units = [units_of(tokenizer, p.continuation_ids, p.continuation_text, p.cut)
                 for p in prompts]
        rows.append((HUMAN, measure([units], logprobs, None)))
    return rows, generations


# ---------------------------------------------------------------------------------------------
# Output

def format_table(rows):
    """The rows as a markdown table with aligned columns (it reads as well on a terminal)."""
    header = ["setting"] + [heading for _, heading, _ in COLUMNS]
    body = []
    for name, values in rows:
        cells = [name]
        for key, _, fmt in COLUMNS:
            v = values[key]
            cells.append("–" if v is None or (isinstance(v, float) and math.isnan(v))
                         else fmt.format(v))
        body.append(cells)
    widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]

    def line(cells):
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule] + [line(b) for b in body])


def describe_run(settings, prompts, sweep, units, val_fraction):
    where = settings.prompts or (settings.data or "tiny Shakespeare") + \
        f" (held-out last {val_fraction:.0%})"
    return (f"Model: {settings.init_from}. Prompts: {len(prompts)} from {where}"
            + ("" if settings.prompts else f", {settings.prompt_length} tokens each")
            + f". {settings.num_samples} samples per prompt and setting, {settings.max_new_tokens} "
            f"new tokens each, seed {settings.seed}. Perplexity: per token under the untempered "
            f"model. Repetition %, distinct-n, Self-BLEU4 and Zipf: on {units}. Entropy: mean "
            f"entropy (nats) of the distribution each token was drawn from (greedy = 0). "
            f"Settings: " + "; ".join(f"{s.name} ({describe_params(s.params)})" for s in sweep)
            + ".")


def describe_params(params):
    from nanosample.sampling import SamplingParams

    default = SamplingParams()
    if params.greedy:
        return "temperature 0"
    parts = [f"{f.name} {getattr(params, f.name)}" for f in fields(params)
             if f.name == "temperature" or getattr(params, f.name) != getattr(default, f.name)]
    return ", ".join(parts)


def write_csv(output, rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["setting"] + [key for key, _, _ in COLUMNS])
    for name, values in rows:
        writer.writerow([name] + ["" if math.isnan(values[k]) else repr(values[k])
                                  for k, _, _ in COLUMNS])
    cli.write_whole(output, out.getvalue())


def write_samples(output, prompts, generations):
    lines = []
    for name, made in generations.items():
        for g in made:
            lines.append(json.dumps({"setting": name, "prompt": g.prompt, "sample": g.sample,
                                     "prompt_text": prompts[g.prompt].text, "text": g.text,
                                     "reason": g.reason,
                                     "perplexity": round(math.exp(-sum(g.logprobs) /
                                                                   len(g.logprobs)), 4)
                                     if g.logprobs else None}, ensure_ascii=False))
    cli.write_whole(output, "\n".join(lines) + "\n")


def plot_sweep(path, rows, title):
    """Perplexity against diversity, one point per setting, the human text marked: two panels,
    distinct-2 and 1 - Self-BLEU4."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    panels = (("distinct_2", "distinct-2 (more diverse →)", lambda v: v),
              ("self_bleu", "1 − Self-BLEU4 (more diverse →)", lambda v: 1 - v))
    for ax, (key, label, transform) in zip(axes, panels):
        points = []
        for name, values in rows:
            x, y = transform(values[key]), values["perplexity"]
            if math.isnan(x) or math.isnan(y):
                continue
            human = name == HUMAN
            ax.scatter([x], [y], s=110 if human else 40, marker="*" if human else "o",
                       color="black" if human else "tab:blue", zorder=3)
            points.append((name, x, y))
        ax.margins(0.08)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        _label_points(ax, points)
    axes[0].set_ylabel("perplexity (untempered model)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label_points(ax, points, fontsize=8):
    """Name each point, nudging labels up until they clear the ones below them (settings
    such as top-k 40 and pure sampling often land on top of each other); a nudged label gets
    a thin line to its point. Labels of points in the right half go on their left."""
    ax.autoscale_view()
    to_pixels = ax.transData.transform
    x_min, x_max = ax.get_xlim()
    line_height = fontsize * 1.3  # in points
    points_per_pixel = 72 / ax.figure.dpi
    placed = []  # (x in pixels, label height above the baseline in points) of placed labels
    for name, x, y in sorted(points, key=lambda p: p[2]):
        px, py = to_pixels((x, y))
        left = x > (x_min + x_max) / 2
        label_y = py * points_per_pixel + 3
        for qx, qy in placed:
            if abs(qx - px) * points_per_pixel < 90 and label_y < qy + line_height:
                label_y = qy + line_height
        placed.append((px, label_y))
        dy = label_y - py * points_per_pixel
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(-6 if left else 6, dy),
                    ha="right" if left else "left", va="bottom", fontsize=fontsize,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if dy > 4 else None)


def check_out_dir(settings):
    """The output files' paths; an error before any work if one exists (without --overwrite),
    or if --out_dir cannot be made or written (a file in its path, no permission)."""
    out_dir = settings.out_dir
    cli.check_writable_dir(out_dir, f"--out_dir={out_dir}")
    paths = {name: os.path.join(out_dir, name) for name in OUTPUT_FILES}
    if not settings.overwrite:
        existing = [p for p in paths.values() if os.path.exists(p)]
        if existing:
            raise SettingsError(f"--out_dir={out_dir}: {existing[0]} exists; choose another "
                                f"--out_dir, or add --overwrite to replace the files")
    return paths


# ---------------------------------------------------------------------------------------------
# The command

def main(argv=None):
    """Exit code: 0, 1 (failed midway), 2 (bad input) or 130 (interrupted), as cli.py says."""
    return cli.run_script(evaluate, argv, interrupted="interrupted; no table was written")


# The memory one generated token holds until the table is written: its id (8 bytes in a list),
# log-probability and entropy (32 each as Python floats), its character and its share of the
# word lists (~13), ~90 bytes; rounded up for samples.jsonl's text, built at the end.
BYTES_PER_GENERATED_TOKEN = 256


def check_sweep_fits(settings, sweep, config, device):
    """Refuse, before anything is generated, a sweep whose generations or whose batch (one
    prompt's num_samples) cannot fit in the memory left."""
    free = cli.available_memory_bytes(device)
    if free is None:
        return
    tokens = len(sweep) * settings.num_prompts * settings.num_samples * settings.max_new_tokens
    if settings.prompts is None and tokens * BYTES_PER_GENERATED_TOKEN > free * 0.5:
        raise SettingsError(
            f"--num_prompts={settings.num_prompts}: the sweep would hold about "
            f"{cli.gib(tokens * BYTES_PER_GENERATED_TOKEN)} of generations ({len(sweep)} settings "
            f"x {settings.num_prompts} prompts x {settings.num_samples} samples x "
            f"{settings.max_new_tokens} tokens), more than the {cli.gib(free * 0.5)} it may use; "
            f"use a smaller --num_prompts, --num_samples or --max_new_tokens")
    positions = min(config.block_size, settings.prompt_length + settings.max_new_tokens)
    need = cli.generation_bytes(config.n_layer, config.n_embd, config.vocab_size,
                                settings.num_samples, positions, 4)
    if need > free * 0.5:
        raise SettingsError(f"--num_samples={settings.num_samples}: one prompt's batch needs "
                            f"about {cli.gib(need)}, more than the {cli.gib(free * 0.5)} it may "
                            f"use; use a smaller --num_samples")


def evaluate(argv):
    """The command: read the settings, load the model and the prompts, sweep, report, write the
    files. Returns the exit code; every user mistake is found before the sweep starts."""
    parsed, code = _parse_command(argv)
    if parsed is None:
        return code
    settings, sweep, paths = parsed

    threads.set_wait_policy()  # before torch is imported, or it does nothing (threads.py)
    policy = threads.ThreadPolicy(settings.threads)  # watches the load while torch loads
    from nanosample import loader

    try:
        loaded, prompts, val_fraction = _load_model_and_prompts(settings, sweep, policy)
    except SettingsError as e:
        return cli.report_error(e)
    except loader.CheckpointError as e:
        return cli.report_error(cli.checkpoint_message(e))

    tokenizer = loaded.tokenizer
    units = "words (character-level model)" if tokenizer.name == "char" else \
        f"{tokenizer.name} tokens"
    try:
        rows, generations, seconds = _sweep_with_progress(settings, loaded.model, tokenizer,
                                                          prompts, sweep)
    except (ValueError, RuntimeError, MemoryError) as e:
        # The model failing midway: NaN logits from broken weights, out of memory.
        return cli.report_error(f"the sweep failed: {cli.failure(e)}; nothing was written",
                            cli.EXIT_FAILED)

    about = describe_run(settings, prompts, sweep, units, val_fraction)
    report = f"{format_table(rows)}\n\n{about}\n"
    print(report, end="")
    try:
        write_outputs(settings, paths, report, rows, prompts, generations,
                      f"{os.path.basename(settings.init_from.rstrip('/'))}: "
                      f"{len(prompts)} prompts × {settings.num_samples} samples × "
                      f"{settings.max_new_tokens} tokens; diversity on {units.split(' (')[0]}")
    except (SettingsError, cli.RunError) as e:  # the disk filled, or the directory went away
        return cli.report_error(e, cli.EXIT_FAILED)
    print(f"swept {len(sweep)} settings in {seconds:.1f} s; wrote "
          f"{', '.join(paths[n] for n in OUTPUT_FILES)}", file=sys.stderr)
    return 0


def _parse_command(argv):
    """((settings, sweep, output paths), None), or (None, exit code) once --help or the one-line
    error is printed. What the run needs (matplotlib, nltk, a writable --out_dir) is checked
    here, before the long run, not after it."""
    try:
        settings = parse_settings(EvaluateSettings, argv, prog="evaluate.py",
                                  description=DESCRIPTION)
        sweep = read_sweep(settings)
        paths = check_out_dir(settings)
        import matplotlib  # noqa: F401  (checked before the long run, not after it)
        import nltk  # noqa: F401
    except HelpRequested as h:
        print(h.text)
        return None, 0
    except SettingsError as e:
        return None, cli.report_error(e)
    except ModuleNotFoundError as e:
        return None, cli.report_error(f"evaluate.py needs {e.name}: pip install -e '.[eval]'")
    return (settings, sweep, paths), None


def _load_model_and_prompts(settings, sweep, policy):
    """(the loaded checkpoint, the prompts, the validation fraction the prompts are held out
    with). Raises SettingsError for prompts or a sweep that do not fit the model."""
    from nanosample import loader
    from nanosample.corpus import read_corpus
    from nanosample.device import resolve_device

    device, _ = resolve_device(settings.device, "float32")
    loaded = loader.load_model(settings.init_from, device=device)
    if device == "cpu" or settings.threads is not None:
        # chosen once for the sweep (sample.py also looks again as it goes)
        policy.apply(loaded.model.num_params(), settings.num_samples)
    # the split the checkpoint was trained with, when it says (train.py records it)
    val_fraction = loaded.info.get("training", {}).get("recipe", {}).get(
        "val_fraction", VAL_FRACTION)
    if settings.prompts is not None:
        prompts = read_prompts_file(settings.prompts, loaded.tokenizer)
        check_prompt_lengths(prompts, loaded.model.config.block_size,
                             f"--prompts={settings.prompts}")
    else:
        _check_settings_against_model(settings, loaded.model.config.block_size)
        check_sweep_fits(settings, sweep, loaded.model.config, device)
        text, _ = read_corpus(settings.data)
        prompts = heldout_prompts(text, loaded.tokenizer,
                                  settings.num_prompts, settings.prompt_length,
                                  settings.max_new_tokens, val_fraction,
                                  f"--data={settings.data}" if settings.data else "--data")
    return loaded, prompts, val_fraction


def _sweep_with_progress(settings, model, tokenizer, prompts, sweep):
    """run_sweep with a progress bar on stderr (none when it is not a terminal):
    (rows, generations, seconds)."""
    from tqdm import tqdm

    total = len(sweep) * len(prompts) * settings.num_samples * settings.max_new_tokens
    cli.check_interrupted()
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="tok", file=sys.stderr, leave=False, disable=None)
    try:
        rows, generations = run_sweep(model, tokenizer, prompts, sweep,
                                      num_samples=settings.num_samples,
                                      max_new_tokens=settings.max_new_tokens,
                                      seed=settings.seed, progress=bar)
    finally:
        bar.close()
    return rows, generations, time.perf_counter() - t0


def write_outputs(settings, paths, report, rows, prompts, generations, title):
    """The four files, each written beside its path and renamed into place (whole, never
    interleaved with another run's). A file that fails leaves those before it whole."""
    try:
        os.makedirs(settings.out_dir, exist_ok=True)
    except OSError as e:
        raise cli.RunError(f"--out_dir={settings.out_dir}: cannot make it ({e.strerror})") from None
    outputs = {}
    try:
        # made inside the try: a later one failing (a file that appeared meanwhile) must not
        # leave the earlier ones' temporary files behind
        for name, path in paths.items():
            outputs[name] = cli.OutputFile(path, f"--out_dir={settings.out_dir}: {name}",
                                           overwrite=settings.overwrite)
        cli.write_whole(outputs["sweep.md"], report)
        write_csv(outputs["sweep.csv"], rows)
        write_samples(outputs["samples.jsonl"], prompts, generations)
        plot = outputs["sweep.png"]
        try:
            plot_sweep(plot.write_path, rows, title)
        except OSError as e:
            raise cli.RunError(f"{plot.name}: cannot write it ({e.strerror})") from None
        plot.commit()
    except FileExistsError as e:
        raise cli.RunError(f"--out_dir={settings.out_dir}: {e.filename} appeared during the run; "
                           f"not replaced (add --overwrite to replace it)") from None
    finally:
        for output in outputs.values():
            output.discard()


def _check_settings_against_model(settings, block_size):
    if settings.prompt_length > block_size:
        raise SettingsError(f"--prompt_length={settings.prompt_length}: longer than the model's "
                            f"context of {block_size} tokens (block_size)")


if __name__ == "__main__":
    sys.exit(main())
